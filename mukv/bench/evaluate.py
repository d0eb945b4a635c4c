"""The evaluation harness: every policy on the same streams, at the same KV budget.

For each stream length a :class:`~mukv.bench.Benchmark` is generated; its
questions are asked in stream order, each one as soon as its ``ask_frame`` has
been fed, so a question only sees the past. Policies that store the same blocks
(the frame-block baselines all store ReKV-style frames) share one ingest
through :meth:`mukv.Session.fork` and differ only in retrieval.

Every policy answers from the same number of KV tokens: the budget is MuKV's at
its defaults (top-k 20/32/12 over 49/196/784-token blocks kept at 0.1/0.1/0.8,
about 8.2K tokens for 196 tokens per frame), or at the model's own levels where its
checkpoint has them (``mukv_config.json``; mukv-tiny: 7/49/196-token blocks, about 2K
tokens), unless ``budget_tokens`` says otherwise; frame-block baselines get
``budget // tokens_per_frame`` frames. MuKV's variants run at the model's levels too.
Full context takes every frame and runs only while the stream fits in
``full_context_max_tokens``. "no_memory" answers from the question alone (a
text-only floor).

Command::

    python -m mukv.bench.evaluate --model mukv-tiny --minutes 1 10 60 --questions 24 --out runs/eval
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import MukvConfig
from ..errors import ConfigError
from .dataset import Benchmark
from .questions import accuracy_report, score

DEFAULT_POLICIES = ("mukv", "mukv_spatial", "mukv_time", "mukv_timeline", "mukv_hierarchical", "rekv", "uniform",
                    "sliding_window", "full_context", "no_memory")


@dataclass
class PolicyPlan:
    """A policy as run by the harness: its name, configuration and what it stores."""

    name: str
    config: MukvConfig
    full_context: bool = False

    def storage_key(self) -> str:
        levels = [lv.model_dump(exclude={"top_k", "rerank_weight"}) for lv in self.config.levels]
        parts = {"levels": levels, "scoring": self.config.scoring.model_dump(),
                 "compression": self.config.compression.model_dump(), "stream": self.config.stream.model_dump(),
                 "kv_codec": self.config.kv_codec}
        return json.dumps(parts, sort_keys=True)


def mukv_budget(config: MukvConfig, tokens_per_frame: int) -> int:
    """KV tokens a configuration retrieves at its top-k (system prompt excluded)."""
    from ..interfaces import Compressor

    total = 0
    for lv in config.levels:
        length = lv.tokens if lv.tokens is not None else lv.frames * tokens_per_frame
        total += lv.top_k * Compressor.kept_count(lv, length)
    return total


def plan_policies(names: Sequence[Any], tokens_per_frame: int, budget_tokens: int | None = None,
                  model_defaults: dict[str, Any] | None = None,
                  overrides: dict[str, Any] | None = None) -> list[PolicyPlan]:
    """Configurations of the policies at one shared KV budget (default: MuKV's at the
    model's own levels, ``model_defaults``, where it has them). A policy is a name or a name
    with settings (``{"name": "rekv", "top_k": 32}``); ``overrides`` (configuration fields)
    go over every policy's configuration, after the budget."""
    budget = (budget_tokens if budget_tokens is not None
              else mukv_budget(MukvConfig.build(model_defaults), tokens_per_frame))
    plans = []
    for spec in names:
        name = spec if isinstance(spec, str) else str(spec.get("name"))
        if name == "no_memory":
            cfg = MukvConfig.from_policy("rekv").replace(
                levels=[{"name": "frame", "extractor": "frame", "keep_ratio": 1.0, "top_k": 0}])
            plans.append(PolicyPlan(name, cfg))
            continue
        cfg = MukvConfig.from_policy(spec, under=model_defaults)
        levels = cfg.levels
        if name == "full_context":
            plans.append(PolicyPlan(name, cfg, full_context=True))
            continue
        if len(levels) == 1 and levels[0].keep_ratio == 1.0:  # a frame-block baseline
            lv = levels[0]
            k = max(1, budget // (lv.frames * tokens_per_frame))
            cfg = cfg.replace(levels=[{**lv.model_dump(), "top_k": k}])
        plans.append(PolicyPlan(name, cfg))
    if overrides:
        plans = [PolicyPlan(p.name, p.config.replace(**overrides), p.full_context) for p in plans]
    return plans


def with_top_k(defaults: dict[str, Any], top_k: dict[str, int] | None) -> dict[str, Any]:
    """``defaults`` (a model's configuration fields) with MuKV's per-level top-k replaced.

    Raises:
        ConfigError: a level name that the levels do not have, or a negative top-k.
    """
    if not top_k:
        return defaults
    levels = [dict(lv) for lv in (defaults.get("levels")
                                  or MukvConfig.build().model_dump(mode="json")["levels"])]
    names = [lv["name"] for lv in levels]
    unknown = sorted(set(top_k) - set(names))
    if unknown:
        raise ConfigError(f"top-k for unknown level(s) {unknown}; the levels are {names}")
    for lv in levels:
        if lv["name"] in top_k:
            if int(top_k[lv["name"]]) < 0:
                raise ConfigError(f"top-k of level {lv['name']!r} must be >= 0; got {top_k[lv['name']]}")
            lv["top_k"] = int(top_k[lv["name"]])
    return {**defaults, "levels": levels}


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
    top_k: dict[str, int] | None = None,
    config: dict[str, Any] | None = None,
    kv_codec: str | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every policy on a stream of each length; return the results dict.

    Args:
        model: a model adapter or a preset name (loaded once, shared by every session).
        minutes: stream lengths (stream time).
        policies: registered policy names, plus "no_memory".
        questions: questions per stream.
        seed: benchmark seed (the same streams for every policy).
        fps: sampling rate of the streams.
        budget_tokens: KV tokens at answer time for every policy (default MuKV's).
        full_context_max_tokens: full context runs while frames x tokens fit.
        max_new_tokens: decoding budget per answer (answers are one word).
        feed_batch: frames per ``feed`` call.
        progress: show progress bars.
        log: where progress lines go.
        top_k: blocks MuKV retrieves per level, by level name, over the model's own levels (or
            mukv's defaults); the shared budget follows (unless ``budget_tokens`` is given).
        oracle: also report "oracle": each question asked of a fresh session fed only
            its own scene's frames (the context-complete clip), with the first policy's configuration.
            It separates reading (the model) from finding (the memory policy).
        config: configuration fields applied over every policy's configuration.
        kv_codec: the KV codec every policy stores with (``MukvConfig.kv_codec``: a name or
            ``{"name": ..., **settings}``); ``None``: each policy's own (default "none").

    Returns:
        ``{"runs": [...], "records": [...], "settings": {...}}`` where each run
        holds a policy's accuracy report at one stream length, its mean KV
        tokens at answer time and the bytes it stores per minute of stream.
    """
    from ..session import Session, load_model

    adapter = load_model(model, _device(), None)
    tpf = adapter.tokens_per_frame
    defaults = with_top_k(getattr(adapter, "default_config", None) or {}, top_k)
    plans = plan_policies(policies, tpf, budget_tokens, defaults, config)
    if kv_codec is not None:
        plans = [PolicyPlan(p.name, p.config.replace(kv_codec=kv_codec), p.full_context) for p in plans]
    groups: dict[str, list[PolicyPlan]] = {}
    for p in plans:
        groups.setdefault(p.storage_key(), []).append(p)
    records: list[Record] = []
    runs: list[dict[str, Any]] = []
    groups_list = list(groups.values())
    for m in minutes:
        bench = Benchmark.generate(seed=seed, minutes=m, fps=fps, questions=questions)
        stream = bench.stream
        qs = sorted(bench.questions, key=lambda q: (q.ask_frame, q.id))
        for group in groups_list:
            t0 = time.perf_counter()
            base = Session(model=adapter, config=group[0].config, progress=False)
            sessions = {p.name: (base if i == 0 else base.fork(config=p.config)) for i, p in enumerate(group)}
            fed = 0
            bar = _bar(stream.num_frames, f"{m:g} min: {', '.join(sessions)}", progress)
            for q in qs:
                while fed <= q.ask_frame:
                    stop = min(q.ask_frame + 1, fed + feed_batch)
                    base.feed(stream.frames(fed, stop), timestamps=stream.timestamps[fed:stop])
                    bar.update(stop - fed)
                    fed = stop
                for p in group:
                    if p.full_context and fed * tpf > full_context_max_tokens:
                        continue
                    t1 = time.perf_counter()
                    ans = sessions[p.name].ask(q.text, max_new_tokens=max_new_tokens)
                    records.append(Record(p.name, m, q, ans.text, score(ans.text, q.answer), ans.kv_tokens,
                                          time.perf_counter() - t1, ans.levels(), evidence_share(ans, q)))
            bar.close()
            if oracle and group is groups_list[0]:
                records += _oracle_records(adapter, group[0].config, stream, qs, m, max_new_tokens)
            stored = base.stats()
            for p in group + ([PolicyPlan(ORACLE, group[0].config)] if oracle and group is groups_list[0] else []):
                mine = [r for r in records if r.policy == p.name and r.minutes == m]
                if not mine:
                    runs.append({"policy": p.name, "minutes": m, "skipped": "stream does not fit in full context"})
                    continue
                rep = accuracy_report([(r.question, r.prediction) for r in mine])
                runs.append({
                    "policy": p.name, "minutes": m, "questions": len(mine), "accuracy": rep["overall"],
                    "by_kind": rep["by_kind"], "by_level": rep["by_level"], "by_depth": rep.get("by_depth", {}),
                    "kv_tokens": sum(r.kv_tokens for r in mine) / len(mine),
                    "evidence_share": sum(r.evidence_share for r in mine) / len(mine),
                    "evidence_hit": sum(r.evidence_share > 0 for r in mine) / len(mine),
                    "stored_bytes_per_minute": stored["bytes"] / m,
                    "answer_seconds": sum(r.seconds for r in mine) / len(mine),
                })
                log(f"{m:>8g} min  {p.name:<15} acc {rep['overall']:.3f}  kv {runs[-1]['kv_tokens']:>8.0f}  "
                    f"evidence {runs[-1]['evidence_share']:.2f}  "
                    f"stored {runs[-1]['stored_bytes_per_minute'] / 2**20:8.2f} MiB/min")
            log(f"{m:>8g} min  group {', '.join(sessions)} took {time.perf_counter() - t0:.1f} s")
            base.close()
    settings = {"minutes": list(minutes), "policies": list(policies), "questions": questions, "seed": seed,
                "fps": fps, "tokens_per_frame": tpf, "model": getattr(adapter, "name", str(model)),
                "budget_tokens": (budget_tokens if budget_tokens is not None
                                  else mukv_budget(MukvConfig.build(defaults), tpf)),
                "full_context_max_tokens": full_context_max_tokens, "top_k": top_k, "config": config,
                "kv_codec": plans[0].config.kv_codec if plans else kv_codec}
    return {"settings": settings, "runs": runs, "records": [_record_dict(r) for r in records]}


#: Name of the oracle row: each question answered from its own scene only.
ORACLE = "oracle_scene"


def evidence_share(answer: Any, question: Any) -> float:
    """Share of the answer's retrieved visual KV tokens whose frames overlap the question's
    evidence frames (``[evidence_start, evidence_end)``); 0 when nothing was retrieved."""
    total = inside = 0
    for b in answer.blocks:
        total += b.tokens
        if b.frame_start < question.evidence_end and b.frame_end > question.evidence_start:
            inside += b.tokens
    return inside / total if total else 0.0


@dataclass
class _Span:
    evidence_start: int
    evidence_end: int


def _oracle_records(adapter: Any, config: MukvConfig, stream: Any, qs: Sequence[Any], minutes: float,
                    max_new_tokens: int) -> list[Record]:
    from ..session import Session

    out = []
    for q in qs:
        t1 = time.perf_counter()
        with Session(model=adapter, config=config) as s:
            s.feed(stream.frames(q.evidence_start, q.evidence_end),
                   timestamps=stream.timestamps[q.evidence_start:q.evidence_end])
            ans = s.ask(q.text, max_new_tokens=max_new_tokens)
        own = _Span(0, q.evidence_end - q.evidence_start)  # the session's frames count from the scene's first
        out.append(Record(ORACLE, minutes, q, ans.text, score(ans.text, q.answer), ans.kv_tokens,
                          time.perf_counter() - t1, ans.levels(), evidence_share(ans, own)))
    return out


def _record_dict(r: Record) -> dict[str, Any]:
    q = r.question
    return {"policy": r.policy, "minutes": r.minutes, "id": q.id, "kind": q.kind, "level": q.level,
            "depth_s": q.depth_s, "answer": q.answer, "prediction": r.prediction, "correct": r.correct,
            "kv_tokens": r.kv_tokens, "seconds": r.seconds, "levels": r.levels, "evidence_share": r.evidence_share}


def markdown(results: dict[str, Any]) -> str:
    """Tables: accuracy per policy and stream length; per kind at each length."""
    runs = [r for r in results["runs"] if "accuracy" in r]
    mins = sorted({r["minutes"] for r in results["runs"]})
    pols = list(dict.fromkeys(r["policy"] for r in results["runs"]))
    acc = {(r["policy"], r["minutes"]): r for r in runs}
    s = results["settings"]
    codec = s.get("kv_codec") or "none"
    out = [f"Model `{s['model']}`, {s['questions']} questions per stream, seed {s['seed']}, {s['fps']} fps, "
           f"KV budget {s['budget_tokens']} tokens ({s['tokens_per_frame']} tokens per frame), KV codec "
           f"`{json.dumps(codec) if isinstance(codec, dict) else codec}`.", "",
           "| policy | " + " | ".join(f"{m:g} min" for m in mins) + " | KV tokens | evidence share | stored MiB/min |",
           "|---|" + "---|" * len(mins) + "---|---|---|"]
    for p in pols:
        cells = [f"{acc[(p, m)]['accuracy']:.3f}" if (p, m) in acc else "n/a" for m in mins]
        mine = [acc[(p, m)] for m in mins if (p, m) in acc]
        kv = sum(r["kv_tokens"] for r in mine) / max(1, len(mine))
        mib = sum(r["stored_bytes_per_minute"] for r in mine) / max(1, len(mine)) / 2**20
        ev = sum(r.get("evidence_share", 0.0) for r in mine) / max(1, len(mine))
        out.append(f"| {p} | " + " | ".join(cells) + f" | {kv:.0f} | {ev:.2f} | {mib:.2f} |")
    kinds = sorted({k for r in runs for k in r["by_kind"]})
    for m in mins:
        out += ["", f"Accuracy per question kind, {m:g} min of stream:", "",
                "| policy | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for p in pols:
            if (p, m) not in acc:
                continue
            bk = acc[(p, m)]["by_kind"]
            out.append(f"| {p} | " + " | ".join(_fmt(bk.get(k)) for k in kinds) + " |")
    return "\n".join(out) + "\n"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return f"{v.get('accuracy', 0):.2f} ({v.get('n', v.get('count', '?'))})"
    return f"{v:.2f}"


def plot(results: dict[str, Any], path: str | Path) -> Path:
    """PNG: accuracy against stream length, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for p in dict.fromkeys(r["policy"] for r in runs):
        pts = sorted((r["minutes"], r["accuracy"]) for r in runs if r["policy"] == p)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
    ax.set_xscale("log")
    ax.set_xlabel("stream length (minutes of stream time)")
    ax.set_ylabel("accuracy (exact match)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"Answer accuracy vs stream length ({results['settings']['model']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


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
                                description="Answer accuracy of every policy against stream length.")
    p.add_argument("--model", default="mukv-tiny", help="preset name or checkpoint directory (default mukv-tiny)")
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 10], help="stream lengths in minutes")
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES), help="policies to compare")
    p.add_argument("--questions", type=int, default=24, help="questions per stream (at most 240)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=0.5)
    p.add_argument("--budget-tokens", type=int, default=None, help="KV tokens at answer time (default MuKV's)")
    p.add_argument("--full-context-max-tokens", type=int, default=32768)
    p.add_argument("--top-k", default=None, metavar="LEVEL=K,...",
                   help="blocks MuKV retrieves per level, e.g. segment=4 (default: the model's levels); "
                   "the shared budget follows")
    p.add_argument("--kv-codec", default=None, metavar="CODEC",
                   help='KV codec every policy stores with: a name (none, int8, int4, fp8) or JSON such as '
                   '\'{"name": "int4", "group_size": 32}\' (default: each policy\'s own, "none")')
    p.add_argument("--out", default=None, help="folder for results.json, results.md and accuracy.png")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--oracle", action="store_true",
                   help="also answer each question from its own scene only (row oracle_scene): reading vs finding")
    p.add_argument("--config", default=None, metavar="JSON",
                   help="configuration fields (a JSON object) applied over every policy's configuration")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = _json_arg(args.config, "--config") if args.config else None
    if config is not None and not isinstance(config, dict):
        raise SystemExit("--config takes a JSON object of configuration fields")
    args.policies = [_json_arg(p, "--policies") if p.lstrip().startswith("{") else p for p in args.policies]
    model = _json_arg(args.model, "--model") if args.model.lstrip().startswith("{") else args.model
    top_k = None
    if args.top_k:
        try:
            top_k = {k.strip(): int(v) for k, v in (kv.split("=") for kv in args.top_k.split(","))}
        except ValueError:
            raise SystemExit(f"--top-k takes LEVEL=K pairs separated by commas, e.g. segment=4; got {args.top_k!r}")
    for m in args.minutes:
        if not math.isfinite(m) or m <= 0:
            raise SystemExit(f"--minutes must be positive; got {m}")
        try:  # the benchmark's own limits (questions per stream length), before any model loads
            Benchmark.generate(seed=args.seed, minutes=m, fps=args.fps, questions=args.questions)
        except ValueError as exc:
            raise SystemExit(f"--minutes {m:g} with --questions {args.questions}: {exc}") from None
    kv_codec = args.kv_codec
    if kv_codec is not None and kv_codec.strip().startswith("{"):
        try:
            kv_codec = json.loads(kv_codec)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--kv-codec: not JSON ({exc})") from None
    if kv_codec is not None:
        try:  # the codec exists and its settings are valid, before any model loads
            from ..kvcodec import build_codec

            build_codec(kv_codec, field="--kv-codec")
        except ConfigError as exc:
            raise SystemExit(str(exc)) from None
    t0 = time.perf_counter()
    try:
        res = evaluate(model, args.minutes, args.policies, args.questions, args.seed, args.fps,
                       args.budget_tokens, args.full_context_max_tokens, progress=args.progress, oracle=args.oracle,
                       top_k=top_k, config=config, kv_codec=kv_codec)
    except ConfigError as exc:
        raise SystemExit(f"--top-k: {exc}" if top_k and "top-k" in str(exc) else str(exc)) from None
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


def _json_arg(text: str, flag: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{flag}: invalid JSON ({exc.msg})") from None


if __name__ == "__main__":
    raise SystemExit(main())
