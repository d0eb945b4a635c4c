"""Load on ``mukv serve``: simulated cameras push frames while questions arrive at a fixed rate.

Each camera is a stream of the synthetic benchmark (``mukv.bench``, one seed per camera),
pushed over HTTP at ``fps`` (0.5 by default, times ``--speed`` to compress a long run) with its
own timestamps; questions (the benchmark's, each asked once its evidence has been pushed, else
a repeat) arrive at ``--question-rate`` per second, round robin over the cameras, streamed as
server-sent events. The server runs in this process (uvicorn on loopback) over a lancedb store.

Reported, all measured in one run:

* streams held at real time: lag never above ``--max-lag`` and no frame dropped;
* frames pushed, stored, dropped (and the gaps recorded);
* question latency from request to first token and to the whole answer, p50 / p99;
* answers against the same streams answered offline: a plain ``mukv.Session`` per camera fed every
  frame up to the newest one the server had stored when it answered, then asked the same question
  (the same frames, so equal answers, when nothing was dropped), and accuracy of both;
* host RSS and GPU memory over time (sampled every second).

Commands::

    # CPU, the trained tiny model, 4 cameras in real time for 3 minutes
    python benchmarks/serve_load.py --model mukv-tiny --streams 4 --minutes 3 --out runs/serve-cpu.json
    # GPU: the exact llava-onevision-qwen2-0.5b-ov architecture (random weights, vision tower included)
    python benchmarks/serve_load.py --model llava-onevision-qwen2-0.5b-ov --device cuda --streams 64 \\
        --minutes 5 --question-rate 2 --out runs/serve-gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs), q)) if xs else None


class Camera(threading.Thread):
    """Pushes one benchmark stream's frames on its schedule (stream time / speed after the start)."""

    def __init__(self, client: Any, sid: str, bench: Any, n: int, speed: float, t0: float, stop: threading.Event):
        super().__init__(name=f"camera-{sid}", daemon=True)
        self.client, self.sid, self.bench, self.n, self.speed, self.t0, self.stop = client, sid, bench, n, speed, t0, stop
        self.pushed = 0
        self.errors: list[str] = []
        self.times = np.asarray(bench.stream.timestamps)[:n]

    def run(self) -> None:
        for k in range(self.n):
            due = self.t0 + float(self.times[k]) / self.speed
            while not self.stop.is_set() and time.monotonic() < due:
                time.sleep(min(0.05, due - time.monotonic()))
            if self.stop.is_set():
                return
            try:
                self.client.push(self.sid, self.bench.stream.frames(k, k + 1), timestamps=[float(self.times[k])])
                self.pushed += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported
                self.errors.append(str(exc))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uvicorn

    import mukv
    from mukv.bench import Benchmark, score
    from mukv.serve import ServeConfig, create_app
    from mukv.session import load_model

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(args.model, device)
    store = args.store or tempfile.mkdtemp(prefix="mukv-serve-load-")
    port = _free_port()
    cfg = ServeConfig(store=str(Path(store) / "online"), port=port, max_lag_s=args.max_lag,
                      max_batch_frames=args.max_batch_frames, drain_s=60,
                      backend_options={"commit_interval": 1.0})
    app = create_app(cfg, model=model)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = mukv.Client(f"http://127.0.0.1:{port}", timeout=600)
    while True:
        try:
            if client.health()["status"] == "ok":
                break
        except Exception:
            time.sleep(0.2)
    n = int(args.minutes * 60 * args.fps)
    benches = [Benchmark.generate(seed=i, minutes=args.minutes, fps=args.fps, questions=args.questions,
                                  min_depth_s=min(60.0, args.minutes * 60 / 4)) for i in range(args.streams)]
    sids = [f"cam{i:03d}" for i in range(args.streams)]
    for sid in sids:
        client.create_stream(sid, fps=args.fps)
    stop = threading.Event()
    t0 = time.monotonic() + 1.0
    cams = [Camera(mukv.Client(client.url, timeout=600), sid, b, n, args.speed, t0, stop)
            for sid, b in zip(sids, benches)]
    for c in cams:
        c.start()

    samples: list[dict[str, Any]] = []
    max_lag = {sid: 0.0 for sid in sids}

    def sample() -> None:
        while not stop.is_set():
            row = {"t": round(time.monotonic() - t0, 2), "rss_bytes": _rss()}
            if device.type == "cuda":
                row["gpu_allocated_bytes"] = torch.cuda.memory_allocated(device)
                row["gpu_reserved_bytes"] = torch.cuda.memory_reserved(device)
            try:
                for st in client.streams():
                    max_lag[st["id"]] = max(max_lag[st["id"]], st["lag_s"])
                row["queued"] = sum(st["queued"] for st in client.streams())
            except Exception:
                pass
            samples.append(row)
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    asked: list[dict[str, Any]] = []
    lock = threading.Lock()
    pending = {sid: sorted(b.questions, key=lambda q: q.ask_frame) for sid, b in zip(sids, benches)}
    duration = n / args.fps / args.speed

    def ask(sid: str, q: Any) -> None:  # one question, on its own thread: arrivals keep their rate
        text = q.text if q is not None else "what is in the scene now?"
        t_req = time.perf_counter()
        first = None
        final: dict[str, Any] | None = None
        try:
            with mukv.Client(client.url, timeout=600) as own:
                for piece in own.ask_stream(sid, text, max_new_tokens=args.max_new_tokens):
                    if isinstance(piece, str) and first is None:
                        first = time.perf_counter() - t_req
                    elif isinstance(piece, dict):
                        final = piece
        except Exception as exc:  # noqa: BLE001 - e.g. nothing stored yet at the very start
            with lock:
                asked.append({"stream": sid, "error": str(exc)})
            return
        total = time.perf_counter() - t_req
        with lock:
            asked.append({"stream": sid, "question": text, "benchmark": q is not None,
                          "answer": q.answer if q is not None else None, "prediction": final["text"],
                          "correct": bool(q is not None and score(final["text"], q.answer)),
                          "frames": final["frames"], "t_end": final["t_end"],
                          "first_token_s": first if first is not None else total, "total_s": total,
                          "server_wait_s": final["timings"].get("wait", 0.0),
                          "server_timings": {k: round(float(v), 4) for k, v in final["timings"].items()}})

    askers = []
    k = 0
    while True:
        due = t0 + k / args.question_rate
        if due > t0 + duration:
            break
        while time.monotonic() < due:
            time.sleep(min(0.05, due - time.monotonic()))
        sid = sids[k % len(sids)]
        k += 1
        cam = cams[sids.index(sid)]
        ready = [q for q in pending[sid] if q.ask_frame < cam.pushed]
        q = ready[0] if ready else None
        if q is not None:
            pending[sid].remove(q)
        t = threading.Thread(target=ask, args=(sid, q), daemon=True)
        t.start()
        askers.append(t)
    for t in askers:
        t.join()
    for c in cams:
        c.join()
    deadline = time.monotonic() + args.max_lag + 60  # what is queued is ingested, or dropped past the lag
    while time.monotonic() < deadline and any(st["queued"] or st["state"] == "ingesting" for st in client.streams()):
        time.sleep(0.2)
    statuses = {st["id"]: st for st in client.streams()}
    stop.set()
    sampler.join()
    server.should_exit = True
    thread.join(120)

    # offline: the same stream, each question asked after every frame up to the newest one the server
    # had stored when it answered (the same frames when none was dropped; the dropped ones too otherwise)
    offline_same = offline_total = 0
    offline_correct = 0
    by_stream: dict[str, list[dict[str, Any]]] = {}
    for a in asked:
        if a.get("benchmark"):
            by_stream.setdefault(a["stream"], []).append(a)
    for sid, b in zip(sids, benches):
        qs = sorted(by_stream.get(sid, []), key=lambda a: a["frames"])
        if not qs:
            continue
        s = mukv.Session(model=model, backend="lancedb", path=str(Path(store) / "offline"), stream_id=sid,
                         config={"stream": {"fps": args.fps}})
        fed = 0
        times = np.asarray(b.stream.timestamps)
        for a in qs:
            upto = int(np.searchsorted(times, a["t_end"], side="right")) if a["t_end"] is not None else 0
            if upto > fed:
                s.feed(b.stream.frames(fed, upto), timestamps=times[fed:upto])
                fed = upto
            text = s.ask(a["question"], max_new_tokens=args.max_new_tokens).text
            a["offline_prediction"] = text
            offline_total += 1
            offline_same += int(text == a["prediction"])
            offline_correct += int(score(text, a["answer"]))
        s.close()

    ok = [a for a in asked if "error" not in a]
    bench_q = [a for a in ok if a["benchmark"]]
    streams = []
    for sid, cam in zip(sids, cams):
        st = statuses[sid]
        streams.append({"id": sid, "pushed": cam.pushed, "push_errors": len(cam.errors), "stored": st["frames"],
                        "dropped": st["dropped"], "gaps": len(st["gaps"]), "max_lag_s": round(max_lag[sid], 3),
                        "held": st["dropped"] == 0 and max_lag[sid] <= args.max_lag and cam.pushed == n})
    rss = [r["rss_bytes"] for r in samples]
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"device": str(device), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "model": args.model, "frames_per_stream": n, "wall_s": round(duration, 1),
        "streams_held_real_time": sum(s["held"] for s in streams), "streams": streams,
        "frames": {"pushed": sum(c.pushed for c in cams), "stored": sum(s["stored"] for s in streams),
                   "dropped": sum(s["dropped"] for s in streams)},
        "questions": {"asked": len(asked), "answered": len(ok), "errors": len(asked) - len(ok),
                      "benchmark": len(bench_q),
                      "first_token_s": {"p50": _pct([a["first_token_s"] for a in ok], 50),
                                        "p99": _pct([a["first_token_s"] for a in ok], 99)},
                      "total_s": {"p50": _pct([a["total_s"] for a in ok], 50),
                                  "p99": _pct([a["total_s"] for a in ok], 99)},
                      "server_wait_s": {"p50": _pct([a["server_wait_s"] for a in ok], 50),
                                        "p99": _pct([a["server_wait_s"] for a in ok], 99)}},
        "accuracy": {"online": (sum(a["correct"] for a in bench_q) / len(bench_q)) if bench_q else None,
                     "offline": offline_correct / offline_total if offline_total else None,
                     "answers_equal_offline": f"{offline_same}/{offline_total}"},
        "memory": {"rss_bytes": {"start": rss[0] if rss else None, "max": max(rss) if rss else None,
                                 "end": rss[-1] if rss else None},
                   "gpu_allocated_bytes_max": max((r.get("gpu_allocated_bytes", 0) for r in samples), default=0),
                   "gpu_reserved_bytes_max": max((r.get("gpu_reserved_bytes", 0) for r in samples), default=0),
                   "series": samples},
        "answers": asked,
    }
    return result


def markdown(r: dict[str, Any]) -> str:
    q, m, f = r["questions"], r["memory"], r["frames"]
    mib = lambda b: f"{(b or 0) / 2**20:.0f} MiB"  # noqa: E731
    ms = lambda s: "-" if s is None else f"{s * 1000:.0f} ms"  # noqa: E731
    lines = [
        f"model {r['model']} on {r['machine']['device']} ({r['machine']['gpu'] or r['machine']['cpu']}, "
        f"{r['machine']['cores']} cores); {r['config']['streams']} cameras at {r['config']['fps']} fps x speed "
        f"{r['config']['speed']} for {r['wall_s']} s; questions at {r['config']['question_rate']}/s",
        "",
        "| streams held at real time | frames pushed | stored | dropped | questions | first token p50 / p99 | "
        "whole answer p50 / p99 | wait for the engine p50 / p99 | accuracy online / offline | answers equal offline | "
        "RSS start / max / end | GPU max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {r['streams_held_real_time']} / {r['config']['streams']} | {f['pushed']} | {f['stored']} | {f['dropped']} | "
        f"{q['answered']} ({q['benchmark']} benchmark) | {ms(q['first_token_s']['p50'])} / {ms(q['first_token_s']['p99'])} | "
        f"{ms(q['total_s']['p50'])} / {ms(q['total_s']['p99'])} | "
        f"{ms(q['server_wait_s']['p50'])} / {ms(q['server_wait_s']['p99'])} | "
        f"{_fmt_acc(r['accuracy']['online'])} / {_fmt_acc(r['accuracy']['offline'])} | "
        f"{r['accuracy']['answers_equal_offline']} | {mib(m['rss_bytes']['start'])} / {mib(m['rss_bytes']['max'])} / "
        f"{mib(m['rss_bytes']['end'])} | {mib(m['gpu_allocated_bytes_max'])} |",
    ]
    return "\n".join(lines)


def _fmt_acc(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mukv-tiny", help="model preset (default: %(default)s)")
    p.add_argument("--device", help="cpu or cuda (default: CUDA if available)")
    p.add_argument("--streams", type=int, default=4, help="simulated cameras (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=3.0, help="stream minutes per camera (default: %(default)s)")
    p.add_argument("--fps", type=float, default=0.5, help="camera frame rate (default: %(default)s)")
    p.add_argument("--speed", type=float, default=1.0, help="stream seconds per wall second (default: real time)")
    p.add_argument("--question-rate", type=float, default=0.2, help="questions per second (default: %(default)s)")
    p.add_argument("--questions", type=int, default=12, help="benchmark questions per camera (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=3, help="answer budget (default: %(default)s)")
    p.add_argument("--max-lag", type=float, default=10.0, help="server's max_lag_s (default: %(default)s)")
    p.add_argument("--max-batch-frames", type=int, default=16, help="server's max_batch_frames (default: %(default)s)")
    p.add_argument("--store", help="folder of the stores (default: a temporary folder)")
    p.add_argument("--out", help="write the results as JSON here (and a .md beside it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    r = run(args)
    md = markdown(r)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=1))
        out.with_suffix(".md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
