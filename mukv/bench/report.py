"""The harness's tables (results.md) and plot (accuracy.png), from its results dict.

Every accuracy is the mean over all questions of all seeds with its 95%
bootstrap interval (:mod:`mukv.bench.stats`) as ``mean [low, high]``; a cell
whose realised KV tokens are more than 5% off its policy's budget is marked
``†``.
"""

from __future__ import annotations

import json

import math
from pathlib import Path
from typing import Any

from .questions import DEPTH_BUCKETS

FLAG = "†"


def _cell(run: dict[str, Any], key: str = "accuracy", digits: int = 2) -> str:
    ci = run.get(f"{key}_ci")
    v = run.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if ci and ci[0] is not None and not math.isnan(ci[0]):
        return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return f"{v:.{digits}f}"


def _index(results: dict[str, Any]) -> tuple[list[float], list[str], dict[tuple[str, float], dict]]:
    runs = results["runs"]
    mins = sorted({r["minutes"] for r in runs})
    pols = list(dict.fromkeys(r["policy"] for r in runs))
    return mins, pols, {(r["policy"], r["minutes"]): r for r in runs}


def header(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    prov = s.get("provenance") or {}
    model = prov.get("model") or {}
    git = prov.get("git") or {}
    sha = (model.get("checkpoint_sha256") or "")[:12]
    commit = (git.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    seeds = s.get("seeds", [s.get("seed")])
    lines = [
        f"Model `{s['model']}` (weights sha256 {sha or 'n/a'}), seeds {', '.join(map(str, seeds))}, "
        f"{s['questions']} questions per stream, {s['fps']} fps, shared KV budget {s['budget_tokens']} tokens "
        f"({s['tokens_per_frame']} tokens per frame), backend `{s.get('backend', 'memory')}`, KV codec "
        f"`{json.dumps(s.get('kv_codec') or 'none') if isinstance(s.get('kv_codec'), dict) else s.get('kv_codec') or 'none'}`.",
        f"mukv {prov.get('mukv_version', '?')} at commit {commit}; {prov.get('device', '?')}; "
        f"torch {prov.get('torch', '?')}, transformers {prov.get('transformers', '?')}.",
        "",
        "Accuracy: mean over every question of every seed, with its 95% bootstrap interval (seeds, then "
        f"questions, resampled). {FLAG}: the cell's realised KV tokens per answer are more than 5% off the "
        "policy's budget.",
    ]
    return lines


def markdown(results: dict[str, Any]) -> str:
    """results.md: accuracy with intervals, differences, budgets, retrieval, time, kinds."""
    mins, pols, acc = _index(results)
    s = results["settings"]
    out = header(results) + [""]
    out += ["| policy | " + " | ".join(f"{m:g} min" for m in mins) + " | KV tokens read (budget) |",
            "|---|" + "---|" * len(mins) + "---|"]
    for p in pols:
        cells, toks, budget = [], [], None
        for m in mins:
            r = acc.get((p, m))
            if r is None or "accuracy" not in r:
                cells.append(r.get("skipped", "n/a") if r else "n/a")
                continue
            cells.append(_cell(r) + (f" {FLAG}" if r.get("budget_flag") else ""))
            toks.append(r["retrieved_tokens"])
            budget = r.get("budget")
        tok = f"{sum(toks) / len(toks):.0f}" if toks else "-"
        out.append(f"| {p} | " + " | ".join(cells) + f" | {tok} ({'-' if budget is None else budget}) |")
    ref = s.get("reference")
    diffs = results.get("differences") or []
    if ref and diffs:
        out += ["", f"Difference from `{ref}` on the same questions (paired bootstrap, 95%):", "",
                "| policy | " + " | ".join(f"{m:g} min" for m in mins) + " |", "|---|" + "---|" * len(mins)]
        by = {(d["policy"], d["minutes"]): d for d in diffs}
        for p in pols:
            if p == ref or not any((p, m) in by for m in mins):
                continue
            cells = []
            for m in mins:
                d = by.get((p, m))
                cells.append("n/a" if d is None else f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]")
            out.append(f"| {p} | " + " | ".join(cells) + " |")
    out += ["", "Retrieval: evidence share (retrieved visual KV tokens inside the questioned scene) / scene reached "
            "(share of questions with at least one retrieved block in the scene), with 95% intervals:", "",
            "| policy | " + " | ".join(f"{m:g} min" for m in mins) + " |", "|---|" + "---|" * len(mins)]
    for p in pols:
        cells = []
        for m in mins:
            r = acc.get((p, m))
            cells.append("n/a" if r is None or "accuracy" not in r else
                         f"{_cell(r, 'evidence_share', 3)} / {_cell(r, 'evidence_hit')}")
        out.append(f"| {p} | " + " | ".join(cells) + " |")
    out += _memory_levels(acc, pols, mins)
    out += _breakdown(acc, pols, mins, "retrieval_by_level", "question level", ["patch", "frame", "segment"])
    out += _breakdown(acc, pols, mins, "retrieval_by_depth", "question depth", [b[0] for b in DEPTH_BUCKETS])
    out += ["", "Time and storage (means over seeds): ingest of the stream by the policy's storage group "
            "(shared by the policies that store the same blocks), seconds per answer, stored MiB per minute:", "",
            "| policy | " + " | ".join(f"{m:g} min" for m in mins) + " |", "|---|" + "---|" * len(mins)]
    for p in pols:
        cells = []
        for m in mins:
            r = acc.get((p, m))
            if r is None or "accuracy" not in r:
                cells.append("n/a")
                continue
            ing = r.get("ingest_seconds")
            fps = r.get("ingest_frames_per_second")
            ingest = "-" if ing is None else f"ingest {ing:.0f} s ({fps:.0f} frames/s)"
            mib = r.get("stored_bytes_per_minute")
            stored = "-" if mib is None else f"{mib / 2**20:.2f} MiB/min"
            cells.append(f"{ingest}, {r['answer_seconds']:.3f} s/answer, {stored}")
        out.append(f"| {p} | " + " | ".join(cells) + " |")
    kinds = sorted({k for r in acc.values() for k in r.get("by_kind", {})})
    for m in mins:
        out += ["", f"Accuracy per question kind, {m:g} min of stream (correct share, questions):", "",
                "| policy | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for p in pols:
            r = acc.get((p, m))
            if r is None or "by_kind" not in r:
                continue
            bk = r["by_kind"]
            out.append(f"| {p} | " + " | ".join(_fmt(bk.get(k)) for k in kinds) + " |")
    return "\n".join(out) + "\n"


def _memory_levels(acc: dict, pols: list[str], mins: list[float]) -> list[str]:
    depths = [b[0] for b in DEPTH_BUCKETS]
    rows = []
    for p in pols:
        for m in mins:
            r = acc.get((p, m))
            for lv, c in (r or {}).get("retrieval_by_memory_level", {}).items():
                per = c.get("evidence_hit_by_depth", {})
                rows.append(f"| {p} | {m:g} | {lv} | {c['evidence_share']:.3f} | {c['evidence_hit']:.2f} | "
                            + " | ".join(f"{per[d]:.2f}" if d in per else "-" for d in depths) + " |")
    if not rows:
        return []
    return ["", "Retrieval per level of the memory: the evidence share of that level's retrieved tokens, the share "
            "of questions one of its blocks reached the scene, and that by question depth:", "",
            "| policy | minutes | level | evidence share | scene reached | " + " | ".join(depths) + " |",
            "|---|---|---|---|---|" + "---|" * len(depths)] + rows


def _breakdown(acc: dict, pols: list[str], mins: list[float], key: str, what: str, order: list[str]) -> list[str]:
    names = [n for n in order if any(n in r.get(key, {}) for r in acc.values())]
    if not names:
        return []
    out = ["", f"Scene reached by {what} (share of its questions; questions in brackets):", "",
           "| policy | minutes | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for p in pols:
        for m in mins:
            r = acc.get((p, m))
            if r is None or key not in r:
                continue
            cells = []
            for n in names:
                c = r[key].get(n)
                cells.append("-" if c is None else f"{c['evidence_hit']:.2f} ({c['n']})")
            out.append(f"| {p} | {m:g} | " + " | ".join(cells) + " |")
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return f"{v.get('accuracy', 0):.2f} ({v.get('n', v.get('count', '?'))})"
    return f"{v:.2f}"


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def plot(results: dict[str, Any], path: str | Path) -> Path:
    """PNG: accuracy against stream length, one line per policy, 95% intervals as error bars.

    Each policy has its own marker, and the policies are spread a little along the
    (logarithmic) length axis so that markers and bars do not hide each other.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "accuracy" in r]
    pols = list(dict.fromkeys(r["policy"] for r in runs))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    mins = sorted({r["minutes"] for r in runs})
    gaps = [math.log10(b / a) for a, b in zip(mins, mins[1:])]
    # in log10 units between neighbouring policies: together they take at most half the gap between lengths
    spread = min(0.03, 0.5 * min(gaps) / max(1, len(pols) - 1)) if gaps else 0.03
    for i, p in enumerate(pols):
        pts = sorted((r["minutes"], r["accuracy"], r.get("accuracy_ci")) for r in runs if r["policy"] == p)
        shift = 10 ** ((i - (len(pols) - 1) / 2) * spread)
        xs = [x * shift for x, _, _ in pts]
        ys = [y for _, y, _ in pts]
        lo = [y - (ci[0] if ci else y) for _, y, ci in pts]
        hi = [(ci[1] if ci else y) - y for _, y, ci in pts]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker=MARKERS[i % len(MARKERS)], markersize=5, capsize=2.5,
                    linewidth=1.2, elinewidth=0.9, alpha=0.9, label=p)
    ax.set_xscale("log")
    ax.set_xticks(mins)
    ax.set_xticklabels([f"{m:g}" for m in mins])
    ax.minorticks_off()
    ax.set_xlabel("stream length (minutes of stream time)")
    ax.set_ylabel("accuracy (exact match), 95% interval")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    s = results["settings"]
    seeds = s.get("seeds", [s.get("seed")])
    ax.set_title(f"Answer accuracy vs stream length ({s['model']}, seeds {', '.join(map(str, seeds))})")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
