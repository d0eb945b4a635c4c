"""Bits between keys and values at kivi4's bytes: a simulation on mukv-tiny's held-out clips (issue 20).

kivi4 gives keys and values 4 bits each. Its measurements say the keys carry the answers (clipping the keys'
extremes cost 2.2 points, the values' nothing). This script asks whether moving bits from values to keys at
the same total (keys 5 + values 3 = 8 bits per key-value pair, as 4 + 4) wins accuracy back. Every block is
paged in through a fake-quantisation round trip with kivi4's grouping: blocks of at least
``--channel-tokens`` tokens per channel over the block's tokens (keys and values), shorter blocks per token
(keys in groups of one head's channels up to 64, values in groups of 128 channels spanning heads), float16
minimum and step per group, round to nearest. The memory backend keeps float32 KV; ``none`` is the reference.

    OMP_NUM_THREADS=1 python benchmarks/kv_bits_split.py --splits 4/4,5/3,6/2 --out runs/kv-bits

Model: mukv-tiny (trained). A simulation of a format, not a codec: the bytes are those of the bits named.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec_clips import compared_row, write_results  # noqa: E402


def fake_quant(x: torch.Tensor, bits: int, dim: int | tuple[int, ...]) -> torch.Tensor:
    """Round trip of ``x`` through ``bits``-bit asymmetric codes sharing a float16 minimum and step over ``dim``."""
    levels = (1 << bits) - 1
    lo = x.amin(dim=dim, keepdim=True).half().float()
    hi = x.amax(dim=dim, keepdim=True)
    step = ((hi - lo) / levels).half().float()
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = ((x - lo) / safe).round().clamp_(0, levels)
    return torch.where(step > 0, lo + q * step, lo.expand_as(x))


def round_trip(kv: torch.Tensor, kbits: int, vbits: int, channel_tokens: int) -> torch.Tensor:
    """``[n, Y, 2, H, K, D]`` through the kivi4-shaped fake quantisation with ``kbits``/``vbits``."""
    n, y, _, h, k, d = kv.shape
    x = kv.float()
    keys, values = x[:, :, 0], x[:, :, 1]  # [n, Y, H, K, D]
    if k >= channel_tokens:  # per channel over the block's tokens
        keys, values = fake_quant(keys, kbits, 3), fake_quant(values, vbits, 3)
    else:
        g = min(64, d)
        keys = fake_quant(keys.reshape(n, y, h, k, d // g, g), kbits, -1).reshape(n, y, h, k, d)
        vg = min(128, h * d)
        v = values.permute(0, 1, 3, 2, 4).reshape(n, y, k, h * d // vg, vg)  # token-major, heads one after another
        values = fake_quant(v, vbits, -1).reshape(n, y, k, h, d).permute(0, 1, 3, 2, 4)
    return torch.stack((keys, values), dim=2).to(kv.dtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--splits", default="4/4,5/3", help="key bits/value bits, comma-separated")
    ap.add_argument("--channel-tokens", type=int, default=64)
    ap.add_argument("--per-kind", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--resamples", type=int, default=4000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from mukv import train as T
    from mukv.backends.memory import MemoryBackend
    from mukv.plugins.models.llava_onevision import LlavaOnevisionAdapter
    from mukv.plugins.models.mukv_tiny import asset_dir

    adapter = LlavaOnevisionAdapter.from_pretrained(asset_dir(), device="cpu")
    clips = T.eval_clips(args.seed, args.per_kind)
    plain = MemoryBackend.load_kv
    results = {}
    try:
        for split in ["none", *args.splits.split(",")]:
            if split == "none":
                MemoryBackend.load_kv = plain
            else:
                kb, vb = (int(b) for b in split.split("/"))
                MemoryBackend.load_kv = (lambda kb, vb: lambda self, level, ids: round_trip(
                    plain(self, level, ids), kb, vb, args.channel_tokens))(kb, vb)
            t0 = time.perf_counter()
            report, rows = T.session_accuracy(adapter, clips, policy="mukv", device=torch.device("cpu"))
            results[split] = {"report": report, "correct": [int(r["correct"]) for r in rows],
                              "seconds": time.perf_counter() - t0}
            print(f"{split:6s} {100 * report['overall']:.1f}% in {results[split]['seconds']:.0f} s", flush=True)
    finally:
        MemoryBackend.load_kv = plain
    first = args.splits.split(",")[0]
    lines = [f"{len(clips)} held-out clips (seed {args.seed}), mukv-tiny; keys/values bits with kivi4's grouping", "",
             f"| keys / values bits | patch | frame | segment | overall | vs none (95%) | vs {first} (95%) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [compared_row(name, results, ("none", first), args.resamples) for name in results]
    write_results(args.out, "bits", args, results, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
