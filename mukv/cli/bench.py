"""`mukv bench`: the evaluation harness."""

from __future__ import annotations

import argparse

from ..errors import InputError, MukvError



BENCH_MODULE = "mukv.bench.evaluate"


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    try:
        harness = importlib.import_module(BENCH_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name not in (BENCH_MODULE, "mukv.bench"):
            raise
        harness = None
    if harness is None or not callable(getattr(harness, "main", None)):
        if any(a in ("-h", "--help") for a in args.args):
            print(BENCH_DESCRIPTION)
            print(f"\nThe evaluation harness ({BENCH_MODULE}) is not available yet.")
            return 0
        raise MukvError(f"the evaluation harness is not available yet ({BENCH_MODULE}.main is missing); "
                        "meanwhile `mukv demo` runs the benchmark's questions on a generated stream")
    try:
        return int(harness.main(list(args.args)) or 0)
    except SystemExit as exc:  # the harness's own checks say what is wrong in words: one line, status 2
        if isinstance(exc.code, str):
            raise InputError(exc.code) from None
        raise


BENCH_DESCRIPTION = ("Run the evaluation harness of the synthetic benchmark (mukv.bench): policies and models "
                     "answer its questions; accuracy by kind, level and depth. Arguments are passed on to "
                     f"{BENCH_MODULE}; `mukv bench --help` shows them.")

