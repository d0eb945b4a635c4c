"""Shared fixtures: one tiny random LLaVA-OneVision per test session (built offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model():
    """The "tiny-llava-ov" preset on CPU (float32), shared by every test that only reads it."""
    from mukv.plugins.models.llava_onevision import build_llava_onevision

    return build_llava_onevision("tiny-llava-ov", device="cpu")


@pytest.fixture
def interpret(request):
    """Skips a test unless Triton's interpreter is on (``TRITON_INTERPRET=1``; the Triton kernels' CPU tests)."""
    from helpers import INTERPRETING

    if not INTERPRETING:
        pytest.skip(f"runs under Triton's interpreter: TRITON_INTERPRET=1 python -m pytest {request.path.name}")


@pytest.fixture
def frames():
    """A factory of random uint8 frames ``[n, 64, 64, 3]``."""

    def make(n: int, seed: int = 0, size: int = 64) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, 255, (n, size, size, 3), dtype=np.uint8)

    return make


@pytest.fixture
def session(tiny_model):
    """A MuKV session over the shared tiny model and the memory backend."""
    import mukv

    s = mukv.Session(model=tiny_model, backend="memory")
    yield s
    s.close()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run through the device tool)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not the folder's name
            item.add_marker(skip)
