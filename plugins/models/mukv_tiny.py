"""The bundled model: mukv-tiny, a small LLaVA-OneVision trained for mukv's benchmark.

Its checkpoint ships inside the package (``mukv/assets/mukv-tiny``: config,
bf16 safetensors, word-level tokenizer, the levels it was trained with in
``mukv_config.json``, model card). How it was trained and how
well it answers: ``docs/mukv-tiny.md``; the training code: :mod:`mukv.train`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch

from mukv.errors import StoreError
from mukv.model import read_model_defaults

from .llava_onevision import LlavaOnevisionAdapter, LlavaOnevisionSettings


def asset_dir() -> Path:
    """Where the shipped checkpoint lives (``mukv/assets/mukv-tiny``)."""
    return Path(str(resources.files("mukv"))) / "assets" / "mukv-tiny"


def load_mukv_tiny(device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                   **settings: Any) -> LlavaOnevisionAdapter:
    """Load the shipped mukv-tiny checkpoint (offline, safetensors only).

    Args:
        device: torch device.
        dtype: weights dtype; default bfloat16 on CUDA, float32 on CPU (the
            shipped bf16 weights are upcast).
        settings: :class:`~mukv.plugins.models.llava_onevision.LlavaOnevisionSettings`
            (mukv-tiny was trained with mukv's prompts and resizing).

    Raises:
        StoreError: the checkpoint is not installed.
    """
    path = asset_dir()
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise StoreError(
            f"the mukv-tiny checkpoint is missing from {path} (expected config.json and model.safetensors); "
            "reinstall mukv, or train and export one with `python benchmarks/train_tiny.py --export DIR` "
            "and pass that directory as the model"
        )
    return LlavaOnevisionAdapter.from_pretrained(path, device=device, dtype=dtype, **settings)


load_mukv_tiny.Settings = LlavaOnevisionSettings  # type: ignore[attr-defined]
load_mukv_tiny.defaults = lambda: read_model_defaults(asset_dir())  # type: ignore[attr-defined]
