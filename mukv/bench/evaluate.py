"""The evaluation harness: every policy on the same streams, at the same KV budget.

For each stream length and each seed a :class:`~mukv.bench.Benchmark` is
generated; its questions are asked in stream order, each one as soon as its
``ask_frame`` has been fed, so a question only sees the past. Policies that store
the same blocks (the frame-block baselines all store frames prefilled alone)
share one ingest through :meth:`mukv.Session.fork` and differ only in retrieval.

Budgets (:mod:`mukv.bench.plans`): every policy reads the same number of KV tokens
per answer (MuKV's at the model's levels) unless its spec scales it
(``rekv@1.5``); each answer's realised tokens are recorded, and a cell more than
5% off its policy's budget is flagged. Intervals (:mod:`mukv.bench.stats`): each
cell is the mean over every question of every seed with a 95% bootstrap interval
over seeds and questions; differences from a reference policy are paired.
Provenance (:mod:`mukv.bench.provenance`): code, machine, libraries, the model's
hash and every policy's resolved configuration go into results.json.

With ``backend="lancedb"`` every storage group writes its stream to a store
under ``store_path`` (hot tier bounded by ``backend_options``), as a user's
week-long stream would; ingest and answer times are reported beside accuracy.

Command::

    python -m mukv.bench.evaluate --model mukv-tiny --minutes 64 256 --seeds 2 3 4 --questions 99 \\
        --policies mukv rekv rekv@1.5 frame_topk no_memory --oracle --out runs/eval
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import MukvConfig
from ..errors import ConfigError, InputError, MukvError
from .dataset import Benchmark
from .plans import (  # noqa: F401  (re-exported: the harness's public names)
    BUDGET_TOLERANCE,
    NO_MEMORY,
    ORACLE,
    ORACLE_BLOCKS,
    ORACLES,
    PolicyPlan,
    mukv_budget,
    plan_policies,
    with_top_k,
)
from .questions import _depth_bucket, accuracy_report, score
from .report import markdown, plot  # noqa: F401
from .stats import bootstrap_interval, paired_interval

DEFAULT_POLICIES = ("mukv", "mukv_spatial", "mukv_time", "mukv_timeline", "mukv_hierarchical", "rekv", "frame_topk",
                    "uniform", "sliding_window", "full_context", "no_memory")
#: ``cold_exact_rows`` the harness gives the ``lancedb`` backend unless its options set one: every
#: search on disk exact, so two runs of one stream retrieve the same blocks, even where the options
#: turn the IVF_PQ index on (``cold_index`` "auto"; the disk tier's default is exact anyway).
HARNESS_EXACT_ROWS = 10**12


@dataclass
class Record:
    """One answered question."""

    policy: str
    minutes: float
    question: Any
    prediction: str
    correct: bool
    kv_tokens: int
    seconds: float
    levels: dict[str, int] = field(default_factory=dict)
    #: share of the retrieved visual KV tokens that lie in the questioned scene's frames
    evidence_share: float = 0.0
    seed: int = 0
    #: KV tokens read besides the system prompt's (what the budget counts)
    retrieved_tokens: int = 0
    #: per level of the memory: the share of that level's retrieved tokens inside the questioned scene
    evidence_by_level: dict[str, float] = field(default_factory=dict)


def evaluate(
    model: Any,
    minutes: Sequence[float] = (1, 10),
    policies: Sequence[str] = DEFAULT_POLICIES,
    questions: int = 24,
    seed: int = 0,
    fps: float = 0.5,
    budget_tokens: int | None = None,
    full_context_max_tokens: int = 32768,
    max_new_tokens: int = 4,
    feed_batch: int = 64,
    progress: bool = False,
    log=print,
    oracle: bool = False,
    oracle_blocks: bool = False,
    top_k: dict[str, int] | None = None,
    seeds: Sequence[int] | None = None,
    config: dict[str, Any] | None = None,
    policy_config: dict[str, dict[str, Any]] | None = None,
    backend: str = "memory",
    store_path: str | Path | None = None,
    backend_options: dict[str, Any] | None = None,
    keep_stores: bool = False,
    reference: str | None = None,
    argv: list[str] | None = None,
    kv_codec: str | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every policy on a stream of each length and seed; return the results dict.

    Args:
        model: a model adapter or a preset name (loaded once, shared by every session).
        minutes: stream lengths (stream time).
        policies: policy specs: registered names, ``no_memory``, or ``NAME@SCALE`` for a
            policy at ``SCALE`` times the shared budget.
        questions: questions per stream.
        seed: benchmark seed when ``seeds`` is not given.
        fps: sampling rate of the streams.
        budget_tokens: KV tokens at answer time for every policy (default MuKV's).
        full_context_max_tokens: full context runs while frames x tokens fit.
        max_new_tokens: decoding budget per answer (answers are one word).
        feed_batch: frames per ``feed`` call.
        progress: show progress bars.
        log: where progress lines go.
        oracle: also report "oracle_scene": each question asked of a fresh session fed only
            its own scene's frames (the context-complete clip), with MuKV's configuration (the
            ``mukv`` policy as run, else MuKV under ``config`` and the model's defaults). It
            separates reading (the model) from finding (the memory policy).
        oracle_blocks: also report "oracle_blocks": each question asked of a fresh session fed
            the frames of the blocks its scene is stored in (the scene widened to the grid of
            MuKV's level windows, as the stream's memory cuts it), with the oracle's configuration
            above, so a scene shorter than a segment is read from whole segments, with the frames
            around it, as a perfect finder would read it from the stream's memory.
        top_k: blocks MuKV retrieves per level, by level name, over the model's own levels (or
            mukv's defaults); the shared budget follows (unless ``budget_tokens`` is given).
        seeds: benchmark seeds: one stream per seed and length (default ``[seed]``).
        config: configuration fields applied over every policy (e.g. a codec).
        policy_config: configuration fields applied over one policy, by name or spec.
        backend: storage backend of the sessions ("memory" or "lancedb").
        store_path: folder for the disk backend's stores (empty or absent; one store per
            stream and storage group, removed after its questions unless ``keep_stores``).
        backend_options: options of the backend (e.g. ``{"hot_bytes": 268435456}``). The ``lancedb``
            backend searches exactly at every size unless they turn the index on (``cold_index``
            "auto") and set ``cold_exact_rows`` (:data:`HARNESS_EXACT_ROWS`): runs of one stream then
            retrieve the same blocks.
        keep_stores: leave the disk stores in place.
        reference: policy the others are compared with, per question (default ``rekv`` when run).
        argv: the command line, recorded in the provenance.
        kv_codec: the KV codec every policy stores with (``MukvConfig.kv_codec``: a name or
            ``{"name": ..., **settings}``); ``None``: each policy's own (default "none").

    Returns:
        ``{"settings": {...}, "runs": [...], "differences": [...], "records": [...]}``:
        settings hold the provenance and each policy's resolved configuration; each run is a
        policy at one stream length over every seed (accuracy with its interval, realised
        KV tokens against the budget, retrieval figures per level and depth, time);
        records are the answered questions.

    Raises:
        ConfigError: bad policies, configuration or budget.
        InputError: an unusable store path.
    """
    from ..session import Session, load_model
    from .provenance import provenance

    seeds = [int(s) for s in (seeds if seeds is not None else [seed])]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct and at least one; got {seeds}")
    if backend != "memory" and store_path is None:
        raise ConfigError(f"backend {backend!r} keeps its blocks on disk: give a store path")
    root = _store_root(store_path) if backend != "memory" else None
    if backend == "lancedb" and "cold_exact_rows" not in (backend_options or {}):
        # reproducible comparisons: every search on disk exact, however long the stream (the index's
        # unseeded partitions changed a fifth of a day's answers between two runs)
        backend_options = {**(backend_options or {}), "cold_exact_rows": HARNESS_EXACT_ROWS}
    device = _device()
    adapter = load_model(model, device, None)
    prov = provenance(adapter, device, argv)  # at the start: the code that runs, not the code at the end
    tpf = adapter.tokens_per_frame
    defaults = with_top_k(getattr(adapter, "default_config", None) or {}, top_k)
    plans = plan_policies(policies, tpf, budget_tokens, defaults, config, policy_config)
    if kv_codec is not None:
        plans = [dataclasses.replace(p, config=p.config.replace(kv_codec=kv_codec)) for p in plans]
    names = [p.name for p in plans]
    if reference is None:
        reference = "rekv" if "rekv" in names else None
    elif reference not in names:
        raise ConfigError(f"reference policy {reference!r} is not among the policies run: {names}")
    # the oracles read MuKV's memory: the mukv policy as run, else MuKV under the run's configuration
    oracle_config = next((p.config for p in plans if p.name == "mukv"), None) or MukvConfig.from_policy(
        "mukv", under=defaults, **dict(config or {}))
    if kv_codec is not None:
        oracle_config = oracle_config.replace(kv_codec=kv_codec)
    groups: dict[str, list[PolicyPlan]] = {}
    for p in plans:
        groups.setdefault(p.storage_key(), []).append(p)
    groups_list = list(groups.values())
    records: list[Record] = []
    info: dict[tuple[float, int, int], dict[str, float]] = {}  # (minutes, seed, group) -> ingest, stored
    for m in minutes:
        for sd in seeds:
            bench = Benchmark.generate(seed=sd, minutes=m, fps=fps, questions=questions)
            stream = bench.stream
            qs = sorted(bench.questions, key=lambda q: (q.ask_frame, q.id))
            for gi, group in enumerate(groups_list):
                where = None if root is None else root / f"m{m:g}-seed{sd}-group{gi}"
                info[(m, sd, gi)] = _run_group(
                    Session, adapter, group, stream, qs, m, sd, records, backend, where, backend_options,
                    full_context_max_tokens, max_new_tokens, feed_batch, progress, log)
                if oracle and gi == 0:
                    records += _oracle_records(adapter, oracle_config, stream, qs, m, sd, max_new_tokens)
                if oracle_blocks and gi == 0:
                    records += _oracle_records(adapter, oracle_config, stream, qs, m, sd, max_new_tokens,
                                               on_grid=True)
                if where is not None and not keep_stores:
                    shutil.rmtree(where, ignore_errors=True)
    group_of = {p.name: gi for gi, g in enumerate(groups_list) for p in g}
    rows = [o for o, on in ((ORACLE, oracle), (ORACLE_BLOCKS, oracle_blocks)) if on]
    all_plans = plans + [PolicyPlan(o, oracle_config, policy=o) for o in rows]
    runs = [_run_summary(p, m, seeds, records, info, group_of.get(p.name, 0)) for m in minutes for p in all_plans]
    for r in runs:
        if "accuracy" in r:
            log(f"{r['minutes']:>8g} min  {r['policy']:<18} acc {r['accuracy']:.3f} "
                f"[{r['accuracy_ci'][0]:.3f}, {r['accuracy_ci'][1]:.3f}]  kv {r['retrieved_tokens']:>7.0f}"
                f"{' (off budget)' if r['budget_flag'] else ''}  scene reached {r['evidence_hit']:.2f}")
    diffs = differences(records, reference, names + rows, minutes) if reference else []
    shared = (budget_tokens if budget_tokens is not None
              else next((p.budget for p in plans if p.scale == 1.0 and p.budget), None)
              or mukv_budget(MukvConfig.from_policy("mukv", under=defaults, **dict(config or {})), tpf))
    settings = {
        "minutes": list(minutes), "policies": list(policies), "questions": questions, "seeds": seeds,
        "seed": seeds[0], "fps": fps, "tokens_per_frame": tpf, "model": getattr(adapter, "name", str(model)),
        "budget_tokens": shared, "full_context_max_tokens": full_context_max_tokens, "top_k": top_k,
        "config": config or {}, "policy_config": policy_config or {}, "backend": backend,
        "backend_options": backend_options or {}, "reference": reference, "oracle": oracle,
        "oracle_blocks": oracle_blocks,
        "budget_tolerance": BUDGET_TOLERANCE,
        "kv_codec": plans[0].config.kv_codec if plans else kv_codec,
        "resolved": {p.name: {"policy": p.policy, "budget": p.budget, "scale": p.scale,
                              "storage_group": group_of[p.name], "config": p.config.model_dump(mode="json")}
                     for p in plans},
        "provenance": prov,
    }
    return {"settings": settings, "runs": runs, "differences": diffs, "records": [_record_dict(r) for r in records]}


def _store_root(store_path: str | Path) -> Path:
    root = Path(store_path)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise InputError(f"store path {str(root)!r} must be an empty folder or not exist: the harness writes "
                         "one store per stream into it and removes them")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _run_group(Session, adapter, group: list[PolicyPlan], stream, qs, m: float, sd: int, records: list[Record],
               backend: str, where: Path | None, backend_options, full_context_max_tokens: int, max_new_tokens: int,
               feed_batch: int, progress: bool, log) -> dict[str, float]:
    """One storage group on one stream: ingest as the questions come, every policy answers each."""
    tpf = adapter.tokens_per_frame
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"backend": backend}
    if where is not None:
        kwargs.update(path=str(where), backend_options=backend_options or None)
    base = Session(model=adapter, config=group[0].config, progress=False, **kwargs)
    # a group that reads no memory (no_memory) needs none: one frame, so that a question can be asked
    floor = all(p.budget == 0 for p in group)
    try:
        sessions = {p.name: (base if i == 0 else base.fork(config=p.config)) for i, p in enumerate(group)}
        fed, ingest = 0, 0.0
        bar = _bar(stream.num_frames, f"{m:g} min, seed {sd}: {', '.join(sessions)}", progress)
        for q in qs:
            if floor and fed == 0:
                base.feed(stream.frames(0, 1), timestamps=stream.timestamps[:1])
                fed = 1
            while not floor and fed <= q.ask_frame:
                stop = min(q.ask_frame + 1, fed + feed_batch)
                frames = stream.frames(fed, stop)
                t1 = time.perf_counter()
                base.feed(frames, timestamps=stream.timestamps[fed:stop])
                ingest += time.perf_counter() - t1
                bar.update(stop - fed)
                fed = stop
            for p in group:
                if p.full_context and fed * tpf > full_context_max_tokens:
                    continue
                s = sessions[p.name]
                t1 = time.perf_counter()
                ans = s.ask(q.text, max_new_tokens=max_new_tokens)
                records.append(Record(p.name, m, q, ans.text, score(ans.text, q.answer), ans.kv_tokens,
                                      time.perf_counter() - t1, ans.levels(), evidence_share(ans, q), sd,
                                      ans.kv_tokens - s.prefix.length, evidence_by_level(ans, q)))
        bar.close()
        stored = base.stats()["bytes"]
    finally:
        base.close()
    what = "no memory read: one frame fed" if floor else f"ingest {ingest:.1f} s ({fed / max(ingest, 1e-9):.0f} frames/s)"
    log(f"{m:>8g} min  seed {sd}  group {', '.join(p.name for p in group)}: {what}, "
        f"total {time.perf_counter() - t0:.1f} s")
    return {"ingest_seconds": None if floor else ingest, "frames": fed, "stored_bytes": stored, "floor": floor}


def evidence_share(answer: Any, question: Any) -> float:
    """Share of the answer's retrieved visual KV tokens whose frames overlap the question's
    evidence frames (``[evidence_start, evidence_end)``); 0 when nothing was retrieved.

    A block that only some layers read (per-layer retrieval) counts in proportion to them."""
    total = inside = 0.0
    for b in answer.blocks:
        w = b.tokens * (getattr(b, "layer_share", 1.0) or 0.0)
        total += w
        if b.frame_start < question.evidence_end and b.frame_end > question.evidence_start:
            inside += w
    return inside / total if total else 0.0


def evidence_by_level(answer: Any, question: Any) -> dict[str, float]:
    """:func:`evidence_share` of each level's retrieved blocks alone (levels that retrieved nothing left out)."""
    out = {}
    for level in dict.fromkeys(b.level for b in answer.blocks):
        out[level] = evidence_share(type("A", (), {"blocks": [b for b in answer.blocks if b.level == level]})(),
                                    question)
    return out


@dataclass
class _Span:
    evidence_start: int
    evidence_end: int


def scene_on_grid(start: int, end: int, config: MukvConfig, num_frames: int) -> tuple[int, int]:
    """Frames ``[start, end)`` widened to the block grid of a stream whose memory starts at frame 0:
    the frames of every block of ``config``'s levels that holds one of them (the grid of the least
    common multiple of the levels' windows), cut at the stream's ``num_frames``."""
    grid = math.lcm(*(int(lv.frames) for lv in config.levels))
    return (start // grid) * grid, min(num_frames, -(-end // grid) * grid)


def _oracle_records(adapter: Any, config: MukvConfig, stream: Any, qs: Sequence[Any], minutes: float, seed: int,
                    max_new_tokens: int, on_grid: bool = False) -> list[Record]:
    from ..session import Session

    out = []
    for q in qs:
        t1 = time.perf_counter()
        a, b = (scene_on_grid(q.evidence_start, q.evidence_end, config, stream.num_frames) if on_grid
                else (q.evidence_start, q.evidence_end))
        with Session(model=adapter, config=config) as s:
            s.feed(stream.frames(a, b), timestamps=stream.timestamps[a:b])
            ans = s.ask(q.text, max_new_tokens=max_new_tokens)
            prefix = s.prefix.length
        own = _Span(q.evidence_start - a, q.evidence_end - a)  # the session's frames count from its first
        out.append(Record(ORACLE_BLOCKS if on_grid else ORACLE, minutes, q, ans.text, score(ans.text, q.answer),
                          ans.kv_tokens,
                          time.perf_counter() - t1, ans.levels(), evidence_share(ans, own), seed,
                          ans.kv_tokens - prefix))
    return out


def _retrieval_by(mine: list[Record], key) -> dict[str, dict[str, float]]:
    out: dict[str, list[Record]] = {}
    for r in mine:
        out.setdefault(key(r), []).append(r)
    return {k: {"n": len(v), "evidence_share": sum(r.evidence_share for r in v) / len(v),
                "evidence_hit": sum(r.evidence_share > 0 for r in v) / len(v),
                "accuracy": sum(r.correct for r in v) / len(v)} for k, v in out.items()}


def _by_memory_level(mine: list[Record]) -> dict[str, dict[str, float]]:
    """Per level of the memory: over the questions it retrieved blocks for, the evidence share of its
    tokens, the share of questions one of its blocks reached the scene, and that by question depth."""
    levels = sorted({lv for r in mine for lv in r.evidence_by_level})
    out = {}
    for lv in levels:
        rows = [r for r in mine if lv in r.evidence_by_level]
        by_depth: dict[str, list[float]] = {}
        for r in rows:
            by_depth.setdefault(_depth_bucket(float(r.question.depth_s)), []).append(float(r.evidence_by_level[lv] > 0))
        out[lv] = {"n": len(rows), "evidence_share": sum(r.evidence_by_level[lv] for r in rows) / len(rows),
                   "evidence_hit": sum(r.evidence_by_level[lv] > 0 for r in rows) / len(rows),
                   "evidence_hit_by_depth": {d: sum(v) / len(v) for d, v in by_depth.items()}}
    return out


def _by_seed(mine: list[Record], value) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in mine:
        out.setdefault(r.seed, []).append(float(value(r)))
    return out


def _run_summary(p: PolicyPlan, m: float, seeds: list[int], records: list[Record],
                 info: dict[tuple[float, int, int], dict[str, float]], group: int) -> dict[str, Any]:
    mine = [r for r in records if r.policy == p.name and r.minutes == m]
    if not mine:
        return {"policy": p.name, "minutes": m, "skipped": "stream does not fit in full context"}
    rep = accuracy_report([(r.question, r.prediction) for r in mine])
    acc = bootstrap_interval(_by_seed(mine, lambda r: r.correct))
    share = bootstrap_interval(_by_seed(mine, lambda r: r.evidence_share))
    hit = bootstrap_interval(_by_seed(mine, lambda r: r.evidence_share > 0))
    toks = [r.retrieved_tokens for r in mine]
    realised = sum(toks) / len(toks)
    budget = p.budget
    flag = bool(budget is not None and (abs(realised - budget) > BUDGET_TOLERANCE * budget if budget
                                        else realised > 0))
    ing = [info[(m, s, group)] for s in seeds if (m, s, group) in info and not info[(m, s, group)].get("floor")]
    ingest = sum(i["ingest_seconds"] for i in ing) / len(ing) if ing else None
    frames = sum(i["frames"] for i in ing) / len(ing) if ing else None
    return {
        "policy": p.name, "minutes": m, "questions": len(mine), "seeds": sorted({r.seed for r in mine}),
        "accuracy": acc.mean, "accuracy_ci": [acc.low, acc.high],
        "by_kind": rep["by_kind"], "by_level": rep["by_level"], "by_depth": rep.get("by_depth", {}),
        "kv_tokens": sum(r.kv_tokens for r in mine) / len(mine),
        "retrieved_tokens": realised, "retrieved_tokens_min": min(toks), "retrieved_tokens_max": max(toks),
        "budget": budget, "budget_ratio": (realised / budget) if budget else None, "budget_flag": flag,
        "evidence_share": share.mean, "evidence_share_ci": [share.low, share.high],
        "evidence_hit": hit.mean, "evidence_hit_ci": [hit.low, hit.high],
        "retrieval_by_level": _retrieval_by(mine, lambda r: r.question.level),
        "retrieval_by_depth": _retrieval_by(mine, lambda r: _depth_bucket(float(r.question.depth_s))),
        "retrieval_by_memory_level": _by_memory_level(mine),
        "stored_bytes_per_minute": (sum(i["stored_bytes"] for i in ing) / len(ing) / m) if ing and p.name not in ORACLES
        else None,
        "ingest_seconds": ingest if p.name not in ORACLES else None,
        "ingest_frames_per_second": (frames / ingest) if ingest else None,
        "answer_seconds": sum(r.seconds for r in mine) / len(mine),
    }


def differences(records: list[Record], reference: str, names: Sequence[str],
                minutes: Sequence[float]) -> list[dict[str, Any]]:
    """Per policy and length, the paired difference in accuracy from ``reference`` with its interval."""

    def table(name: str, m: float) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for r in records:
            if r.policy == name and r.minutes == m:
                out.setdefault(r.seed, {})[r.question.id] = float(r.correct)
        return out

    out = []
    for m in minutes:
        ref = table(reference, m)
        if not ref:
            continue
        for name in names:
            if name == reference:
                continue
            mine = table(name, m)
            if not mine:
                continue
            iv = paired_interval(mine, ref)
            out.append({"policy": name, "reference": reference, "minutes": m, **iv.to_dict()})
    return out


def _record_dict(r: Record) -> dict[str, Any]:
    q = r.question
    return {"policy": r.policy, "minutes": r.minutes, "seed": r.seed, "id": q.id, "kind": q.kind, "level": q.level,
            "depth_s": q.depth_s, "answer": q.answer, "prediction": r.prediction, "correct": r.correct,
            "kv_tokens": r.kv_tokens, "retrieved_tokens": r.retrieved_tokens, "seconds": r.seconds,
            "levels": r.levels, "evidence_share": r.evidence_share, "evidence_by_level": r.evidence_by_level}


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _NoBar:
    def update(self, n): ...
    def close(self): ...


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="frame", leave=False)


def build_parser() -> argparse.ArgumentParser:
    from ..cli.common import OneLineParser

    p = OneLineParser(prog="mukv bench",
                      description="Answer accuracy of every policy against stream length, with 95% "
                                  "intervals over seeds and questions.")
    p.add_argument("--model", default="mukv-tiny", help="preset name or checkpoint directory (default mukv-tiny)")
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 10], help="stream lengths in minutes")
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES),
                   help="policies to compare: registered names, no_memory, or NAME@SCALE (the policy at SCALE "
                        "times the shared budget, e.g. rekv@1.5)")
    p.add_argument("--questions", type=int, default=24, help="questions per stream (at most 240)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, nargs="+", default=None,
                       help="benchmark seeds: one stream per seed and length (default: 0)")
    seeds.add_argument("--seed", type=int, default=None, help="one benchmark seed (same as --seeds N)")
    p.add_argument("--fps", type=float, default=0.5)
    p.add_argument("--budget-tokens", type=int, default=None, help="KV tokens at answer time (default MuKV's)")
    p.add_argument("--full-context-max-tokens", type=int, default=32768)
    p.add_argument("--top-k", default=None, metavar="LEVEL=K,...",
                   help="blocks MuKV retrieves per level, e.g. segment=4 (default: the model's levels); "
                   "the shared budget follows")
    p.add_argument("--config", default=None, metavar="JSON",
                   help="configuration fields applied over every policy (a JSON object or file)")
    p.add_argument("--policy-config", action="append", default=[], metavar="NAME=JSON",
                   help="configuration fields applied over one policy (repeatable)")
    p.add_argument("--reference", default=None,
                   help="policy the others are compared with per question (default: rekv when it runs)")
    p.add_argument("--backend", default="memory", help="storage backend: memory (default) or lancedb")
    p.add_argument("--store-path", default=None,
                   help="folder (empty or absent) for the disk backend's stores, one per stream and storage group")
    p.add_argument("--backend-options", default=None, metavar="JSON",
                   help='options of the backend, e.g. {"hot_bytes": 268435456}')
    p.add_argument("--keep-stores", action="store_true", help="leave the disk stores in place")
    p.add_argument("--kv-codec", default=None, metavar="CODEC",
                   help='KV codec every policy stores with: a name (none, int8, int4, fp8) or JSON such as '
                   '\'{"name": "int4", "group_size": 32}\' (default: each policy\'s own, "none")')
    p.add_argument("--out", default=None, help="folder for results.json, results.md and accuracy.png")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's); 1 is fastest on a shared or busy machine")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--oracle", action="store_true",
                   help="also answer each question from its own scene only (row oracle_scene): reading vs finding")
    p.add_argument("--oracle-blocks", action="store_true",
                   help="also answer each question from the blocks its scene is stored in, the scene widened to the "
                   "stream's block grid (row oracle_blocks): what the memory reads when it finds perfectly")
    return p


def _json_arg(raw: str | None, flag: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    text = raw
    if not raw.lstrip().startswith("{"):
        path = Path(raw)
        if not path.is_file():
            raise SystemExit(f"{flag}: {raw!r} is neither a JSON object nor a JSON file")
        text = path.read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{flag}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict):
        raise SystemExit(f"{flag}: expected a JSON object; got {type(value).__name__}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.policies = [_json_arg(p, "--policies") if p.lstrip().startswith("{") else p for p in args.policies]
    model = _json_arg(args.model, "--model") if args.model.lstrip().startswith("{") else args.model
    top_k = None
    if args.top_k:
        try:
            top_k = {k.strip(): int(v) for k, v in (kv.split("=") for kv in args.top_k.split(","))}
        except ValueError:
            raise SystemExit(f"--top-k takes LEVEL=K pairs separated by commas, e.g. segment=4; got {args.top_k!r}")
    seeds = args.seeds if args.seeds is not None else [args.seed if args.seed is not None else 0]
    config = _json_arg(args.config, "--config")
    per_policy: dict[str, dict[str, Any]] = {}
    for item in args.policy_config:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--policy-config takes NAME=JSON; got {item!r}")
        per_policy[name] = _json_arg(raw, f"--policy-config {name}") or {}
    backend_options = _json_arg(args.backend_options, "--backend-options")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1; got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    for m in args.minutes:
        if not math.isfinite(m) or m <= 0:
            raise SystemExit(f"--minutes must be positive; got {m}")
        for sd in seeds:
            try:  # the benchmark's own limits (questions per stream length), before any model loads
                Benchmark.generate(seed=sd, minutes=m, fps=args.fps, questions=args.questions)
            except ValueError as exc:
                raise SystemExit(f"--minutes {m:g} with --questions {args.questions}: {exc}") from None
    kv_codec = args.kv_codec
    if kv_codec is not None and kv_codec.strip().startswith("{"):
        try:
            kv_codec = json.loads(kv_codec)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--kv-codec: not JSON ({exc})") from None
    try:  # every policy, configuration and codec, before any model loads
        plan_policies(args.policies, 196, args.budget_tokens, None, config, per_policy)
        if kv_codec is not None:
            from ..kvcodec import build_codec

            build_codec(kv_codec, field="--kv-codec")
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    t0 = time.perf_counter()
    try:
        res = evaluate(model, args.minutes, args.policies, args.questions, fps=args.fps,
                       budget_tokens=args.budget_tokens, full_context_max_tokens=args.full_context_max_tokens,
                       progress=args.progress, oracle=args.oracle, oracle_blocks=args.oracle_blocks, top_k=top_k,
                       seeds=seeds, config=config,
                       policy_config=per_policy, backend=args.backend, store_path=args.store_path,
                       backend_options=backend_options, keep_stores=args.keep_stores, reference=args.reference,
                       argv=argv, kv_codec=kv_codec)
    except ConfigError as exc:
        raise SystemExit(f"--top-k: {exc}" if top_k and "top-k" in str(exc) else str(exc)) from None
    except MukvError as exc:
        raise SystemExit(str(exc)) from None
    res["settings"]["seconds"] = time.perf_counter() - t0
    md = markdown(res)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "results.md").write_text(md)
        plot(res, out / "accuracy.png")
        print(f"wrote {out}/results.json, results.md, accuracy.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
