"""The models the GPU benchmarks build (registered presets, random weights) and the frames they feed."""

from __future__ import annotations

from typing import Any

import torch

from .flops import qwen_window_sizes


def model_notes(adapter: Any, preset: str) -> list[str]:
    """What a reader needs to know about how a model family is fed and counted."""
    vc = adapter.model.config.vision_config
    if hasattr(vc, "image_size"):
        return []
    h, w = frame_hw(adapter)
    m, p = vc.spatial_merge_size, vc.patch_size
    windows = qwen_window_sizes(adapter.grid, m, max(1, vc.window_size // m // p))
    full = len(vc.fullatt_block_indexes or ())
    return [f"{preset}: frames of {h}x{w} pixels, each frame its own temporal step (duplicated in time, as Qwen "
            f"does for a still image): {h // p * (w // p)} patches and {adapter.tokens_per_frame} merged tokens per "
            f"frame; position codes are M-RoPE (t, h, w). Its vision tower attends within {len(windows)} windows "
            f"of at most {max(windows)} patches per frame in {vc.depth - full} of its {vc.depth} blocks and over the "
            f"whole frame in {full}; outside flash-attention-2, transformers runs that as one attention call per "
            f"window (a Python loop), which the vision-tower figures include."]


def encode_pool(adapter: Any, frames: torch.Tensor, batch: int) -> torch.Tensor:
    """``[n, T, E]`` encoded frames on the device, in the model dtype."""
    return torch.cat([adapter.encode_frames(frames[i : i + batch]) for i in range(0, frames.shape[0], batch)])


def build(preset: str, device: torch.device) -> Any:
    """A registered model preset (random weights) on ``device``: bf16 on CUDA, float32 elsewhere."""
    from mukv.session import load_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return load_model(preset, device, dtype)


def frame_hw(adapter: Any) -> tuple[int, int]:
    """``(height, width)`` of the frames the benchmark feeds: the vision tower's input size
    (LLaVA-OneVision's ``image_size``; Qwen-VL's ``frame_size``), so no resize is timed."""
    size = getattr(adapter, "frame_size", None)
    if size is not None:
        return int(size[0]), int(size[1])
    return int(adapter.image_size), int(adapter.image_size)


def random_frames(adapter: Any, n: int, seed: int) -> torch.Tensor:
    """``uint8 [n, H, W, 3]`` random frames of :func:`frame_hw`'s size (host memory)."""
    h, w = frame_hw(adapter)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen)

