"""Accuracy and paired differences over several ``results.json`` of ``mukv.bench.evaluate``.

Runs made apart (seeds in separate processes, policies on separate days, a KV codec against
float32 KV) answer the same questions when their streams, lengths and seeds are the same: this
pools their records, labels each by its policy (and its KV codec, when not "none"), and prints per
stream length the accuracy of every label with its 95% interval (seeds, then questions, resampled)
and, for each ``--pair A:B``, the paired difference over the questions both answered::

    python benchmarks/compare_runs.py benchmarks/results/day-1440min-*.json --pair mukv:rekv

A codec's label is ``policy+codec`` with its settings (e.g. ``mukv+kivi4(key_bits=6)``). With
``--by-model`` (a retrained checkpoint against the shipped one) every label also names its model by
the checkpoint hash its run recorded: ``mukv#b115cfe6e359``. (Off by default: runs of one model
made before and after the provenance's hash changed from the weights file to the checkpoint
directory record different hashes.)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from mukv.bench.stats import bootstrap_interval, paired_interval


def model_of(settings: dict[str, Any]) -> str:
    """The weights' short hash the run recorded (its model name if none)."""
    model = (settings.get("provenance") or {}).get("model") or {}
    digest = str(model.get("checkpoint_sha256") or "") if isinstance(model, dict) else ""
    return digest[:12] if digest else str(settings.get("model", "?"))


def label_of(settings: dict[str, Any], policy: str, with_model: bool = False) -> str:
    if with_model:
        return label_of(settings, policy) + "#" + model_of(settings)
    codec = settings.get("kv_codec") or "none"
    if isinstance(codec, dict):
        extra = ",".join(f"{k}={v}" for k, v in sorted(codec.items()) if k != "name")
        codec = str(codec.get("name", "?")) + (f"({extra})" if extra else "")
    return policy if codec == "none" or policy.startswith("oracle_") else f"{policy}+{codec}"


def load(paths: list[Path], with_model: bool = False) -> dict[tuple[float, str], dict[int, dict[str, float]]]:
    """``{(minutes, label): {seed: {question id: 1.0 or 0.0}}}`` over every file."""
    out: dict[tuple[float, str], dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for p in paths:
        try:
            res = json.loads(p.read_text())
            settings, records = res["settings"], res["records"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"{p}: not a results.json of mukv.bench.evaluate ({exc})") from None
        for r in records:
            key = (float(r["minutes"]), label_of(settings, r["policy"], with_model))
            seen = out[key][int(r["seed"])]
            if r["id"] in seen and seen[r["id"]] != float(r["correct"]):
                raise SystemExit(f"{p}: question {r['id']} of seed {r['seed']} ({key[1]}, {key[0]:g} min) is "
                                 "also in another file with another result: the same run given twice?")
            seen[r["id"]] = float(r["correct"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="results.json files of mukv.bench.evaluate")
    ap.add_argument("--pair", action="append", default=[], metavar="A:B",
                    help="labels to compare question by question (A minus B); repeatable")
    ap.add_argument("--by-model", action="store_true",
                    help="label every run by its checkpoint's hash too (policy#hash): checkpoints compared")
    args = ap.parse_args(argv)
    data = load(args.files, args.by_model)
    for minutes in sorted({m for m, _ in data}):
        print(f"## {minutes:g} minutes")
        for (m, label), seeds in sorted(data.items()):
            if m != minutes:
                continue
            iv = bootstrap_interval({s: list(q.values()) for s, q in seeds.items()})
            print(f"  {label:28s} {iv.fmt()}  ({iv.n} questions, seeds {sorted(seeds)})")
        for pair in args.pair:
            a, _, b = pair.partition(":")
            if (minutes, a) not in data or (minutes, b) not in data:
                print(f"  {pair}: not both present at {minutes:g} minutes")
                continue
            d = paired_interval(data[(minutes, a)], data[(minutes, b)])
            print(f"  {a} - {b}: {100 * d.mean:+.1f} points ({100 * d.low:+.1f}, {100 * d.high:+.1f}) "
                  f"over {d.n} common questions, {d.seeds} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
