"""Answer accuracy per KV codec on mukv-tiny's held-out clips, with paired confidence intervals (issue 20).

    OMP_NUM_THREADS=1 python benchmarks/codec_clips.py --device cpu --out runs/codec-clips

Each codec answers the same held-out clips (``mukv.train.eval_clips(seed, per_kind)``, 1,100 at 100 per kind)
through the product path, one ``mukv.Session`` per clip (memory backend, policy ``mukv``, the clip's 8 frames
fed, the question asked), as ``benchmarks/train_tiny.py --eval-only --session mukv --session-config
'{"kv_codec": ...}'`` does. Reported per codec: accuracy per evidence level and overall, and the difference
to the first codec (``none``) with a 95% interval from a paired bootstrap over the clips (``--resamples``), and
how many clips each codec lost and won against it. Writes ``clips.json`` and ``clips.md`` to ``--out``.

On a shared CPU, ``OMP_NUM_THREADS=1`` is several times faster (the per-clip work is small).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec_bench import codec_list, label  # noqa: E402


def paired_interval(diff: list[int], resamples: int, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of ``diff`` (per-clip differences) by bootstrap over clips."""
    rng, n = random.Random(seed), len(diff)
    means = sorted(sum(diff[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def compared_row(name: str, results: dict, refs: tuple[str, ...], resamples: int) -> str:
    """A markdown row of ``results[name]`` (accuracy per level and overall) with its paired difference to each
    run of ``refs`` (95% interval; blank against itself or a run that is missing), recorded as ``vs_<ref>``."""
    r, cells = results[name], []
    for ref in refs:
        if ref == name or ref not in results:
            cells.append("")
            continue
        diff = [a - b for a, b in zip(r["correct"], results[ref]["correct"])]
        lo, hi = paired_interval(diff, resamples)
        r[f"vs_{ref}"] = [sum(diff) / len(diff), lo, hi]
        cells.append(f"{100 * sum(diff) / len(diff):+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
    by = r["report"]["by_level"]
    return (f"| {name} | " + " | ".join(f"{100 * by[lv]['accuracy']:.1f}" for lv in ("patch", "frame", "segment"))
            + f" | {100 * r['report']['overall']:.1f} ({sum(r['correct'])}) | " + " | ".join(cells) + " |")


def write_results(out: str | None, stem: str, args: argparse.Namespace, results: dict, md: str) -> None:
    """Print the table; with ``out``, write ``<stem>.json`` (settings and every run) and ``<stem>.md`` there."""
    print(md)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.json").write_text(json.dumps({"settings": vars(args), "results": results}))
        (folder / f"{stem}.md").write_text(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codecs", default='none,int8,int4,{"name":"int4","group_size":16},fp8',
                    help="kv_codec settings, comma-separated (names or JSON); the first is the reference")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the shipped mukv-tiny)")
    ap.add_argument("--per-kind", type=int, default=100, help="held-out clips per question kind")
    ap.add_argument("--seed", type=int, default=1, help="seed of the held-out clips")
    ap.add_argument("--policy", default="mukv")
    ap.add_argument("--resamples", type=int, default=4000)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from mukv import train as T
    from mukv.plugins.models.llava_onevision import LlavaOnevisionAdapter
    from mukv.plugins.models.mukv_tiny import asset_dir

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    adapter = LlavaOnevisionAdapter.from_pretrained(Path(args.model) if args.model else asset_dir(), device=device)
    clips = T.eval_clips(args.seed, args.per_kind)
    results = {}
    for spec in codec_list(args.codecs):
        t0 = time.perf_counter()
        report, rows = T.session_accuracy(adapter, clips, policy=args.policy, device=device,
                                          config={"kv_codec": spec})
        results[label(spec)] = {"report": report, "correct": [int(r["correct"]) for r in rows],
                                "seconds": time.perf_counter() - t0}
        print(f"{label(spec):28s} {100 * report['overall']:.1f}% in {results[label(spec)]['seconds']:.0f} s",
              flush=True)
    names = list(results)
    base = results[names[0]]["correct"]
    lines = [f"{len(clips)} held-out clips (seed {args.seed}, {args.per_kind} per kind), policy `{args.policy}`, "
             f"device {device}; difference to `{names[0]}` with a 95% paired bootstrap interval over clips "
             f"({args.resamples} resamples).", "",
             "| codec | patch | frame | segment | overall | vs " + names[0] + " (points) | clips lost / won |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        r = results[name]
        diff = [a - b for a, b in zip(r["correct"], base)]
        lo, hi = paired_interval(diff, args.resamples)
        r["difference"], r["interval"] = sum(diff) / len(diff), [lo, hi]
        lost = sum(1 for a, b in zip(r["correct"], base) if b and not a)
        won = sum(1 for a, b in zip(r["correct"], base) if a and not b)
        by = r["report"]["by_level"]
        lines.append(f"| {name} | " + " | ".join(f"{100 * by[lv]['accuracy']:.1f}" for lv in ("patch", "frame", "segment"))
                     + f" | {100 * r['report']['overall']:.1f} ({sum(r['correct'])}) | {100 * r['difference']:+.1f} "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {lost} / {won} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "clips.json").write_text(json.dumps({"settings": vars(args), "results": results}))
        (out / "clips.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
