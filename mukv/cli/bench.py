"""`mukv bench`: the evaluation harness."""

from __future__ import annotations

import argparse
import json

from ..errors import InputError, MukvError

BENCH_MODULE = "mukv.bench.evaluate"


def _mukv_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """mukv's own options among the harness's: ``--policy``, ``--config`` and the logging options."""
    from .common import add_log_options

    p = argparse.ArgumentParser(prog="mukv bench", add_help=False)
    p.add_argument("--policy")
    p.add_argument("--config")
    add_log_options(p)
    return p.parse_known_args(argv)


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    own, rest = _mukv_options(list(args.args))
    if any(getattr(own, k, None) for k in ("verbose", "quiet", "log_json")):
        from ..log import configure_logging

        configure_logging(getattr(own, "verbose", 0) - (1 if getattr(own, "quiet", False) else 0),
                          json_lines=getattr(own, "log_json", False))
    try:
        harness = importlib.import_module(BENCH_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name not in (BENCH_MODULE, "mukv.bench"):
            raise
        harness = None
    if harness is None or not callable(getattr(harness, "main", None)):
        if any(a in ("-h", "--help") for a in rest):
            print(BENCH_DESCRIPTION)
            print(f"\nThe evaluation harness ({BENCH_MODULE}) is not available yet.")
            return 0
        raise MukvError(f"the evaluation harness is not available yet ({BENCH_MODULE}.main is missing); "
                        "meanwhile `mukv demo` runs the benchmark's questions on a generated stream")
    try:
        return int(harness.main(_harness_args(own, rest)) or 0)
    except SystemExit as exc:  # the harness's own checks say what is wrong in words: one line, status 2
        if isinstance(exc.code, str):
            raise InputError(exc.code) from None
        raise


def _harness_args(own: argparse.Namespace, rest: list[str]) -> list[str]:
    """The harness's arguments with mukv's ``--policy`` / ``--config`` and the user's settings
    (model, configuration fields, policy) turned into its own ``--policies`` / ``--config`` / ``--model``."""
    from ..settings import effective, parse_object, parse_spec

    eff = effective({"policy": parse_spec(own.policy, "--policy"), "config": parse_object(own.config)})
    out = list(rest)
    policy = eff.values["policy"]
    if policy is not None and "--policies" not in out:
        out += ["--policies", policy if isinstance(policy, str) else json.dumps(policy)]
    if eff.config:
        out += ["--config", json.dumps(eff.config)]
    if eff.values["model"] is not None and "--model" not in out:
        model = eff.values["model"]
        out += ["--model", model if isinstance(model, str) else json.dumps(model)]
    return out


BENCH_DESCRIPTION = ("Run the evaluation harness of the synthetic benchmark (mukv.bench): policies and models "
                     "answer its questions; accuracy by kind, level and depth. Arguments are passed on to "
                     f"{BENCH_MODULE}; `mukv bench --help` shows them. mukv's own --policy (one policy) and "
                     "--config (fields over every policy's) come first, as do the user file's and MUKV_* settings.")
