"""Builders of hand-made blocks for plugin tests."""

from __future__ import annotations

import torch

from mukv.blocks import PrefilledBlocks
from mukv.config import LevelConfig


def blocks_from_keys(keys: torch.Tensor, attention: torch.Tensor | None = None, keep_ratio: float = 0.5,
                     alpha: float = 0.5, layers: int = 2) -> PrefilledBlocks:
    """PrefilledBlocks whose last-layer keys are ``keys [B, H, L, D]`` (values = keys, other layers zero)."""
    b, h, length, d = keys.shape
    kv = torch.zeros(layers, 2, b, h, length, d)
    kv[-1, 0] = keys
    kv[-1, 1] = keys
    for y in range(layers - 1):
        kv[y, 0] = y + 1  # recognisable values in lower layers
        kv[y, 1] = -(y + 1)
    level = LevelConfig(name="frame", extractor="frame", keep_ratio=keep_ratio, alpha=alpha, top_k=1)
    return PrefilledBlocks(
        level=level, kv=kv, attention=attention, token_index=torch.arange(length).expand(b, -1),
        frame_start=torch.arange(b), frame_end=torch.arange(b) + 1,
        positions=torch.arange(length).expand(b, -1), grid=(1, length),
    )
