"""Fixtures of the hardening tests (issue 7). Every test here shares the session-scoped ``tiny_model``
of ``tests/conftest.py``; helpers live in ``hardening_helpers.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# the disk-tier tests' synthetic blocks (disk_synth.py) are reused by the fault tests
sys.path.append(str(Path(__file__).resolve().parent.parent / "disk"))

from hardening_helpers import FAST, frames  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _cwd_in_tmp(tmp_path_factory):
    """Run every hardening module in a scratch folder: generated relative store paths
    (a stream at path ``-4692``, say) must never land in the repository."""
    import os

    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    try:
        yield
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def fast_session(tiny_model):
    """A memory-backend session over the shared tiny model with the :data:`FAST` configuration."""
    import mukv

    s = mukv.Session(model=tiny_model, backend="memory", config=FAST)
    s.feed(frames(4))
    yield s
    s.close()
