"""Kill -9 harness for ``test_crash.py`` (run as a script, not collected by pytest).

    python crash_child.py STORE ROUNDS SEED

The process imports everything heavy except lancedb (whose import starts a
thread, which must not cross a fork), then per round forks a child that

1. opens the store for writing (recovery of what the last killed child left),
2. checks that every block the previous child reported committed is present
   and intact (``verify()`` crc32 over the whole stream + exact synthetic
   contents of the reported ranges) and reports the result,
3. ingests synthetic blocks of three levels, flushing often and reporting
   the committed counts after each flush,

and kills it with SIGKILL at a random moment of step 3. One JSON line per
round goes to stdout.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402,F401
import pyarrow  # noqa: E402,F401
import torch  # noqa: E402
import zarr  # noqa: E402,F401

try:  # the slow part of lancedb's import, free of threads
    import lance_namespace  # noqa: F401
except ImportError:
    pass

from disk_synth import expected_kv, synth_blocks  # noqa: E402
from mukv.backends.disk.tiered import TieredBackend  # noqa: E402

LEVELS = ("patch", "frame", "segment")


def child(store: str, reported: dict[str, int], seed: int, out: int) -> None:
    rng = random.Random(seed)
    torch.set_num_threads(1)
    from disk_synth import LAYOUT

    def say(kind: str, **data) -> None:
        os.write(out, (json.dumps({"kind": kind, **data}) + "\n").encode())

    b = TieredBackend(LAYOUT, store, "cpu", stream_id="crash", commit_interval=0.0, shard_bytes=4 * 2 * 2 * 2 * 9 * 8 * 2,
                      hot_bytes=64 << 10, hot_slab_bytes=8 << 10)
    counts = {lv: b.count(lv) for lv in LEVELS}
    problems = []
    for lv in LEVELS:
        if counts[lv] < reported.get(lv, 0):
            problems.append(f"{lv}: {counts[lv]} stored < {reported[lv]} reported")
    if b.get_state("counts", {}) != {lv: counts[lv] for lv in LEVELS if counts[lv]} and any(counts.values()):
        problems.append(f"state {b.get_state('counts')} != counts {counts}")
    rep = b.verify()
    if not rep["ok"]:
        problems.append(f"verify: {rep}")
    for lv in LEVELS:
        n = reported.get(lv, 0)
        if n:
            ids = sorted({0, n - 1, *rng.sample(range(n), min(n, 8))})
            if not torch.equal(b.load_kv(lv, torch.tensor(ids)), expected_kv(lv, ids)):
                problems.append(f"{lv}: contents differ")
    say("verified", counts=counts, problems=problems, recovered=b.recovered)
    while True:
        for lv in LEVELS:
            b.add(synth_blocks(lv, b.count(lv), rng.randint(1, 3)))
        now = {lv: b.count(lv) for lv in LEVELS}
        b.set_state("counts", now)
        if rng.random() < 0.5:
            b.flush()
            say("committed", counts=now)


def main() -> None:
    store, rounds, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    reported: dict[str, int] = {}
    for r in range(rounds):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            code = 0
            try:
                child(store, reported, seed * 1000 + r, wfd)
            except BaseException as exc:  # noqa: BLE001
                os.write(wfd, (json.dumps({"kind": "error", "error": repr(exc)}) + "\n").encode())
                code = 1
            os._exit(code)
        os.close(wfd)
        buf, verified, last, error = b"", None, None, None
        deadline = time.monotonic() + 60
        kill_at = None
        while True:
            now = time.monotonic()
            if kill_at is not None and now >= kill_at:
                break
            if now > deadline:
                error = "timeout"
                break
            wait = 0.5 if kill_at is None else max(0.0, kill_at - now)
            ready, _, _ = select.select([rfd], [], [], wait)
            if ready:
                chunk = os.read(rfd, 65536)
                if not chunk:
                    break  # child exited
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    if msg["kind"] == "verified":
                        verified = msg
                        kill_at = time.monotonic() + rng.uniform(0.0, 0.6)
                    elif msg["kind"] == "committed":
                        last = msg["counts"]
                    else:
                        error = msg.get("error")
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        # lines written before the kill are still in the pipe
        while True:
            ready, _, _ = select.select([rfd], [], [], 0)
            chunk = os.read(rfd, 65536) if ready else b""
            if not chunk:
                break
            buf += chunk
        for line in buf.split(b"\n"):
            if line:
                msg = json.loads(line)
                if msg["kind"] == "committed":
                    last = msg["counts"]
        os.close(rfd)
        print(json.dumps({"round": r, "verified": verified, "reported_before": reported, "error": error,
                          "reported": last}), flush=True)
        if last is not None:
            reported = last
        if error is not None:
            break
    print(json.dumps({"done": True, "reported": reported}), flush=True)


if __name__ == "__main__":
    main()
