"""Qwen3-VL through transformers' ``Qwen3VLForConditionalGeneration``.

Preprocessing, chat template and frames as for Qwen2.5-VL
(:mod:`mukv.plugins.models.qwen2_5_vl`: each mukv frame a still image, 448 x 448
by default for 16-pixel patches, 14 x 14 = 196 tokens per frame), with
Qwen3-VL's image mean and std (0.5).

**DeepStack.** Qwen3-VL's vision tower also emits features of some of its
inner layers (``deepstack_visual_indexes``); the language model adds them to
the hidden states of the visual tokens after its first layers. Passing only
``inputs_embeds`` silently drops them, so :meth:`Qwen3VLAdapter.encode_frames`
returns ``[n, T, E * (1 + k)]``: the merged tokens and the ``k`` DeepStack
features concatenated on the last axis. They travel through mukv's pipeline as
one row per token (blocks gather rows by token index), and
:meth:`Qwen3VLAdapter.block_inputs` splits them again into the language
model's ``inputs_embeds``, ``visual_pos_masks`` and ``deepstack_visual_embeds``.

**Positions.** Qwen3-VL places each frame as its own grid (t = 1) after the
previous one (its timestamps separate frames in its own template): frame
``f`` of a block at ``origin = P + f * max(gh, gw)``, rows ``(origin, origin +
h, origin + w)``. mukv puts no timestamp text between the frames of a block.
"""

from __future__ import annotations

from typing import Any

import torch

from mukv.rope import MRopeLayout

from .qwen2_5_vl import QwenVLAdapter, build_random_qwen

QWEN3_MEAN = (0.5, 0.5, 0.5)
QWEN3_STD = (0.5, 0.5, 0.5)


class Qwen3VLAdapter(QwenVLAdapter):
    """Model adapter for Qwen3-VL checkpoints (``model_type`` "qwen3_vl").

    Arguments: :class:`~mukv.plugins.models.qwen2_5_vl.QwenVLAdapter`.
    """

    model_types = ("qwen3_vl",)
    model_class_name = "Qwen3VLForConditionalGeneration"
    default_mean = QWEN3_MEAN
    default_std = QWEN3_STD

    def __init__(self, model, tokenizer, **kwargs: Any):
        super().__init__(model, tokenizer, **kwargs)
        #: DeepStack feature levels the vision tower emits (k).
        self.deepstack_levels = len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or ())
        self.mrope = MRopeLayout(self.grid, t_stride=0, origin_stride=max(self.grid))

    @torch.inference_mode()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """``uint8 [n, H, W, 3]`` -> ``[n, T, E * (1 + k)]``: merged visual tokens, then
        the ``k`` DeepStack features of each token, concatenated on the last axis."""
        n = frames.shape[0]
        out = self._vision(frames)
        feats = [out.pooler_output, *(out.deepstack_features or [])]
        return torch.cat(feats, dim=-1).reshape(n, self.tokens_per_frame, -1)

    def block_inputs(self, embeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Split ``[B, L, E * (1 + k)]`` rows into ``inputs_embeds [B, L, E]`` and the
        DeepStack keyword arguments of the language model (``visual_pos_masks
        [B, L]``, every token visual; ``deepstack_visual_embeds``: ``k`` tensors
        ``[B * L, E]``). Rows of width ``E`` (no DeepStack features) pass as they are."""
        e = self.hidden_size
        b, length, width = embeds.shape
        if width == e:
            return embeds, {}
        if width != e * (1 + self.deepstack_levels):
            raise ValueError(f"block rows have width {width}; expected {e} or {e * (1 + self.deepstack_levels)} "
                             f"(hidden size {e} x (1 + {self.deepstack_levels} DeepStack levels))")
        parts = embeds.split(e, dim=-1)
        deepstack = [p.reshape(b * length, e).to(self.dtype) for p in parts[1:]]
        mask = torch.ones(b, length, dtype=torch.bool, device=embeds.device)
        return parts[0], {"visual_pos_masks": mask, "deepstack_visual_embeds": deepstack}


# ------------------------------------------------------------------------------ presets
_QWEN3_VISION_8B = dict(deepstack_visual_indexes=[8, 16, 24], depth=27, hidden_act="gelu_pytorch_tanh",
                        hidden_size=1152, in_channels=3, intermediate_size=4304, num_heads=16,
                        num_position_embeddings=2304, out_hidden_size=4096, patch_size=16, spatial_merge_size=2,
                        temporal_patch_size=2)
_QWEN3_ROPE = {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True}

#: Shapes of real checkpoints (their config.json; random weights for speed runs) and of the tiny test model.
REAL_CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-VL-8B-Instruct config.json
    "qwen3-vl-8b": dict(
        text_config=dict(head_dim=128, hidden_act="silu", hidden_size=4096, intermediate_size=12288,
                         max_position_embeddings=262144, num_attention_heads=32, num_hidden_layers=36,
                         num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=5_000_000.0, vocab_size=151936,
                         attention_bias=False, tie_word_embeddings=False, rope_scaling=dict(_QWEN3_ROPE)),
        vision_config=dict(_QWEN3_VISION_8B),
    ),
    # Qwen/Qwen3-VL-4B-Instruct config.json
    "qwen3-vl-4b": dict(
        text_config=dict(head_dim=128, hidden_act="silu", hidden_size=2560, intermediate_size=9728,
                         max_position_embeddings=262144, num_attention_heads=32, num_hidden_layers=36,
                         num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=5_000_000.0, vocab_size=151936,
                         attention_bias=False, tie_word_embeddings=True, rope_scaling=dict(_QWEN3_ROPE)),
        vision_config=dict(_QWEN3_VISION_8B, deepstack_visual_indexes=[5, 11, 17], depth=24, hidden_size=1024,
                           intermediate_size=4096, out_hidden_size=2560),
    ),
    "tiny-qwen3-vl": dict(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, rope_theta=10_000.0, max_position_embeddings=65536,
                         tie_word_embeddings=True,
                         rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=2, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1]),
    ),
}


def build_qwen3_vl(preset: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                   **kwargs: Any) -> Qwen3VLAdapter:
    """A Qwen3-VL of a preset shape with random weights (see
    :func:`mukv.plugins.models.qwen2_5_vl.build_random_qwen`)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration


    return build_random_qwen(REAL_CONFIGS[preset], preset, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                             Qwen3VLAdapter, device, dtype, **kwargs)
