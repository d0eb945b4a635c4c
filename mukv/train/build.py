"""Model building for mukv-tiny: the shapes, the levels a shape trains with, a randomly
initialised LLaVA-OneVision of a shape, and the projector calibration that puts its visual
tokens at the scale of the text embeddings."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..config import MukvConfig
from .forward import encode

#: The shipped model: 196 visual tokens per frame (112 px, patch 4 -> 28x28 -> pooled 14x14),
#: so mukv's default levels (49 / 196 / 784 tokens) apply unchanged.
MUKV_TINY_SHAPE: dict[str, Any] = dict(
    text_config=dict(model_type="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                     num_attention_heads=8, num_key_value_heads=2, rope_theta=10_000.0,
                     max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True),
    vision_config=dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=512,
                       num_hidden_layers=4, num_attention_heads=4, image_size=112, patch_size=4,
                       vision_use_head=False),
)

#: A toy of the same family for CPU tests (49 visual tokens per frame: 28 px, patch 2 -> 14x14 -> 7x7).
TOY_SHAPE: dict[str, Any] = dict(
    text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=10_000.0,
                     max_position_embeddings=32768, tie_word_embeddings=True),
    vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=2,
                       vision_use_head=False),
)

#: A shape that trains on a laptop CPU for recipe experiments: 56 px frames, 49 tokens per frame
#: (toy_config's levels), a 4-layer, 128-wide language model. Not shipped.
SMALL_SHAPE: dict[str, Any] = dict(
    text_config={**TOY_SHAPE["text_config"], "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4},
    vision_config={**TOY_SHAPE["vision_config"], "hidden_size": 64, "intermediate_size": 256,
                   "num_hidden_layers": 2, "image_size": 56, "patch_size": 4},
)

#: The small shape's language model at 196 visual tokens per frame (56 px, patch 2 -> 28x28 -> pooled
#: 14x14), so mukv's default levels apply; a light vision tower keeps steps cheap on the GPU.
SMALL_196_SHAPE: dict[str, Any] = dict(
    text_config=dict(SMALL_SHAPE["text_config"]),
    vision_config={**SMALL_SHAPE["vision_config"], "patch_size": 2},
)

#: :data:`SMALL_196_SHAPE` with a 192-wide, 6-head language model.
MEDIUM_196_SHAPE: dict[str, Any] = dict(
    text_config={**SMALL_SHAPE["text_config"], "hidden_size": 192, "intermediate_size": 576,
                 "num_attention_heads": 6},
    vision_config=dict(SMALL_196_SHAPE["vision_config"]),
)

#: :data:`SMALL_SHAPE` (49 tokens per frame) with the 192-wide language model of :data:`MEDIUM_196_SHAPE`.
MEDIUM_SHAPE: dict[str, Any] = dict(
    text_config=dict(MEDIUM_196_SHAPE["text_config"]),
    vision_config=dict(SMALL_SHAPE["vision_config"]),
)

SHAPES: dict[str, dict[str, Any]] = {"mukv-tiny": MUKV_TINY_SHAPE, "toy": TOY_SHAPE, "small": SMALL_SHAPE,
                                     "small-196": SMALL_196_SHAPE, "medium": MEDIUM_SHAPE,
                                     "medium-196": MEDIUM_196_SHAPE}


def toy_config() -> MukvConfig:
    """MuKV's levels for the toy shape's 7x7 grid: one-row patches, frames, 4-frame segments.

    Four segments are retrieved, not MuKV's twelve: on long streams mukv-tiny answers best from
    contexts of about 350-800 tokens and at its prior from 2,000 (docs/answer-quality-results.md);
    a training clip of 8 frames holds two segments, so training is the same either way."""
    return MukvConfig.build({"levels": [
        {"name": "patch", "extractor": "patch_raster", "frames": 1, "tokens": 7, "keep_ratio": 0.3, "alpha": 0.5,
         "top_k": 20, "rerank_weight": 0.3},
        {"name": "frame", "extractor": "frame", "frames": 1, "keep_ratio": 0.1, "alpha": 0.7, "top_k": 32,
         "rerank_weight": 0.3},
        {"name": "segment", "extractor": "segment", "frames": 4, "keep_ratio": 0.8, "alpha": 0.8, "top_k": 4},
    ]})


def config_for(adapter) -> MukvConfig:
    """The levels a model of this shape trains and answers with: mukv's defaults at 196
    tokens per frame, :func:`toy_config`'s at 49."""
    return toy_config() if adapter.tokens_per_frame == 49 else MukvConfig.build()


def build_model(shape: str | dict[str, Any] = "mukv-tiny", seed: int = 0, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, name: str = "mukv-tiny", calibrate: bool = True):
    """A LLaVA-OneVision of ``shape`` with random weights (seeded), wrapped in
    :class:`~mukv.plugins.models.llava_onevision.LlavaOnevisionAdapter`.

    The tokenizer is :func:`mukv.tokenizer.build_word_tokenizer` over the
    benchmark's :data:`~mukv.bench.VOCABULARY` (plus the base words). With ``calibrate``
    the projector is initialised at the text-embedding scale (:func:`calibrate_projector`).
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    from mukv.bench import VOCABULARY
    from mukv.plugins.models.llava_onevision import LlavaOnevisionAdapter, onevision_config
    from mukv.tokenizer import build_word_tokenizer

    shape = SHAPES[shape] if isinstance(shape, str) else shape
    tokenizer = build_word_tokenizer(VOCABULARY)
    config = onevision_config(shape, tokenizer, exact_vocab=True)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlavaOnevisionForConditionalGeneration(config)
    model = model.to(dtype=dtype)
    adapter = LlavaOnevisionAdapter(model, tokenizer, name=name)
    if calibrate:
        calibrate_projector(adapter)
    return adapter


@torch.no_grad()
def visual_text_rms(adapter, frames: torch.Tensor | None = None) -> tuple[float, float]:
    """RMS of the visual embeddings of ``frames`` (default: one fixed benchmark clip) and of the text embeddings."""
    if frames is None:
        from mukv.bench import sample_clip

        frames = torch.from_numpy(sample_clip(np.random.default_rng(0), 4).frames)[None]
    frames = frames.to(adapter.device)
    was = adapter.model.training
    adapter.model.eval()
    try:
        v = encode(adapter, frames).float()
    finally:
        adapter.model.train(was)
    e = adapter.language_model.embed_tokens.weight.float()
    return float(v.pow(2).mean().sqrt()), float(e.pow(2).mean().sqrt())


@torch.no_grad()
def calibrate_projector(adapter) -> float:
    """Initialise the multi-modal projector so that visual embeddings enter the language
    model at the scale of the text embeddings: zero biases, ``linear_2`` rescaled so that
    the RMS of the visual tokens of a fixed clip equals the RMS of the token embeddings
    (transformers' default init leaves them ~5x larger, and training without
    :attr:`TrainConfig.vis_rms` let them grow to ~40x, which collapsed the visual tokens
    into attention sinks). Returns the scale applied."""
    proj = adapter.model.model.multi_modal_projector
    proj.linear_1.bias.zero_()
    proj.linear_2.bias.zero_()
    vis, txt = visual_text_rms(adapter)
    scale = txt / max(vis, 1e-12)
    proj.linear_2.weight.mul_(scale)
    return scale


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of the vision tower, projector (+ newline) and language model (tied head counted once)."""
    m = model.model
    vision = sum(p.numel() for p in m.vision_tower.parameters())
    lm = sum(p.numel() for p in m.language_model.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"vision": vision, "projector": total - vision - lm, "language": lm, "total": total}
