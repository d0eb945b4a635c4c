"""Soak benchmark: many streams feeding frames and asking questions at once, for a set time.

    python benchmarks/soak.py                                   # CPU: 4 memory + 4 lancedb streams, 60 s
    python benchmarks/soak.py --seconds 600 --memory-streams 8 --disk-streams 8
    python benchmarks/soak.py --device cuda --disk-streams 0 --memory-streams 16 --model llava-onevision-qwen2-0.5b-ov
    python benchmarks/soak.py --device cuda --memory-streams 8 --disk-streams 2 --pace 10 --hot-mib 256 \
        --model llava-onevision-qwen2-0.5b-ov      # the GPU run (paced: memory streams keep every block on the GPU)

Each stream is a thread with its own :class:`mukv.Session` (all share one model
adapter, as an application serving several cameras would): it feeds batches of
random frames and asks a question every few batches until the time is up.
``--memory-streams`` use the in-memory backend (every block stays in RAM or GPU
memory: their memory grows with what they hold, by design);
``--disk-streams`` use the ``lancedb`` backend, all in one store (one stream id
each), with a bounded hot tier: their memory must stay flat however long they run.

A sampler records, every ``--sample-every`` seconds: the process RSS (psutil, or
``/proc/self/statm``), the bytes of blocks the memory streams hold, the hot
tiers' bytes against their budgets, GPU memory (``--device cuda``), frames fed,
questions answered and errors so far. At the end every session is closed and
the store is checked end to end (:func:`mukv.backends.disk.verify_store`).

Reported (a table on stdout, everything in ``--out`` JSON): streams held,
frames fed, blocks stored, questions asked / answered, errors (by kind, with the
first messages), feed and question latency (p50 / p95), memory over time, and
the verdicts:

* every question answered: asked == answered, no error;
* bounded: every disk stream's hot tier within its budget at every sample, and
  the RSS that nothing bounds (RSS - memory-stream bytes in host memory - the
  disk tier's page-locked staging pool, bounded by ``pinned_free_bytes`` plus
  the bytes in flight - lancedb's caches, bounded by ``--lance-cache-mib`` per
  disk stream; each measured at every sample) grew less than
  ``--max-growth-mib`` from the middle third of the run to the last third (the
  first third is warm-up: caches and allocator pools filling); on CUDA likewise
  the floor (lowest sample of a third) of the GPU memory allocated beyond the
  memory streams' blocks on the GPU (a sample's value includes the activations
  of the questions in flight at that instant, so its mean is noise). The raw
  growth of RSS beyond held blocks and the GPU mean are reported beside it;
* nothing lost: the store verifies clean and every disk stream holds, after
  closing and reopening, exactly the blocks it had stored.

The machine of a run is printed with its results; no timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from memory_parts import backend_caches, memory_parts, rss_bytes

QUESTIONS = ["what color was the car?", "where is the dog?", "what happened before the door opened?",
             "how many people are there?", "what is on the table?", "did anything move?"]


# ------------------------------------------------------------------------------ measuring
def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


class Stream(threading.Thread):
    """One stream: a session of its own feeding and asking until ``deadline``."""

    def __init__(self, name: str, kind: str, make_session, args: argparse.Namespace, deadline: float, seed: int):
        super().__init__(name=name, daemon=True)
        self.kind, self.make_session, self.args, self.deadline = kind, make_session, args, deadline
        self.rng = np.random.default_rng(seed)
        self.session = None
        self.frames = 0
        self.asked = 0
        self.answered = 0
        self.reopens = 0
        self.errors: list[tuple[str, str]] = []
        self.feed_s: list[float] = []
        self.ask_s: list[float] = []
        self.blocks: dict[str, int] = {}
        self.lock = threading.Lock()

    def run(self) -> None:
        import mukv

        a = self.args
        try:
            self.session = self.make_session(self.name, reopen=False)
        except BaseException as exc:  # noqa: BLE001 - reported, the run goes on
            self.errors.append((type(exc).__name__, f"opening: {exc}"))
            return
        feeds = 0
        while time.monotonic() < self.deadline:
            batch = self.rng.integers(0, 256, (a.frames_per_feed, a.side, a.side, 3), dtype=np.uint8)
            t0 = time.perf_counter()
            try:
                self.session.feed(batch)
                with self.lock:
                    self.feed_s.append(time.perf_counter() - t0)
                    self.frames += a.frames_per_feed
            except mukv.MukvError as exc:
                self._failed(exc)
                continue
            except BaseException as exc:  # noqa: BLE001 - not a mukv error: a bug, recorded as such
                self.errors.append((f"UNEXPECTED {type(exc).__name__}", "".join(traceback.format_exception(exc))[-800:]))
                continue
            feeds += 1
            if feeds % a.ask_every == 0:
                q = QUESTIONS[int(self.rng.integers(len(QUESTIONS)))]
                with self.lock:
                    self.asked += 1
                t0 = time.perf_counter()
                try:
                    answer = self.session.ask(q, max_new_tokens=a.max_new_tokens)
                    assert isinstance(answer.text, str) and answer.blocks, "an answer without blocks"
                    with self.lock:
                        self.ask_s.append(time.perf_counter() - t0)
                        self.answered += 1
                except mukv.MukvError as exc:
                    self._failed(exc)
                except BaseException as exc:  # noqa: BLE001
                    self.errors.append((f"UNEXPECTED {type(exc).__name__}",
                                        "".join(traceback.format_exception(exc))[-800:]))
            if a.pace > 0:
                time.sleep(max(0.0, a.frames_per_feed / a.pace - (time.perf_counter() - t0)))

    def _failed(self, exc: BaseException) -> None:
        import mukv

        self.errors.append((type(exc).__name__, str(exc)[:400]))
        if isinstance(exc, mukv.StoreError) and self.kind == "disk":  # "reopen the store to continue"
            try:
                self.session.close()
            except mukv.MukvError:
                pass
            try:
                self.session = self.make_session(self.name, reopen=self.session.stats()["frames"] > 0)
                self.reopens += 1
            except BaseException as again:  # noqa: BLE001 - the stream ends here, and says why
                self.errors.append((type(again).__name__, f"reopening: {again}"))
                self.deadline = 0.0

    def held_bytes(self) -> tuple[int, int]:
        """Bytes of the blocks a memory stream holds: ``(in host memory, in GPU memory)``; in host
        memory the rows in use of every buffer (KV, vectors, positions, metadata: the pages they
        touch), on the GPU the buffers whole (their spare capacity is allocated too)."""
        s = self.session
        if s is None or self.kind != "memory":
            return 0, 0
        try:
            levels = getattr(s.backend, "_levels", None)
            if levels is None:
                total = int(s.stats()["bytes"])
                return (0, total) if s.device.type == "cuda" else (total, 0)
            host = gpu = 0
            for st in list(levels.values()):
                for t in (st.kv, st.vectors, st.unit, st.positions, st.token_index, *st.meta.values()):
                    if t is not None and t.shape[0]:
                        if t.is_cuda:
                            gpu += t.nbytes
                        else:
                            host += st.n * (t.nbytes // t.shape[0])
            return host, gpu
        except Exception:  # noqa: BLE001 - a sample taken while the session changes
            return 0, 0

    def hot(self) -> tuple[int, int]:
        s = self.session
        if s is None or self.kind != "disk":
            return 0, 0
        try:
            h = s.backend.tier_stats()["hot"]
            return int(h["used_bytes"]), int(h["budget_bytes"])
        except Exception:  # noqa: BLE001
            return 0, 0


    def caches(self) -> tuple[int, int]:
        """A disk stream's bounded caches: ``(rows in its row cache, bytes in lance's caches)``."""
        s = self.session
        if s is None or self.kind != "disk":
            return 0, 0
        try:
            return backend_caches(s.backend)
        except Exception:  # noqa: BLE001
            return 0, 0


def sampler(streams: list[Stream], args: argparse.Namespace, stop: threading.Event, t_start: float,
            samples: list[dict[str, Any]]) -> None:
    cuda = args.device.startswith("cuda")
    if cuda:
        from mukv.backends.disk.transfer import pinned_bytes
    while True:
        hot = [s.hot() for s in streams]
        held = [s.held_bytes() for s in streams]
        parts = memory_parts()
        caches = [s.caches() for s in streams]
        row = {
            "t": round(time.monotonic() - t_start, 2),
            "rss_mib": rss_bytes() / 2**20,
            **{f"{k}_mib": parts[k] / 2**20 for k in ("RssAnon", "RssFile", "glibc_in_use", "glibc_free_kept")
               if k in parts},
            "malloc_arenas": parts.get("malloc_arenas"),
            "row_cache_rows": sum(r for r, _ in caches),
            "lance_cache_mib": sum(b for _, b in caches) / 2**20,
            "held_mib": sum(h for h, _ in held) / 2**20,
            "hot_used_mib": sum(u for u, _ in hot) / 2**20,
            "hot_budget_mib": sum(b for _, b in hot) / 2**20,
            "hot_over_budget": sum(1 for u, b in hot if u > b),
            "frames": sum(s.frames for s in streams),
            "asked": sum(s.asked for s in streams),
            "answered": sum(s.answered for s in streams),
            "errors": sum(len(s.errors) for s in streams),
        }
        if cuda:
            row["held_gpu_mib"] = sum(g for _, g in held) / 2**20
            row["gpu_alloc_mib"] = torch.cuda.memory_allocated() / 2**20
            row["gpu_reserved_mib"] = torch.cuda.memory_reserved() / 2**20
            # page-locked host memory, part of RSS: the disk tier's staging pools (bounded by
            # pinned_free_bytes + the bytes in flight) and torch's own pinned allocator (never gives back)
            row["pinned_mib"] = pinned_bytes() / 2**20
            row["torch_pinned_mib"] = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) / 2**20
        samples.append(row)
        if stop.wait(args.sample_every):
            return


def arena_max_in_effect() -> str | None:
    """The malloc arena cap of this process: glibc's MALLOC_ARENA_MAX, or the one ``import mukv`` set."""
    from mukv.malloc import M_ARENA_MAX, applied

    if os.environ.get("MALLOC_ARENA_MAX"):
        return f"MALLOC_ARENA_MAX={os.environ['MALLOC_ARENA_MAX']}"
    return f"{applied[M_ARENA_MAX]} (import mukv)" if M_ARENA_MAX in applied else None


def memory_growth(samples: list[dict[str, Any]]) -> dict[str, float | None]:
    """Growth (MiB) from the middle third of the samples to the last (the first third is warm-up): of the
    mean for host memory; of the floor (lowest sample) for GPU memory, whose samples catch the
    activations of the questions in flight at that instant.

    ``rss_overhead_growth_mib``: RSS beyond the memory streams' blocks in host memory;
    ``rss_unbounded_growth_mib``: beyond those, the page-locked staging pool (at most
    ``pinned_free_bytes`` free + the bytes in flight) and lance's caches (``--lance-cache-mib`` per
    disk stream), each measured at every sample: what nothing bounds;
    ``gpu_overhead_growth_mib`` / ``gpu_floor_growth_mib``: GPU memory allocated beyond the memory
    streams' blocks on the GPU, mean / floor (None on CPU).
    """
    def thirds(values: list[float]) -> tuple[list[float], list[float]]:
        third = len(values) // 3
        return values[third:2 * third], values[2 * third:]

    def mean_growth(values: list[float]) -> float:
        mid, last = thirds(values)
        return statistics.fmean(last) - statistics.fmean(mid) if mid else 0.0

    def floor_growth(values: list[float]) -> float:
        mid, last = thirds(values)
        return min(last) - min(mid) if mid else 0.0

    gpu = [r["gpu_alloc_mib"] - r["held_gpu_mib"] for r in samples] if samples and "gpu_alloc_mib" in samples[0] \
        else None
    return {
        "rss_overhead_growth_mib": mean_growth([r["rss_mib"] - r["held_mib"] for r in samples]),
        "rss_unbounded_growth_mib": mean_growth([r["rss_mib"] - r["held_mib"] - r.get("pinned_mib", 0)
                                                 - r.get("lance_cache_mib", 0) for r in samples]),
        "gpu_overhead_growth_mib": None if gpu is None else mean_growth(gpu),
        "gpu_floor_growth_mib": None if gpu is None else floor_growth(gpu),
    }


def is_bounded(samples: list[dict[str, Any]], growth: dict[str, float | None], max_growth_mib: float) -> bool:
    """The soak's memory verdict: hot tiers within budget at every sample, and what nothing bounds grew
    less than ``max_growth_mib`` in host memory (and on the GPU, its floor)."""
    gpu = growth["gpu_floor_growth_mib"]
    return (all(r["hot_over_budget"] == 0 for r in samples) and growth["rss_unbounded_growth_mib"] < max_growth_mib
            and (gpu is None or gpu < max_growth_mib))


def rescore(paths: list[str], max_growth_mib: float) -> int:
    """Print the memory verdict of saved soak results (``--out`` files, older ones too) as computed now."""
    for path in paths:
        try:
            res = json.loads(Path(path).read_text())
            samples = res["samples"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"{path}: not a soak result ({exc})", file=sys.stderr)
            return 2
        g = memory_growth(samples)
        gpu = "" if g["gpu_floor_growth_mib"] is None else (
            f"  GPU beyond held blocks {g['gpu_overhead_growth_mib']:+.0f} (mean) {g['gpu_floor_growth_mib']:+.0f} (floor)")
        print(f"{Path(path).name}: RSS beyond held blocks {g['rss_overhead_growth_mib']:+.0f} MiB, beyond held blocks, "
              f"page-locked pool and lance's caches {g['rss_unbounded_growth_mib']:+.0f} MiB{gpu}  "
              f"bounded: {is_bounded(samples, g, max_growth_mib)}")
    return 0


# ------------------------------------------------------------------------------ the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    import mukv
    from mukv.session import load_model

    warnings.simplefilter("ignore")  # hot-tier sizing hints etc. would flood the output
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    model = load_model(args.model, device)
    load_s = time.perf_counter() - t0
    store_dir = Path(args.store or tempfile.mkdtemp(prefix="mukv-soak-"))
    store = store_dir / "soak.mukv"
    config = {"generation": {"max_new_tokens": args.max_new_tokens}}
    disk_options = {"hot_bytes": args.hot_mib << 20, "commit_interval": args.commit_interval,
                    "lance_cache_bytes": args.lance_cache_mib << 20}
    if args.cold_index_rows is not None:
        disk_options.update(cold_index="auto", cold_index_rows=args.cold_index_rows)

    def make_session(name: str, reopen: bool):
        kind = "disk" if name.startswith("disk") else "memory"
        if kind == "memory":
            return mukv.Session(model=model, backend="memory", config=config, device=device)
        if reopen:
            return mukv.Session.open(store, stream_id=name, model=model, backend_options=disk_options,
                                     device=device)
        return mukv.Session(model=model, backend="lancedb", path=store, stream_id=name, config=config,
                            backend_options=disk_options, device=device)

    # warm-up outside the clock: the first feed and question of a shape compile kernels
    warm = mukv.Session(model=model, backend="memory", config=config, device=device)
    warm.feed(np.zeros((max(4, args.frames_per_feed), args.side, args.side, 3), np.uint8))
    warm.ask(QUESTIONS[0], max_new_tokens=args.max_new_tokens)
    warm.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    t_start = time.monotonic()
    deadline = t_start + args.seconds
    streams = [Stream(f"memory-{i}", "memory", make_session, args, deadline, seed=i)
               for i in range(args.memory_streams)]
    streams += [Stream(f"disk-{i}", "disk", make_session, args, deadline, seed=1000 + i)
                for i in range(args.disk_streams)]
    samples: list[dict[str, Any]] = []
    stop = threading.Event()
    sam = threading.Thread(target=sampler, args=(streams, args, stop, t_start, samples), daemon=True)
    sam.start()
    for s in streams:
        s.start()
    for s in streams:
        s.join(timeout=max(1.0, deadline - time.monotonic()) + args.grace)
    hung = [s.name for s in streams if s.is_alive()]
    stop.set()
    sam.join()
    elapsed = time.monotonic() - t_start

    # close everything; disk streams: reopen each and compare with what it had stored
    lost: dict[str, Any] = {}
    close_errors: list[str] = []
    for s in streams:
        if s.session is None or s.name in hung:  # a hung stream holds its session's lock: leave it be
            continue
        st = s.session.stats()
        s.blocks = {lv: v["blocks"] for lv, v in st["levels"].items()}
        try:
            s.session.close()
        except Exception as exc:  # noqa: BLE001
            close_errors.append(f"{s.name}: {type(exc).__name__}: {exc}")
    verify: dict[str, Any] | None = None
    if args.disk_streams and not hung:  # with a writer hung, checking the store could hang the same way
        from mukv.backends.disk import verify_store

        t_verify = time.perf_counter()
        rep = verify_store(str(store))
        verify = {"ok": rep.ok, "seconds": time.perf_counter() - t_verify, "summary": rep.summary(),
                  "problems": [p.line() for p in rep.problems]}
        for s in streams:
            if s.kind != "disk" or s.session is None or s.name in hung:
                continue
            again = mukv.Session.open(store, stream_id=s.name, model=model, backend_options=disk_options,
                                      device=device)
            have = {lv: v["blocks"] for lv, v in again.stats()["levels"].items()}
            again.close()
            if have != s.blocks:
                lost[s.name] = {"before_close": s.blocks, "after_reopen": have}
    if not args.store and not args.keep:
        shutil.rmtree(store_dir, ignore_errors=True)

    def kind_rows(kind: str) -> dict[str, Any]:
        ss = [s for s in streams if s.kind == kind]
        feed = [x for s in ss for x in s.feed_s]
        ask = [x for s in ss for x in s.ask_s]
        errs: dict[str, int] = {}
        for s in ss:
            for k, _ in s.errors:
                errs[k] = errs.get(k, 0) + 1
        return {
            "streams": len(ss), "streams_alive_to_the_end": sum(1 for s in ss if s.session is not None and not s.errors
                                                                 or s.session is not None),
            "frames": sum(s.frames for s in ss), "blocks": sum(sum(s.blocks.values()) for s in ss),
            "asked": sum(s.asked for s in ss), "answered": sum(s.answered for s in ss),
            "errors": errs, "first_errors": [f"{s.name}: {k}: {m}" for s in ss for k, m in s.errors][:5],
            "reopens": sum(s.reopens for s in ss),
            "feed_s_p50": pct(feed, 0.5), "feed_s_p95": pct(feed, 0.95),
            "ask_s_p50": pct(ask, 0.5), "ask_s_p95": pct(ask, 0.95),
        }

    per_kind = {k: kind_rows(k) for k in ("memory", "disk") if any(s.kind == k for s in streams)}
    growth = memory_growth(samples)
    asked = sum(r["asked"] for r in per_kind.values())
    answered = sum(r["answered"] for r in per_kind.values())
    n_err = sum(sum(r["errors"].values()) for r in per_kind.values())
    verdicts = {
        "every_question_answered": asked == answered and n_err == 0 and not hung,
        "hot_tier_within_budget": all(r["hot_over_budget"] == 0 for r in samples),
        **growth,
        "bounded": is_bounded(samples, growth, args.max_growth_mib),
        "nothing_lost": (None if hung and args.disk_streams  # not checked: see hung_streams
                         else (verify is None or verify["ok"]) and not lost and not close_errors),
    }
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "device": str(device), "malloc_arena_max": arena_max_in_effect(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model": {"name": str(args.model), "load_s": load_s, "kv_bytes_per_token": model.layout.token_bytes()},
        "seconds": elapsed, "hung_streams": hung, "per_kind": per_kind, "samples": samples, "verify": verify,
        "lost": lost, "close_errors": close_errors, "verdicts": verdicts,
        "peak_gpu_alloc_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def report(res: dict[str, Any]) -> str:
    def f(x, nd=3):
        return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

    m = res["machine"]
    lines = [f"mukv soak: {res['seconds']:.0f} s, {m['device']}{' (' + m['gpu'] + ')' if m['gpu'] else ''}, "
             f"{m['cpus']} CPUs, torch {m['torch']}, model {res['model']['name']}, {m['when']}, "
             f"malloc arena cap {m.get('malloc_arena_max') or 'glibc default'}",
             f"command: {res['command']}", ""]
    head = ("backend", "streams", "frames", "blocks", "asked", "answered", "errors", "reopens", "feed p50 s",
            "feed p95 s", "ask p50 s", "ask p95 s")
    rows = [head]
    for kind, r in res["per_kind"].items():
        rows.append((kind if kind == "memory" else "lancedb", r["streams"], r["frames"], r["blocks"], r["asked"],
                     r["answered"], sum(r["errors"].values()), r["reopens"], f(r["feed_s_p50"]),
                     f(r["feed_s_p95"]), f(r["ask_s_p50"]), f(r["ask_s_p95"])))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    for r in rows:
        lines.append("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
    lines.append("")
    gpu = "gpu_alloc_mib" in (res["samples"][0] if res["samples"] else {})
    head = ("t s", "RSS MiB", "held MiB", "RSS-held", "glibc used/kept (arenas)", "hot used/budget MiB", "frames", "answered",
            "errors") + (
        ("GPU alloc MiB", "GPU held MiB", "GPU alloc-held", "pinned MiB mukv/torch") if gpu else ())
    rows = [head]
    step = max(1, len(res["samples"]) // 12)
    for r in res["samples"][::step] + ([res["samples"][-1]] if len(res["samples"]) % step != 1 else []):
        rows.append((f"{r['t']:.0f}", f"{r['rss_mib']:.0f}", f"{r['held_mib']:.0f}", f"{r['rss_mib'] - r['held_mib']:.0f}",
                     f"{r.get('glibc_in_use_mib', 0):.0f}/{r.get('glibc_free_kept_mib', 0):.0f} "
                     f"({r.get('malloc_arenas') or '-'})",
                     f"{r['hot_used_mib']:.1f}/{r['hot_budget_mib']:.0f}", r["frames"], r["answered"], r["errors"])
                    + ((f"{r['gpu_alloc_mib']:.0f}", f"{r['held_gpu_mib']:.0f}",
                        f"{r['gpu_alloc_mib'] - r['held_gpu_mib']:.0f}",
                        f"{r.get('pinned_mib', 0):.0f}/{r.get('torch_pinned_mib', 0):.0f}") if gpu else ()))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    for r in rows:
        lines.append("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
    lines.append("")
    v = res["verdicts"]
    lines.append(f"every question answered: {v['every_question_answered']}   hot tier within budget at every sample: "
                 f"{v['hot_tier_within_budget']}   nothing lost: {v['nothing_lost']}")
    lines.append(f"from the middle to the last third, RSS beyond held blocks: {v['rss_overhead_growth_mib']:+.0f} MiB, "
                 f"beyond held blocks, page-locked pool and lance's caches: {v['rss_unbounded_growth_mib']:+.0f} MiB "
                 f"(bounded: {v['bounded']})")
    if res["verify"] is not None:
        lines.append(res["verify"]["summary"].splitlines()[0])
    if res["peak_gpu_alloc_mib"] is not None:
        lines.append(f"peak GPU memory allocated: {res['peak_gpu_alloc_mib']:.0f} MiB; GPU memory beyond held blocks: "
                     f"{v['gpu_overhead_growth_mib']:+.0f} MiB (mean), {v['gpu_floor_growth_mib']:+.0f} MiB (floor) from "
                     "the middle to the last third")
    for kind, r in res["per_kind"].items():
        for e in r["first_errors"]:
            lines.append(f"error ({kind}): {e}")
    if res["hung_streams"]:
        lines.append(f"streams still running after the grace period: {res['hung_streams']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--seconds", type=float, default=60.0, help="how long the streams run (default 60)")
    ap.add_argument("--memory-streams", type=int, default=4, help="streams on the memory backend (default 4)")
    ap.add_argument("--disk-streams", type=int, default=4, help="streams on the lancedb backend, one store (default 4)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--model", default="tiny-llava-ov", help="model preset or checkpoint (default tiny-llava-ov)")
    ap.add_argument("--side", type=int, default=32, help="frame side in pixels (default 32; the model resizes)")
    ap.add_argument("--frames-per-feed", type=int, default=4, help="frames per feed call (default 4)")
    ap.add_argument("--ask-every", type=int, default=2, help="a question every this many feeds (default 2)")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="answer length (default 8)")
    ap.add_argument("--pace", type=float, default=0.0, help="frames per second per stream (0: as fast as possible)")
    ap.add_argument("--hot-mib", type=int, default=8, help="hot-tier budget per disk stream in MiB (default 8)")
    ap.add_argument("--commit-interval", type=float, default=1.0, help="disk streams' commit interval (default 1 s)")
    ap.add_argument("--lance-cache-mib", type=int, default=256,
                    help="lancedb index cache bound per disk stream in MiB (the backend's default: 256)")
    ap.add_argument("--cold-index-rows", type=int, default=None,
                    help="turn the store's IVF_PQ vector index on (cold_index auto), built from this many rows "
                         "(all disk streams); default: the backend's exact search")
    ap.add_argument("--sample-every", type=float, default=2.0, help="seconds between memory samples (default 2)")
    ap.add_argument("--max-growth-mib", type=float, default=64.0,
                    help="RSS beyond held blocks may grow this much from the middle to the last third of the run "
                         "and still count as bounded (default 64)")
    ap.add_argument("--grace", type=float, default=120.0, help="seconds a stream may take to finish its last call")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--store", default=None, help="store folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store")
    ap.add_argument("--out", default="runs/soak.json", help="JSON results (default runs/soak.json)")
    ap.add_argument("--rescore", nargs="+", metavar="JSON",
                    help="print the memory verdict of saved results as computed now, and run nothing")
    args = ap.parse_args(argv)
    if args.rescore:
        return rescore(args.rescore, args.max_growth_mib)
    res = run(args)
    text = report(res)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**res, "report": text}, indent=1, default=str))
    print(f"\nwrote {out}")
    v = res["verdicts"]
    if res["hung_streams"]:
        # where they hang (Python frames; native ones: py-spy dump --native), then leave without the
        # interpreter's shutdown, whose atexit closing of the hung stores would hang too
        import faulthandler

        print(f"hung streams: {res['hung_streams']}; their threads:", file=sys.stderr)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return 0 if v["every_question_answered"] and v["nothing_lost"] and v["hot_tier_within_budget"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
