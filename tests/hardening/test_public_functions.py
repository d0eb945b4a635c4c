"""Every function the reference documents (``::: mukv....`` in docs/) called with junk in each required
argument either works or raises a MukvError naming the problem: never an AttributeError or TypeError
from deep inside. Classes and the server, CLI and training entry points have their own hostile-input
tests (test_hostile_input.py, test_security.py, tests/serve)."""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from pathlib import Path

import pytest

import mukv

DOCS = Path(__file__).resolve().parents[2] / "docs"
#: whole areas tested elsewhere (servers, command lines, training runs, sessions)
ELSEWHERE = ("serve", "Session", "main", "train", "cli")
JUNK = [None, "x", 5, -1, float("nan"), [], {}, b"\x00", object()]


def documented() -> list[tuple[str, object]]:
    """``(dotted name, object)`` of everything the reference documents with ``::: mukv....``."""
    names = set()
    for page in DOCS.rglob("*.md"):
        names.update(re.findall(r"^::: (mukv\.[A-Za-z0-9_.]+)", page.read_text(), re.M))
    out = []
    for full in sorted(names):
        mod, _, attr = full.rpartition(".")
        try:
            out.append((full, getattr(importlib.import_module(mod), attr)))
        except (ImportError, AttributeError):
            continue  # a class member or a module
    return out


def documented_functions() -> list[str]:
    return [full for full, fn in documented() if inspect.isfunction(fn) and not any(s in full for s in ELSEWHERE)]


FUNCTIONS = documented_functions()


def test_the_reference_documents_functions():
    assert len(FUNCTIONS) > 40  # the scan found them (docs moved?)


@pytest.mark.parametrize("full", FUNCTIONS)
def test_junk_arguments_give_a_clear_mukv_error(full, caplog):
    mod, _, attr = full.rpartition(".")
    fn = getattr(importlib.import_module(mod), attr)
    params = inspect.signature(fn).parameters.values()
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not required:
        pytest.skip("no required argument")
    caplog.set_level(logging.CRITICAL)
    for junk in JUNK:
        try:
            fn(*[junk] * len(required))
        except mukv.MukvError:
            pass


#: classes made by mukv itself, or tested for hostile input on their own (sessions, the server's engine,
#: error classes, HTTP bodies, log formatters, model adapters, streams and the disk tier)
MADE_ELSEWHERE = ("mukv.session.Session", "mukv.serve.engine.Engine", "mukv.errors.", "mukv.serve.protocol.",
                  "Formatter", "Adapter", "mukv.model.HFVideoLLM", "mukv.stream.Stream", "mukv.bench.Stream",
                  "TieredBackend", "StreamRepair")


def documented_classes() -> list[str]:
    import dataclasses

    from pydantic import BaseModel

    return [full for full, cls in documented()
            if inspect.isclass(cls) and not inspect.isabstract(cls) and not dataclasses.is_dataclass(cls)
            and not issubclass(cls, BaseModel) and not any(s in full for s in MADE_ELSEWHERE)]


CLASSES = documented_classes()


@pytest.mark.parametrize("full", CLASSES)
def test_junk_constructor_arguments_give_a_clear_mukv_error(full, caplog):
    """Each documented class built with junk in its required arguments, then in all its positional ones
    (pydantic models validate themselves; dataclasses are records mukv fills)."""
    mod, _, attr = full.rpartition(".")
    cls = getattr(importlib.import_module(mod), attr)
    params = [p for p in inspect.signature(cls).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is p.empty]
    caplog.set_level(logging.CRITICAL)
    for junk in JUNK:
        for n in {len(required), len(params)} - {0}:
            try:
                obj = cls(*[junk] * n)
            except mukv.MukvError:
                continue
            close = getattr(obj, "close", None)
            if callable(close):
                close()
