"""Crash and interrupt trials of streams on the disk tier (issue 15).

    python benchmarks/crash_trials.py --trials 200 --out benchmarks/results/crash-trials.json

Each trial stops processes that write a store at a random moment, with SIGKILL, SIGINT or SIGTERM,
in one of five scenarios:

* ``feed``: a session feeding arrays of random sizes, flushing and asking at random;
* ``ingest``: ``mukv ingest STORE video.mp4 --chunk 4`` (the command line, in the child);
* ``close``: a session that feeds, then closes (the signal may land inside close's flush);
* ``reader``: ``feed`` with a reader process asking questions of the same stream meanwhile;
* ``two_streams``: two processes writing two streams of one store.

After each trial the runner checks, with a fresh process's eyes:

1. ``verify_store`` finds no damage (leftovers of a killed writer are allowed);
2. nothing durable is lost: the stream counts at least the blocks and frames the writer had flushed;
   a writer stopped by SIGINT/SIGTERM exited 130/143 with every completed feed committed;
3. every committed block is intact (``verify_store`` checks each block's KV against its crc32 and the
   stream's frames, times and counts against each other);
4. resume is exact: the stream reopens for writing, the next frames get the next frame index and a
   later time, and the store still verifies.

A hang (a child that does not exit within 60 s of its signal, or a runner step that does not return)
counts as a failure. The writers are forked from this process after the model is built, so a trial
costs a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)  # before anything runs: no OpenMP pool to cross the forks

import mukv  # noqa: E402
from mukv.backends.disk.verify import verify_store  # noqa: E402  (lancedb itself loads in the children only)
from mukv.signals import Interrupted, interrupts_as_exceptions  # noqa: E402

FAST = {
    "levels": [
        {"name": "patch", "extractor": "patch_raster", "frames": 1, "tokens": 49, "keep_ratio": 0.1, "top_k": 2},
        {"name": "frame", "extractor": "frame", "frames": 1, "keep_ratio": 0.1, "top_k": 2},
        {"name": "segment", "extractor": "segment", "frames": 4, "keep_ratio": 0.1, "top_k": 1},
    ],
    "generation": {"max_new_tokens": 2},
    "stream": {"encode_batch_frames": 4},
}
OPTIONS = {"commit_interval": 0.05, "hot_bytes": 1 << 20, "shard_bytes": 1 << 16}
SCENARIOS = ("feed", "ingest", "close", "reader", "two_streams")
SIGNALS = (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)


def frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def write_mp4(path: Path, n: int = 96, fps: int = 8) -> Path:
    import av

    data = np.random.default_rng(0).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for f in data:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return path


# ------------------------------------------------------------------------------------------- children
def _log(fd: int, **data) -> None:
    os.write(fd, (json.dumps(data) + "\n").encode())


def writer_child(model, store: str, sid: str, seed: int, mode: str, video: str, fd: int) -> None:
    rng = random.Random(seed)
    if mode == "ingest":
        from mukv.cli import main

        _log(fd, kind="ready")
        code = main(["ingest", store, video, "--stream-id", sid, "--fps", "8", "--chunk", "4", "--no-progress",
                     "--model", "tiny-llava-ov", "--backend-options", json.dumps(OPTIONS)])
        os._exit(code)
    with interrupts_as_exceptions():
        try:
            if (Path(store) / "streams" / f"{sid}.json").exists():
                s = mukv.Session.open(store, stream_id=sid, model=model, backend_options=OPTIONS)
            else:
                s = mukv.Session(model=model, backend="lancedb", path=store, stream_id=sid, config=FAST,
                                 backend_options=OPTIONS)
            _log(fd, kind="ready", frames=s.stats()["frames"])
            steps = rng.randint(4, 40) if mode == "close" else 10_000
            for step in range(steps):
                n = rng.randint(1, 9)
                _log(fd, kind="feeding", n=n)
                s.feed(frames(n, seed * 1000 + step))
                _log(fd, kind="fed", frames=s.stats()["frames"])
                r = rng.random()
                if r < 0.2:
                    s.flush()
                    counts = {lv: s.backend.count(lv) for lv in ("patch", "frame", "segment")}
                    _log(fd, kind="durable", frames=s.stats()["frames"], counts=counts)
                elif r < 0.3:
                    s.ask("what happened?")
            s.close()
            _log(fd, kind="closed")
            os._exit(0)
        except Interrupted as exc:
            try:
                s.close()  # flushes: what is complete is committed
            except NameError:
                pass
            os._exit(exc.exit_status)


def reader_child(model, store: str, sid: str, fd: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            r = mukv.Session.open(store, stream_id=sid, model=model, read_only=True)
            break
        except mukv.StoreError:
            time.sleep(0.05)
    else:
        os._exit(3)
    _log(fd, kind="reader")
    while True:
        try:
            r.ask("what happened?")
        except mukv.EmptyMemoryError:
            time.sleep(0.05)


def fork(fn, *args) -> tuple[int, int]:
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rd)
        try:
            fn(*args, wr)
        except BaseException:  # noqa: BLE001 - a child reports by its exit status
            import traceback

            traceback.print_exc()
            os._exit(4)
        os._exit(0)
    os.close(wr)
    return pid, rd


def _await_ready(fd: int, timeout: float) -> bytes:
    """Read the child's log until its "ready" line (or ``timeout``); returns what was read."""
    import select

    got = b""
    deadline = time.monotonic() + timeout
    while b'"ready"' not in got and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            data = os.read(fd, 1 << 16)
            if not data:
                break
            got += data
    return got


def read_log(fd: int, head: bytes = b"") -> list[dict]:
    chunks = [head]
    while True:
        data = os.read(fd, 1 << 16)
        if not data:
            break
        chunks.append(data)
    os.close(fd)
    lines = b"".join(chunks).decode(errors="replace").splitlines()
    out = []
    for ln in lines:
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            pass
    return out


def wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    return None


# ------------------------------------------------------------------------------------------- a trial
def trial(model, store: Path, rng: random.Random, video: str, scenario: str, sig: int) -> dict:
    sids = ["a", "b"] if scenario == "two_streams" else ["v" if scenario == "ingest" else "a"]
    before = {sid: _state(store, sid) for sid in sids}
    writers = []
    for i, sid in enumerate(sids):
        pid, fd = fork(writer_child, model, str(store), sid, rng.randrange(1 << 30),
                       "ingest" if scenario == "ingest" else ("close" if scenario == "close" else "feed"), video)
        writers.append((sid, pid, fd))
    reader = fork(reader_child, model, str(store), sids[0]) if scenario == "reader" else None
    early: dict[int, bytes] = {}
    for _, pid, fd in writers:  # the signal lands while the writer works, not while it starts
        early[fd] = _await_ready(fd, 120)
    time.sleep(rng.uniform(0.1, 3.0))
    for _, pid, _ in writers:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    out = {"scenario": scenario, "signal": signal.Signals(sig).name, "problems": []}
    for sid, pid, fd in writers:
        status = wait(pid, 60)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            wait(pid, 10)
            out["problems"].append(f"{sid}: hung after {signal.Signals(sig).name}")
        log = read_log(fd, early.get(fd, b""))
        out.setdefault("status", {})[sid] = status
        _check_writer(out, sid, sig, status, log, before[sid], _state(store, sid), scenario)
    if reader is not None:
        os.kill(reader[0], signal.SIGKILL)
        wait(reader[0], 10)
        read_log(reader[1])
    pid, fd = fork(checker_child, model, str(store), sids, rng.randrange(1 << 30))
    status = wait(pid, 300)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        wait(pid, 10)
        out["problems"].append("check: verify or resume hung")
    for e in read_log(fd):
        out["problems"].extend(e.get("problems", []))
    if status not in (0, None):
        out["problems"].append(f"check: the checker exited with status {status}")
    out["ok"] = not out["problems"]
    return out


def checker_child(model, store: str, sids: list[str], seed: int, fd: int) -> None:
    """Verify, resume every stream by two frames, verify again (in a child: lancedb's threads never cross
    a fork of the runner)."""
    problems = []
    if not Path(store).exists():  # a fresh store's writer stopped before creating it: nothing was committed
        _log(fd, problems=problems)  # (lost durable data would show in the writer's check)
        return
    rep = verify_store(store)
    if not rep.ok:
        problems.append("verify: " + "; ".join(p.message for p in rep.damage[:3]))
    for sid in sids:
        if not (Path(store) / "streams" / f"{sid}.json").exists():
            continue  # stopped before the stream was created: nothing was committed, nothing to resume
        try:
            with mukv.Session.open(store, stream_id=sid, model=model, backend_options=OPTIONS) as s:
                f0, t0 = s.stats()["frames"], s._last_time
                s.feed(frames(2, seed), resize=True)  # an ingested stream holds the clip's 32x32 frames
                f1, t1 = s.stats()["frames"], s._last_time
            if f1 != f0 + 2 or (t0 is not None and not t1 > t0):
                problems.append(f"{sid}: resume fed frames {f0}->{f1}, time {t0}->{t1}")
        except mukv.MukvError as exc:
            problems.append(f"{sid}: cannot resume: {exc}")
    rep = verify_store(store)
    if not rep.ok:
        problems.append("verify after resume: " + "; ".join(p.message for p in rep.damage[:3]))
    _log(fd, problems=problems)


def _state(store: Path, sid: str) -> dict:
    p = store / "streams" / f"{sid}.json"
    if not p.exists():
        return {"frames": 0, "counts": {}}
    st = json.loads(p.read_text())
    return {"frames": st["values"].get("frames_seen", 0), "counts": st.get("counts", {})}


def _check_writer(out: dict, sid: str, sig: int, status: int | None, log: list[dict], before: dict, after: dict,
                  scenario: str) -> None:
    durable = [e for e in log if e.get("kind") == "durable"]
    fed = [e for e in log if e.get("kind") == "fed"]
    if durable:
        d = durable[-1]
        if after["frames"] < d["frames"] or any(after["counts"].get(lv, 0) < n for lv, n in d["counts"].items()):
            out["problems"].append(f"{sid}: lost durable data: flushed {d}, found {after}")
    if after["frames"] < before["frames"]:
        out["problems"].append(f"{sid}: frames went back from {before['frames']} to {after['frames']}")
    if status is None:
        return
    if sig == signal.SIGKILL:
        if status not in (-signal.SIGKILL, 0):
            out["problems"].append(f"{sid}: the writer failed before the signal (exit status {status})")
        return
    if status == 0 and any(e.get("kind") == "closed" for e in log):
        return  # finished before the signal
    want = 128 + int(sig)
    if status != want:
        out["problems"].append(f"{sid}: exit status {status} after {signal.Signals(sig).name}, expected {want}")
    if scenario != "ingest" and fed:
        last = fed[-1]["frames"]
        # positions, not list.index: equal entries ({"kind": "feeding", "n": 3}) recur in a log
        at_fed = max(i for i, e in enumerate(log) if e.get("kind") == "fed")
        inflight = [(i, e) for i, e in enumerate(log) if e.get("kind") == "feeding"]
        extra = inflight[-1][1]["n"] if inflight and inflight[-1][0] > at_fed else 0
        if after["frames"] not in (last, last + extra):
            out["problems"].append(f"{sid}: a completed feed was not committed: fed {last} (+{extra} in flight), "
                                   f"stored {after['frames']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Crash and interrupt trials of disk-tier streams (issue 15).")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--series", type=int, default=10, help="trials per store before a fresh one")
    p.add_argument("--out", help="write the results as JSON")
    p.add_argument("--workdir", help="folder for the stores (default: a temporary one)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated scenarios to run in turn (default: all of {', '.join(SCENARIOS)})")
    p.add_argument("--signals", default="SIGKILL,SIGINT,SIGTERM",
                   help="comma-separated signals to send in turn (default: SIGKILL,SIGINT,SIGTERM)")
    p.add_argument("--keep-damaged", metavar="DIR",
                   help="copy the store of every failed trial into DIR (to read its rows and state)")
    args = p.parse_args(argv)
    scenarios = tuple(x for x in args.scenarios.split(",") if x)
    if not scenarios or any(x not in SCENARIOS for x in scenarios):
        p.error(f"--scenarios takes names of {', '.join(SCENARIOS)}; got {args.scenarios!r}")
    names = {s.name: s for s in SIGNALS}
    signals = tuple(names.get(x) for x in args.signals.split(",") if x)
    if not signals or None in signals:
        p.error(f"--signals takes names of {', '.join(names)}; got {args.signals!r}")
    from mukv.plugins.models.llava_onevision import build_llava_onevision

    model = build_llava_onevision("tiny-llava-ov", device="cpu")
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mukv-crash-"))
    video = str(write_mp4(work / "clip.mp4"))
    results = []
    t0 = time.perf_counter()
    store = None
    for i in range(args.trials):
        if i % args.series == 0:
            store = work / f"store{i // args.series}"
            shutil.rmtree(store, ignore_errors=True)
        scenario = scenarios[i % len(scenarios)]
        sig = signals[(i // len(scenarios)) % len(signals)]
        r = trial(model, store, rng, video, scenario, sig)
        r["trial"] = i
        if not r["ok"] and args.keep_damaged and store.exists():
            shutil.copytree(store, Path(args.keep_damaged) / f"trial{i}-{scenario}-{r['signal']}", dirs_exist_ok=True)
        results.append(r)
        mark = "ok" if r["ok"] else "FAIL " + " | ".join(r["problems"])
        print(f"trial {i:3d} {scenario:<11} {r['signal']:<7} {mark}", flush=True)
    by: dict[str, dict[str, int]] = {}
    for r in results:
        key = f"{r['scenario']}/{r['signal']}"
        by.setdefault(key, {"trials": 0, "failed": 0})
        by[key]["trials"] += 1
        by[key]["failed"] += 0 if r["ok"] else 1
    summary = {"trials": len(results), "failed": sum(1 for r in results if not r["ok"]),
               "hangs": sum(1 for r in results for p in r["problems"] if "hung" in p),
               "seconds": round(time.perf_counter() - t0, 1), "by": by, "seed": args.seed}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "trials": results}, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
