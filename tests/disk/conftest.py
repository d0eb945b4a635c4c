"""Fixtures of the disk-tier tests: one tiny model per run."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lancedb", reason="the disk tier needs lancedb (pip install mukv[disk])")
pytest.importorskip("zarr", reason="the disk tier needs zarr (pip install mukv[disk])")


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny LLaVA-OneVision adapter, built once (pass it as ``model=``)."""
    from mukv.session import load_model

    return load_model("tiny-llava-ov", torch.device("cpu"))
