"""What ``lance_call_timeout`` costs a search: the same cold searches with the option off and on.

    python benchmarks/lance_call_timeout.py [--searches 300] [--rounds 2]

Each lance call of a disk stream then runs on a short-lived thread of its own (so that a call
lance never finishes becomes a StoreError); this prints the mean latency of a top-8 search over
320 frame blocks on disk, both ways, alternating, and their ratio. No figure is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "disk"))
from disk_synth import LAYOUT, synth_blocks  # noqa: E402

from mukv.backends.disk import TieredBackend  # noqa: E402


def mean_search_ms(root: str, timeout: float | None, searches: int) -> float:
    b = TieredBackend(LAYOUT, root, "cpu", stream_id="s", commit_interval=0.0, hot_bytes=0,
                      lance_call_timeout=timeout)
    try:
        for _ in range(20):
            b.add(synth_blocks("frame", b.count("frame"), 16))
            b.flush()
        for _ in range(20):  # warm lance's caches
            b.search("frame", torch.randn(LAYOUT.vector_dim), 8)
        t0 = time.perf_counter()
        for _ in range(searches):
            b.search("frame", torch.randn(LAYOUT.vector_dim), 8)
        return (time.perf_counter() - t0) / searches * 1e3
    finally:
        b.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--searches", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    off, on = [], []
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            off.append(mean_search_ms(f"{d}/off{r}", None, args.searches))
            on.append(mean_search_ms(f"{d}/on{r}", 300.0, args.searches))
    a, b = statistics.fmean(off), statistics.fmean(on)
    print(f"search, mean of {args.rounds} x {args.searches}: off {a:.3f} ms, on {b:.3f} ms "
          f"(+{b - a:.3f} ms, x{b / a:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
