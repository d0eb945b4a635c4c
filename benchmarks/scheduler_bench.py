"""Many cameras on one GPU (issue 18): the ingest scheduler against independent sessions, same load.

One shared model adapter (random weights, real architecture, vision tower included), memory backend,
N simulated 0.5-fps cameras on a wall clock, questions arriving every ``--question-every`` seconds on
a random stream (``--answer-tokens`` decoded, stop tokens off)::

    python benchmarks/scheduler_bench.py --out runs/scheduler                       # H100: every part
    python benchmarks/scheduler_bench.py --out /tmp/s --device cpu --preset tiny-llava-ov \\
        --streams 2 --seconds 4 --single-frames 16 --store-hours 0.01 --load-streams 2   # CPU check

Parts (``--parts``, default all three):

* ``streams``: for each N of ``--streams``, two modes under the same arrivals and questions:
  ``scheduler`` (one :class:`mukv.IngestScheduler` over all sessions, its own thread; questions
  through ``IngestScheduler.ask``) and ``independent`` (one loop feeding each stream's arrived frames
  through its own ``Session.feed``, oldest first; questions through ``Session.ask`` on another thread,
  as an application without the scheduler would). Per mode and N: frames received / stored /
  dropped, lag from arrival to searchable (commit) p50/p99, streams held, first-token latency
  p50/p99 of the questions (from their arrival), batch sizes, GPU busy share. A frame counts as
  dropped when it is not searchable within ``--lag-bound`` seconds of its arrival: skipped by the
  independent loop because it is already that late, committed later than that, or still waiting
  ``--grace`` seconds after the last arrival. A mode passes at N with no frame dropped and p99
  first token <= ``--ttft-goal``; a mode that fails is not run at larger N. The scheduler's N run
  first, then the independent sessions' (the same arrivals and questions per N).
* ``single``: one stream fed in chunks of ``--chunk`` frames, with the vision tower (uint8 frames)
  and without (the vision tower's own output, precomputed), in frames/s and as a share of the bf16
  roofline: FLOPs per frame from the architecture (``gpukit.flops.vision_flops`` + ``gpukit.flops.prefill_flops``)
  against the card's datasheet dense bf16 rate and the rate measured now.
* ``stored``: first-token latency and the full answer at ``--store-hours`` of stream stored (ingested
  from precomputed frame embeddings), idle, then under ``--load-streams`` cameras of load (the
  ``streams`` part's phase, questions on the stored stream only), both modes.

Timings run under a simulated clock: ``--time-scale`` simulated seconds per wall second (1 on the
GPU; a CPU check may run faster than real time). Lags are in simulated seconds, first-token
latencies in wall seconds. Warm-up (kernels, question graphs) is excluded. Parts that would run past
``--budget-s`` are skipped and listed. Writes ``scheduler.json`` and ``scheduler.md`` under ``--out``
(after each part) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench as gb  # noqa: E402 - the ingest helpers, FLOP formulas and datasheet rates are shared

import mukv  # noqa: E402
from mukv.accel import accelerate  # noqa: E402
from mukv.config import MukvConfig  # noqa: E402
from mukv.errors import EmptyMemoryError  # noqa: E402
from mukv.scheduler import BatchReport, IngestScheduler  # noqa: E402
from mukv.session import Session  # noqa: E402

MODES = ("scheduler", "independent")
PARTS = ("single", "streams", "stored")


class SimClock:
    """Simulated seconds since ``start()``: wall seconds times ``scale``."""

    def __init__(self, scale: float):
        self.scale = scale
        self.t0 = time.perf_counter()

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return (time.perf_counter() - self.t0) * self.scale

    def wall_of(self, sim: float) -> float:
        return self.t0 + sim / self.scale

    def sleep_until(self, sim: float, stop: threading.Event | None = None, cap: float = 0.05) -> None:
        while True:
            left = (sim - self()) / self.scale
            if left <= 0 or (stop is not None and stop.is_set()):
                return
            time.sleep(min(left, cap))


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else None


def answer_ttft(call_start: float, arrival_wall: float, call_end: float, timings: dict[str, float]) -> float:
    """Wall seconds from a question's arrival to its first token: the wait before the call, the call
    up to its decoding, and the first token (``Session.ask`` timings)."""
    return (call_start - arrival_wall) + (call_end - call_start) - timings["generate"] + timings["first_token"]


class Load:
    """The arrivals of one phase: ``n`` cameras at ``fps`` for ``seconds`` (each a random phase within
    its period), and questions every ``every`` seconds from ``q_start`` on."""

    def __init__(self, n: int, seconds: float, fps: float, every: float, q_start: float, seed: int):
        rng = np.random.default_rng(seed)
        period = 1.0 / fps
        offsets = rng.uniform(0.0, period, n)
        t, s = [], []
        for i, o in enumerate(offsets):
            k = np.arange(o, seconds, period)
            t.append(k)
            s.append(np.full(k.shape, i))
        t_all, s_all = np.concatenate(t), np.concatenate(s)
        order = np.argsort(t_all, kind="stable")
        self.t, self.s = t_all[order], s_all[order]
        self.questions = np.arange(q_start, seconds, every) if every > 0 else np.empty(0)
        self.pick = rng.random(len(self.questions))  # which ready stream each question asks
        self.n, self.seconds = n, seconds


class Phase:
    """One mode at one N: runs the load, returns the figures."""

    def __init__(self, adapter: Any, config: MukvConfig, frames: torch.Tensor, args: argparse.Namespace,
                 mode: str, load: Load, ask_target: Session | None = None):
        self.adapter, self.config, self.frames, self.args = adapter, config, frames, args
        self.mode, self.load, self.ask_target = mode, load, ask_target
        self.clock = SimClock(args.time_scale)
        n = load.n
        self.stored = [0] * n
        self.ready: list[int] = []
        self.lags: list[float] = []
        self.late = self.skipped = self.left = self.failed = self.withdrawn = 0
        self.held = [True] * n
        self.batch_frames: list[int] = []
        self.batch_streams: list[int] = []
        self.busy = 0.0
        self.ttft: list[float] = []
        self.answer: list[float] = []
        self.q_skipped = 0
        self.q_errors: list[str] = []
        self.stop = threading.Event()

    # ---------------------------------------------------------------- bookkeeping
    def _stored(self, i: int, times: list[float], committed: float) -> None:
        for t in times:
            lag = committed - t
            self.lags.append(lag)
            if lag > self.args.lag_bound:
                self.late += 1
                self.held[i] = False
        if self.stored[i] == 0 and times:
            self.ready.append(i)
        self.stored[i] += len(times)

    def _frame(self, i: int, k: int) -> torch.Tensor:
        j = (7 * i + k) % self.frames.shape[0]
        return self.frames[j : j + 1]

    # ---------------------------------------------------------------- questions
    def _questions(self, ask: Callable[[Session, str], Any]) -> None:
        texts = gb.QUESTIONS
        for j, tq in enumerate(self.load.questions):
            self.clock.sleep_until(float(tq), self.stop)
            if self.stop.is_set():
                return
            if self.ask_target is not None:
                s = self.ask_target
            elif self.ready:
                s = self.sessions[self.ready[int(self.load.pick[j] * len(self.ready))]]
            else:
                self.q_skipped += 1
                continue
            arrival = self.clock.wall_of(float(tq))
            t0 = time.perf_counter()
            try:
                a = ask(s, texts[j % len(texts)])
            except EmptyMemoryError:
                self.q_skipped += 1
                continue
            except Exception as exc:  # noqa: BLE001 - reported in the results, the phase goes on
                self.q_errors.append(f"{type(exc).__name__}: {exc}")
                continue
            t1 = time.perf_counter()
            self.ttft.append(answer_ttft(t0, arrival, t1, a.timings))
            self.answer.append(t1 - arrival)

    # ---------------------------------------------------------------- modes
    def run(self) -> dict[str, Any]:
        args = self.args
        t0 = time.perf_counter()
        self.sessions = [Session(model=self.adapter, backend="memory", config=self.config, stream_id=f"cam{i}")
                         for i in range(self.load.n)]
        setup = time.perf_counter() - t0
        n_tok = args.answer_tokens
        sched = None
        if self.mode == "scheduler":
            sched = IngestScheduler({"latency_target_s": args.latency_target, "max_batch_frames": args.batch_frames,
                                     "encode_batch_frames": args.encode_frames or args.batch_frames}, clock=self.clock,
                                    on_batch=self._on_batch)
            self._index = {id(s): i for i, s in enumerate(self.sessions)}
            self._queued: list[list[float]] = [[] for _ in self.sessions]
            ask = lambda s, q: sched.ask(s, q, max_new_tokens=n_tok)  # noqa: E731
        else:
            ask = lambda s, q: s.ask(q, max_new_tokens=n_tok)  # noqa: E731
        asker = threading.Thread(target=self._questions, args=(ask,), name="questions", daemon=True)
        self.clock.start()
        w0 = time.perf_counter()
        asker.start()
        try:
            if sched is not None:
                self._run_scheduler(sched)
            else:
                self._run_independent()
        finally:
            self.stop.set()
            asker.join()
        wall = time.perf_counter() - w0
        out = self._figures(wall, setup)
        if sched is not None:
            out["scheduler_config"] = sched.config.model_dump()
            out["seconds_per_frame_estimate"] = sched.policy.seconds_per_frame
        for s in self.sessions:
            s.close()
        self.sessions = []
        return out

    def _on_batch(self, report: BatchReport) -> None:
        self.busy += report.stats.seconds
        self.batch_frames.append(report.stats.frames)
        self.batch_streams.append(report.stats.streams)
        for r in report.results:
            if r.withdrawn:  # left the batch for a question: its frames are queued again, in front
                self.withdrawn += 1
                continue
            i = self._index[id(r.session)]
            times, self._queued[i] = self._queued[i][: r.frames], self._queued[i][r.frames :]
            if r.ok:
                self._stored(i, times, report.committed)
            else:
                self.failed += len(times)
                self.held[i] = False

    def _run_scheduler(self, sched: IngestScheduler) -> None:
        load, clock = self.load, self.clock
        count = [0] * load.n
        sched.start()
        try:
            for t, i in zip(load.t, load.s):
                clock.sleep_until(float(t))
                i = int(i)
                self._queued[i].append(float(t))
                sched.submit(self.sessions[i], self._frame(i, count[i]), torch.tensor([t], dtype=torch.float64))
                count[i] += 1
            clock.sleep_until(load.seconds)
        finally:
            sched.stop(drain=False)
        self.stop.set()  # no question after the last arrival
        deadline = load.seconds + self.args.grace
        while clock() < deadline and sched.step(force=True) is not None:
            pass
        for i, s in enumerate(self.sessions):
            gone = sched.remove(s)
            if gone:
                self.left += gone
                self.held[i] = False

    def _run_independent(self) -> None:
        load, clock, args = self.load, self.clock, self.args
        pending: list[list[float]] = [[] for _ in range(load.n)]
        heads: OrderedDict[int, None] = OrderedDict()  # streams with frames waiting, by their oldest frame
        count = [0] * load.n
        e, n_ev = 0, len(load.t)
        deadline = load.seconds + args.grace
        while True:
            now = clock()
            while e < n_ev and load.t[e] <= now:
                i = int(load.s[e])
                pending[i].append(float(load.t[e]))
                heads.setdefault(i, None)
                e += 1
            if e >= n_ev and now >= load.seconds:
                self.stop.set()  # no question after the last arrival
            if not heads:
                if e >= n_ev:
                    clock.sleep_until(load.seconds)
                    break
                clock.sleep_until(min(float(load.t[e]), now + 0.01 * clock.scale))
                continue
            if e >= n_ev and now >= deadline:
                break
            i, _ = heads.popitem(last=False)
            times, pending[i] = pending[i], []
            fresh = [t for t in times if now - t <= args.lag_bound]
            if len(fresh) < len(times):
                self.skipped += len(times) - len(fresh)
                self.held[i] = False
            if not fresh:
                continue
            k = count[i]
            batch = torch.cat([self._frame(i, k + j) for j in range(len(fresh))])
            count[i] += len(fresh)
            t0 = time.perf_counter()
            try:
                self.sessions[i].feed(batch, torch.tensor(fresh, dtype=torch.float64))
            except Exception:  # noqa: BLE001 - counted; the loop serves the other streams
                self.failed += len(fresh)
                self.held[i] = False
                continue
            self.busy += time.perf_counter() - t0
            self.batch_frames.append(len(fresh))
            self.batch_streams.append(1)
            self._stored(i, fresh, clock())
        self.stop.set()
        for i, p in enumerate(pending):
            if p:
                self.left += len(p)
                self.held[i] = False

    # ---------------------------------------------------------------- figures
    def _figures(self, wall: float, setup: float) -> dict[str, Any]:
        args = self.args
        received = int(len(self.load.t))
        stored = sum(self.stored)
        dropped = self.late + self.skipped + self.left + self.failed
        ttft_p99 = pct(self.ttft, 99)
        out = {
            "mode": self.mode, "streams": self.load.n, "seconds": self.load.seconds, "wall_s": wall, "setup_s": setup,
            "frames_received": received, "frames_stored": stored, "frames_dropped": dropped,
            "dropped_late": self.late, "dropped_skipped": self.skipped, "dropped_left": self.left,
            "dropped_failed": self.failed, "feeds_withdrawn": self.withdrawn,
            "lag_p50_s": pct(self.lags, 50), "lag_p99_s": pct(self.lags, 99),
            "lag_max_s": max(self.lags) if self.lags else None,
            "streams_held": int(sum(self.held)), "all_streams_held": all(self.held) and dropped == 0,
            "questions": len(self.ttft), "questions_skipped": self.q_skipped, "question_errors": self.q_errors[:5],
            "ttft_p50_ms": None if not self.ttft else 1e3 * pct(self.ttft, 50),
            "ttft_p99_ms": None if ttft_p99 is None else 1e3 * ttft_p99,
            "answer_p50_ms": None if not self.answer else 1e3 * pct(self.answer, 50),
            "answer_tokens": args.answer_tokens,
            "batches": len(self.batch_frames),
            "batch_frames_mean": float(np.mean(self.batch_frames)) if self.batch_frames else None,
            "batch_frames_p50": pct(self.batch_frames, 50),
            "batch_frames_max": max(self.batch_frames) if self.batch_frames else None,
            "batch_streams_mean": float(np.mean(self.batch_streams)) if self.batch_streams else None,
            "gpu_busy_share": self.busy / wall if wall > 0 else None,
        }
        reasons = []
        if dropped:
            reasons.append(f"{dropped} frame(s) dropped")
        if ttft_p99 is None:
            reasons.append("no question answered")
        elif ttft_p99 > args.ttft_goal:
            reasons.append(f"p99 first token {1e3 * ttft_p99:.0f} ms > {1e3 * args.ttft_goal:.0f} ms")
        if self.q_errors:
            reasons.append(f"{len(self.q_errors)} question(s) failed")
        out["passed"] = not reasons
        out["fail_reasons"] = reasons
        return out


# -------------------------------------------------------------------------------- parts
def share_prefix(adapter: Any) -> None:
    """Sessions of the adapter share one system-prompt KV per prompt (each would compute the same
    values; 600 sessions a phase would spend seconds on it, outside the timed phases anyway)."""
    own, memo = adapter.prefix, {}

    def prefix(system_prompt: str | None = None) -> Any:
        if system_prompt not in memo:
            memo[system_prompt] = own(system_prompt)
        return memo[system_prompt]

    adapter.prefix = prefix


def warm_up(adapter: Any, config: MukvConfig, frames: torch.Tensor, args: argparse.Namespace) -> None:
    """Kernels of single-frame feeds, batched feeds and questions (excluded from every figure)."""
    s = Session(model=adapter, backend="memory", config=config)
    for k in range(4):
        s.feed(frames[k : k + 1])
    s.feed(frames[:8])
    sched = IngestScheduler({"max_batch_frames": args.batch_frames,
                             "encode_batch_frames": args.encode_frames or args.batch_frames})
    others = [Session(model=adapter, backend="memory", config=config) for _ in range(3)]
    for o in others:
        sched.submit(o, frames[: min(8, args.batch_frames)])
    sched.drain()
    for k in range(3):
        sched.ask(s, gb.QUESTIONS[k % len(gb.QUESTIONS)], max_new_tokens=args.answer_tokens)
    for o in [s, *others]:
        o.close()
    gb.free(adapter.device)


def part_streams(adapter: Any, config: MukvConfig, frames: torch.Tensor, args: argparse.Namespace,
                 res: dict[str, Any], left: Callable[[], float], save: Callable[[], None]) -> None:
    """Each mode over increasing N (the scheduler's first: its largest N is the run's point), each N
    with the same arrivals and questions in both modes (one seed per N)."""
    phases = res.setdefault("phases", [])
    per_stream_setup = 0.01
    for mode in args.modes:
        for n in args.streams:
            need = args.seconds / args.time_scale + args.grace / args.time_scale + per_stream_setup * n + 2
            if need > left():
                res["skipped"].append(f"streams: {mode} at N={n} (needs ~{need:.0f} s; {left():.0f} s left)")
                break
            load = Load(n, args.seconds, args.fps, args.question_every, args.question_start, args.seed + n)
            out = Phase(adapter, config, frames, args, mode, load).run()
            per_stream_setup = max(per_stream_setup, out["setup_s"] / n)
            phases.append(out)
            print(phase_line(out), flush=True)
            gb.free(adapter.device)
            save()
            if not out["passed"]:
                break
    res["max_streams"] = {m: max([p["streams"] for p in phases if p["mode"] == m and p["passed"]], default=0)
                          for m in args.modes}


def card() -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name(0)
    return name, gb.datasheet_bf16_tflops(name)


def part_single(adapter: Any, config: MukvConfig, args: argparse.Namespace, res: dict[str, Any]) -> None:
    dev = adapter.device
    prefix_len = adapter.prefix(config.generation.system_prompt).length
    fl = gb.prefill_flops(adapter, config, prefix_len)
    vis = gb.vision_flops(adapter)
    pool = gb.random_frames(adapter, min(args.chunk, 128), seed=1)
    embeds = gb.encode_pool(adapter, pool, config.stream.encode_batch_frames)
    gb.fast_ingest(adapter, config, embeds, None, args.chunk, args.chunk)  # warm-up
    gb.fast_ingest(adapter, config, None, pool, min(args.chunk, pool.shape[0]), args.chunk)
    gb.free(dev)
    name, peak = card()
    measured = gb.measure_ceilings(dev, quick=True).get("bf16_matmul_tflops") if dev.type == "cuda" else None
    out: dict[str, Any] = {"chunk": args.chunk, "card": name, "datasheet_bf16_tflops": peak,
                           "measured_bf16_tflops": measured, "prefill_gflop_per_frame": fl["per_frame"] / 1e9,
                           "vision_gflop_per_frame": vis / 1e9}
    for key, e, f, n, flops in (("no_vision", embeds, None, args.single_frames * 2, fl["per_frame"]),
                                ("vision", None, pool, args.single_frames, fl["per_frame"] + vis)):
        runs = [gb.fast_ingest(adapter, config, e, f, n, args.chunk)["fps"] for _ in range(args.reps)]
        fps = gb.median(runs)
        row = {"frames": n, "fps": fps, "fps_runs": runs, "tflops": fps * flops / 1e12,
               "gflop_per_frame": flops / 1e9}
        if peak:
            row["roofline_fps"] = peak * 1e12 / flops
            row["share_of_datasheet"] = fps / row["roofline_fps"]
        if measured:
            row["share_of_measured"] = fps * flops / 1e12 / measured
        out[key] = row
        gb.free(dev)
    res["single"] = out


def part_stored(adapter: Any, config: MukvConfig, frames: torch.Tensor, args: argparse.Namespace,
                res: dict[str, Any], left: Callable[[], float], save: Callable[[], None]) -> None:
    n = max(4, int(round(args.store_hours * 3600 * args.fps)))
    pool = gb.random_frames(adapter, min(n, 64), seed=5)
    embeds = gb.encode_pool(adapter, pool, config.stream.encode_batch_frames)
    ing = gb.fast_ingest(adapter, config, embeds, None, n, args.chunk, keep=True)
    s = ing.pop("session")
    out: dict[str, Any] = {"hours": n / args.fps / 3600, "frames": n, "ingest_s": ing["seconds"],
                           "blocks": {lp.level.name: s.backend.count(lp.level.name) for lp in s.levels}}
    res["stored"] = out
    for k in range(2):  # warm-up at this memory size
        s.ask(gb.QUESTIONS[k], max_new_tokens=args.answer_tokens)
    ttft, full = [], []
    for k in range(args.store_questions):
        t0 = time.perf_counter()
        a = s.ask(gb.QUESTIONS[k % len(gb.QUESTIONS)], max_new_tokens=args.answer_tokens)
        t1 = time.perf_counter()
        ttft.append(answer_ttft(t0, t0, t1, a.timings))
        full.append(t1 - t0)
    out["idle"] = {"questions": len(ttft), "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
                   "answer_p50_ms": 1e3 * pct(full, 50), "kv_tokens": a.kv_tokens}
    save()
    for mode in args.modes:
        need = (args.load_seconds + args.grace) / args.time_scale + 0.01 * args.load_streams + 2
        if need > left():
            res["skipped"].append(f"stored: under load, {mode} (needs ~{need:.0f} s; {left():.0f} s left)")
            continue
        load = Load(args.load_streams, args.load_seconds, args.fps, args.question_every, args.question_start,
                    args.seed + 7)
        out[f"load_{mode}"] = Phase(adapter, config, frames, args, mode, load, ask_target=s).run()
        print(f"stored {out['hours']:.2f} h, " + phase_line(out[f"load_{mode}"]), flush=True)
        gb.free(adapter.device)
        save()
    s.close()


# -------------------------------------------------------------------------------- output
def f(x: Any, nd: int = 0) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def phase_line(p: dict[str, Any]) -> str:
    return (f"{p['mode']:>11} N={p['streams']:4d}: received {p['frames_received']}, stored {p['frames_stored']}, "
            f"dropped {p['frames_dropped']}, lag p50/p99 {f(p['lag_p50_s'], 2)}/{f(p['lag_p99_s'], 2)} s, "
            f"TTFT p50/p99 {f(p['ttft_p50_ms'])}/{f(p['ttft_p99_ms'])} ms ({p['questions']} q), "
            f"batch mean {f(p['batch_frames_mean'], 1)} frames, busy {f(100 * (p['gpu_busy_share'] or 0))}% "
            f"-> {'pass' if p['passed'] else 'FAIL: ' + '; '.join(p['fail_reasons'])}")


def markdown(res: dict[str, Any]) -> str:
    a = res["args"]
    lines = [f"Many streams on one GPU: {res['preset']} (random weights, vision tower), {res['card']}, "
             f"{a['fps']} fps cameras, {a['seconds']} s per N, a question every {a['question_every']} s "
             f"({a['answer_tokens']}-token answers), lag bound {a['lag_bound']} s, scheduler latency target "
             f"{a['latency_target']} s, batches of at most {a['batch_frames']} frames.", ""]
    if res.get("phases"):
        lines += ["| mode | N | received | stored | dropped | lag p50 / p99 s | streams held | TTFT p50 / p99 ms | "
                  "questions | batches | frames per batch (mean / max) | GPU busy | passes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in res["phases"]:
            lines.append(f"| {p['mode']} | {p['streams']} | {p['frames_received']} | {p['frames_stored']} | "
                         f"{p['frames_dropped']} | {f(p['lag_p50_s'], 2)} / {f(p['lag_p99_s'], 2)} | "
                         f"{p['streams_held']} | {f(p['ttft_p50_ms'])} / {f(p['ttft_p99_ms'])} | {p['questions']} | "
                         f"{p['batches']} | {f(p['batch_frames_mean'], 1)} / {f(p['batch_frames_max'])} | "
                         f"{f(100 * (p['gpu_busy_share'] or 0))}% | {'yes' if p['passed'] else 'no'} |")
        ms_ = res.get("max_streams", {})
        lines += ["", "Largest N held (no frame dropped, p99 first token <= "
                  f"{1e3 * a['ttft_goal']:.0f} ms): " + ", ".join(f"{m} {n}" for m, n in ms_.items()), ""]
    sg = res.get("single")
    if sg:
        lines += [f"One stream in chunks of {sg['chunk']} frames ({sg['card']}; datasheet bf16 "
                  f"{f(sg['datasheet_bf16_tflops'])} TFLOP/s, measured now {f(sg['measured_bf16_tflops'])} TFLOP/s):",
                  "", "| input | GFLOP per frame | frames/s | TFLOP/s | roofline frames/s | % of datasheet roofline | "
                  "% of measured bf16 rate |", "|---|---|---|---|---|---|---|"]
        for key, label in (("vision", "uint8 frames (vision tower + prefill)"),
                           ("no_vision", "precomputed embeddings (prefill)")):
            r = sg[key]
            share = r.get("share_of_datasheet")
            meas = r.get("share_of_measured")
            lines.append(f"| {label} | {f(r['gflop_per_frame'], 1)} | {f(r['fps'])} | {f(r['tflops'])} | "
                         f"{f(r.get('roofline_fps'))} | {f(None if share is None else 100 * share)} | "
                         f"{f(None if meas is None else 100 * meas)} |")
        lines.append("")
    st = res.get("stored")
    if st:
        lines += [f"Questions at {st['hours']:.2f} h stored ({st['frames']} frames, ingested from precomputed "
                  f"embeddings in {st['ingest_s']:.1f} s), {a['answer_tokens']}-token answers:", "",
                  "| load | TTFT p50 / p99 ms | answer p50 ms | questions |", "|---|---|---|---|"]
        i = st["idle"]
        lines.append(f"| none | {f(i['ttft_p50_ms'])} / {f(i['ttft_p99_ms'])} | {f(i['answer_p50_ms'])} | "
                     f"{i['questions']} |")
        for m in MODES:
            p = st.get(f"load_{m}")
            if p:
                lines.append(f"| {p['streams']} cameras, {m} (dropped {p['frames_dropped']}) | "
                             f"{f(p['ttft_p50_ms'])} / {f(p['ttft_p99_ms'])} | {f(p['answer_p50_ms'])} | "
                             f"{p['questions']} |")
        lines.append("")
    if res.get("skipped"):
        lines += ["Skipped (time budget): " + "; ".join(res["skipped"]), ""]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for scheduler.json and scheduler.md")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="llava-onevision-qwen2-0.5b-ov", help="model preset (random weights)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--streams", nargs="+", type=int, default=[100, 200, 300, 400, 500, 600],
                    help="numbers of cameras, increasing (a mode stops at its first failure)")
    ap.add_argument("--seconds", type=float, default=20.0, help="simulated seconds of arrivals per N")
    ap.add_argument("--fps", type=float, default=0.5, help="frames per second of each camera")
    ap.add_argument("--time-scale", type=float, default=1.0, help="simulated seconds per wall second")
    ap.add_argument("--question-every", type=float, default=1.0, help="seconds between questions (0: none)")
    ap.add_argument("--question-start", type=float, default=3.0, help="simulated second of the first question")
    ap.add_argument("--answer-tokens", type=int, default=32, help="tokens decoded per answer (stop tokens off)")
    ap.add_argument("--lag-bound", type=float, default=10.0,
                    help="a frame not searchable this many seconds after its arrival counts as dropped")
    ap.add_argument("--latency-target", type=float, default=5.0, help="the scheduler's latency_target_s")
    ap.add_argument("--batch-frames", type=int, default=32,
                    help="the scheduler's max_batch_frames (and encode_batch_frames)")
    ap.add_argument("--encode-frames", type=int, default=0,
                    help="the scheduler's encode_batch_frames (0: --batch-frames); each vision-tower batch ends a "
                         "stage a question can run after")
    ap.add_argument("--grace", type=float, default=3.0, help="seconds after the last arrival to store what waits")
    ap.add_argument("--ttft-goal", type=float, default=0.2, help="p99 first-token latency a passing N keeps (s)")
    ap.add_argument("--chunk", type=int, default=256, help="frames per feed of the single-stream part")
    ap.add_argument("--single-frames", type=int, default=512, help="frames of the single-stream vision run "
                    "(twice as many without the vision tower)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions of each single-stream run (median)")
    ap.add_argument("--store-hours", type=float, default=1.0, help="stream hours stored for the stored part")
    ap.add_argument("--store-questions", type=int, default=10, help="questions at that length, idle")
    ap.add_argument("--load-streams", type=int, default=300, help="cameras of load in the stored part")
    ap.add_argument("--load-seconds", type=float, default=15.0, help="simulated seconds of that load")
    ap.add_argument("--budget-s", type=float, default=330.0, help="wall seconds for the whole run: later parts "
                    "and larger N that would not fit are skipped (and listed)")
    ap.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                    help="warm the kernels and question graphs up first (excluded from the figures)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--accel", default="", help="mukv.accel names applied to the model, comma-separated "
                    "(e.g. fp8_vision); default none: the plain bf16 path")
    args = ap.parse_args(argv)
    if args.streams != sorted(args.streams) or min(args.streams) < 1:
        ap.error("--streams must be positive and increasing")
    for name in ("seconds", "fps", "time_scale", "lag_bound", "latency_target", "grace", "ttft_goal", "store_hours",
                 "load_seconds"):
        if not getattr(args, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.question_every < 0 or min(args.answer_tokens, args.batch_frames, args.chunk, args.single_frames,
                                      args.reps, args.store_questions, args.load_streams) < 1:
        ap.error("counts must be at least 1 and --question-every not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    name, peak = card() if device.type == "cuda" else ("cpu", None)
    res: dict[str, Any] = {"preset": args.preset, "device": str(device), "card": name, "datasheet_bf16_tflops": peak,
                           "torch": torch.__version__, "mukv": getattr(mukv, "__version__", None),
                           "args": vars(args), "skipped": [], "notes": [
                               "random-weight real architecture; answers decoded to their full length (stop tokens "
                               "off); lags in simulated seconds (time scale in args), first-token latencies in wall "
                               "seconds from each question's arrival"]}

    def save() -> None:
        (out_dir / "scheduler.json").write_text(json.dumps(res, indent=1, default=str))
        (out_dir / "scheduler.md").write_text(markdown(res) + "\n")

    t, adapter = gb.timed(lambda: gb.build(args.preset, device), device)
    res["build_s"] = t
    res["accel"] = accelerate(adapter, [a for a in args.accel.split(",") if a]) if args.accel else []
    config = MukvConfig()
    frames = gb.random_frames(adapter, 16, seed=3)
    res["frame_hw"] = list(frames.shape[1:3])
    stops, adapter.stop_ids = adapter.stop_ids, []  # every answer decodes its whole budget
    share_prefix(adapter)
    try:
        t, _ = gb.timed(lambda: warm_up(adapter, config, frames, args) if args.warm_up else None, device)
        res["warm_up_s"] = t
        print(f"[scheduler_bench] {args.preset} on {name}: built in {res['build_s']:.1f} s, warm-up {t:.1f} s",
              flush=True)
        if "single" in args.parts:
            part_single(adapter, config, args, res)
            save()
        if "streams" in args.parts:
            part_streams(adapter, config, frames, args, res, left, save)
        if "stored" in args.parts:
            if left() > 10:
                part_stored(adapter, config, frames, args, res, left, save)
            else:
                res["skipped"].append("stored: out of time budget")
    finally:
        adapter.stop_ids = stops
        res["total_s"] = time.perf_counter() - start
        save()
    print(markdown(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
