"""Qwen2.5-VL through transformers' ``Qwen2_5_VLForConditionalGeneration``.

Frames are preprocessed by mukv (transformers' processor classes need
torchvision): resized to a fixed ``frame_size`` (a multiple of
``patch_size * spatial_merge_size``; 392 x 392 by default, 14 x 14 = 196
tokens per frame, as LLaVA-OneVision's), normalised with the checkpoint's mean
and std (CLIP's by default), and cut into patches in Qwen's flattened layout
(:func:`patchify`, the algorithm of transformers' ``Qwen2VLImageProcessor``).

**Frames and Qwen's temporal patches.** Qwen's vision tower embeds
``temporal_patch_size = 2`` frames per temporal step. mukv gives every frame
its own step, duplicated in time as Qwen does for a still image: ``T`` tokens
per mukv frame, so mukv's frame, patch and segment blocks mean what they mean
for LLaVA-OneVision, and the encoding of a frame does not depend on its
neighbour. The vision tower attends within one temporal step only, so nothing
is lost but compute (twice the visual tokens of native pairs per second of
video). Native pairs (two frames -> one step, exposed as a 2-frame unit) are
future work.

**Positions.** Qwen2.5-VL uses 3D M-RoPE (:class:`mukv.rope.MRopeLayout`): the
frames of a block are the frames of one video after the system prompt (which
ends in ``<|vision_start|>``), at ``(P + f * t_stride, P + h, P + w)`` as
``get_rope_index`` places a video with ``t_stride = tokens_per_second *
seconds per frame``; text repeats its 1D position on the three rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mukv.checkpoints import channel_stats
from mukv.model import MRopeVideoLLM, load_checkpoint, read_model_defaults
from mukv.rope import MRopeLayout

SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
QUERY_TEMPLATE = "<|vision_end|>{question}"
ANSWER_TEMPLATE = "<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
#: Tokens of Qwen's chat template that mukv's word tokenizer lacks (added for the tiny presets only).
QWEN_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Visual tokens per side of a frame by default (14 x 14 = 196, as LLaVA-OneVision's video frames).
DEFAULT_GRID_SIDE = 14


def patchify(pixels: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """Frames in Qwen's flattened patch layout, each frame a still image.

    Args:
        pixels: ``[n, C, H, W]`` normalised frames, ``H`` and ``W`` multiples of
            ``patch_size * merge_size``.

    Returns:
        ``[n * gh * gw, C * temporal_patch_size * patch_size ** 2]`` with
        ``gh, gw = H / patch_size, W / patch_size``: per frame, patches in
        ``(gh / m, gw / m, m, m)`` order (each ``m x m`` group of patches that the
        merger fuses into one token is contiguous, groups in raster order), each
        patch flattened as ``(C, temporal, ph, pw)`` with the frame repeated
        along ``temporal`` (as ``Qwen2VLImageProcessor`` does for an image).
    """
    n, c, h, w = pixels.shape
    p, m = patch_size, merge_size
    gh, gw = h // p, w // p
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frame size {h}x{w} is not a multiple of patch_size * merge_size = {p * m}")
    x = pixels.reshape(n, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [n, gh/m, gw/m, m, m, C, p, p]
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal_patch_size, p, p)  # [n, gh/m, gw/m, m, m, C, t, p, p]
    return x.reshape(n * gh * gw, c * temporal_patch_size * p * p)


class QwenVLAdapter(MRopeVideoLLM):
    """What the Qwen2.5-VL and Qwen3-VL adapters share: chat template, frame
    preprocessing and patch layout, and the vision tower call.

    Args:
        model: a ``Qwen2_5_VLForConditionalGeneration`` or ``Qwen3VLForConditionalGeneration``.
        tokenizer: its tokenizer (with Qwen's special tokens).
        frame_size: ``(height, width)`` frames are resized to, multiples of
            ``patch_size * spatial_merge_size``; default 14 tokens per side.
        image_mean, image_std: per-channel normalisation of the vision tower.
        name: model id recorded in stores.
        system_prompt: text before every block (ends with ``<|vision_start|>``).
    """

    default_mean: tuple[float, float, float] = CLIP_MEAN
    default_std: tuple[float, float, float] = CLIP_STD

    def __init__(self, model, tokenizer, *, frame_size: int | tuple[int, int] | None = None,
                 image_mean=None, image_std=None, name: str = "", system_prompt: str = SYSTEM_PROMPT):
        vc = model.config.vision_config
        self.patch_size, self.merge_size = vc.patch_size, vc.spatial_merge_size
        self.temporal_patch_size = vc.temporal_patch_size
        factor = self.patch_size * self.merge_size
        if frame_size is None:
            frame_size = DEFAULT_GRID_SIDE * factor
        fh, fw = (frame_size, frame_size) if isinstance(frame_size, int) else tuple(frame_size)
        if fh % factor or fw % factor or fh <= 0 or fw <= 0:
            raise ValueError(f"frame_size {fh}x{fw} must be positive multiples of "
                             f"patch_size * spatial_merge_size = {factor}")
        self.frame_size = (fh, fw)
        super().__init__(
            model, tokenizer,
            language_model=model.model.language_model, lm_head=model.lm_head,
            grid=(fh // factor, fw // factor), system_prompt=system_prompt, query_template=QUERY_TEMPLATE,
            answer_template=ANSWER_TEMPLATE, stop_tokens=STOP_TOKENS, name=name,
        )
        mean = self.default_mean if image_mean is None else image_mean
        std = self.default_std if image_std is None else image_std
        self._mean = torch.tensor(mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``uint8 [n, H, W, 3]`` -> normalised float32 ``[n, 3, fh, fw]`` (bicubic, antialiased)."""
        x = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if tuple(x.shape[-2:]) != self.frame_size:
            x = F.interpolate(x, size=self.frame_size, mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp_(0.0, 1.0)
        return (x - self._mean) / self._std

    def pixel_values(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pixel_values [n * gh * gw, C * t * p * p], grid_thw [n, 3])`` of frames, each
        frame one still image (grid ``(1, gh, gw)`` in patches), as the model's
        ``pixel_values`` / ``image_grid_thw`` take them."""
        pixels = self.preprocess(frames)
        flat = patchify(pixels, self.patch_size, self.merge_size, self.temporal_patch_size)
        n, factor = pixels.shape[0], self.patch_size
        grid = torch.tensor([[1, self.frame_size[0] // factor, self.frame_size[1] // factor]] * n,
                            dtype=torch.long, device=self.device)
        return flat.to(self.dtype), grid

    def _vision(self, frames: torch.Tensor):
        flat, grid = self.pixel_values(frames)
        return self.model.model.visual(flat, grid_thw=grid)

    @torch.inference_mode()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """``uint8 [n, H, W, 3]`` -> ``[n, T, E]`` merged visual tokens (raster order)."""
        n = frames.shape[0]
        out = self._vision(frames)
        return out.pooler_output.reshape(n, self.tokens_per_frame, -1)

    # -- loading ------------------------------------------------------------------------
    model_class_name: str = ""

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                        **kwargs: Any) -> "QwenVLAdapter":
        """Load a local checkpoint directory (safetensors only; nothing is downloaded).

        ``kwargs`` go to the adapter (``frame_size``, ...). The image mean and std
        come from the checkpoint's ``preprocessor_config.json`` when it has one.
        """
        import transformers

        defaults = read_model_defaults(path)
        model, tokenizer, pre = load_checkpoint(path, getattr(transformers, cls.model_class_name), device, dtype)
        if pre:
            kwargs.setdefault("image_mean", channel_stats(pre, "image_mean", tuple(cls.default_mean), path))
            kwargs.setdefault("image_std", channel_stats(pre, "image_std", tuple(cls.default_std), path))
        kwargs.setdefault("name", Path(path).name)
        adapter = cls(model, tokenizer, **kwargs)
        adapter.default_config = defaults
        return adapter


class Qwen2_5_VLAdapter(QwenVLAdapter):
    """Model adapter for Qwen2.5-VL checkpoints (``model_type`` "qwen2_5_vl").

    Args:
        seconds_per_frame: stream time between mukv frames; the temporal row
            advances ``t_stride = round(tokens_per_second * seconds_per_frame)``
            per frame (Qwen2.5-VL encodes absolute time; 2 s = mukv's default
            0.5 fps). Other arguments: :class:`QwenVLAdapter`.
    """

    model_types = ("qwen2_5_vl",)
    model_class_name = "Qwen2_5_VLForConditionalGeneration"

    def __init__(self, model, tokenizer, *, seconds_per_frame: float = 2.0, **kwargs: Any):
        super().__init__(model, tokenizer, **kwargs)
        tps = getattr(model.config.vision_config, "tokens_per_second", 2) or 2
        self.t_stride = max(1, int(round(tps * seconds_per_frame)))
        self.mrope = MRopeLayout(self.grid, t_stride=self.t_stride, origin_stride=0)


# ------------------------------------------------------------------------------ presets
#: Shapes of real checkpoints (their config.json; random weights for speed runs) and of the tiny test model.
REAL_CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2.5-VL-7B-Instruct config.json
    "qwen2.5-vl-7b": dict(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, rope_theta=1_000_000.0, vocab_size=152064,
                         max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         sliding_window=32768, use_sliding_window=False, max_window_layers=28, hidden_act="silu",
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
                           in_chans=3, out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                           tokens_per_second=2),
    ),
    "tiny-qwen2.5-vl": dict(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rope_theta=10_000.0, max_position_embeddings=65536,
                         tie_word_embeddings=True, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=2, spatial_merge_size=2, temporal_patch_size=2, window_size=8,
                           fullatt_block_indexes=[1], tokens_per_second=1),
    ),
}


def qwen_word_tokenizer(words: tuple[str, ...] = ()):
    """mukv's word-level tokenizer plus Qwen's vision tokens (appended: the ids of
    every other token are those of :func:`mukv.tokenizer.build_word_tokenizer`)."""
    from mukv.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(words)
    tok.add_tokens(list(QWEN_SPECIAL_TOKENS), special_tokens=True)
    return tok


def token_config(tokenizer) -> dict[str, int | None]:
    """The token ids a Qwen-VL config names, from a tokenizer."""
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return ids


def text_token_ids(tokenizer) -> dict[str, int | None]:
    """bos / eos / pad ids for a text config (bos: none; eos: ``<|im_end|>``)."""
    return dict(bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id)


def build_random_qwen(shape: dict[str, Any], preset: str, config_cls: Any, model_cls: Any, adapter_cls: Any,
                      device: torch.device | str = "cpu", dtype: torch.dtype | None = None, seed: int = 0,
                      words: tuple[str, ...] = (), text_overrides: dict[str, Any] | None = None, **kwargs: Any):
    """A Qwen-VL model of a preset shape with random weights, built offline and deterministically
    (``text_overrides`` change fields of the language model's config, e.g. its number of layers;
    ``kwargs`` go to the adapter). Shared by the Qwen2.5-VL and Qwen3-VL presets."""
    from .llava_onevision import _bench_words

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = qwen_word_tokenizer(words or _bench_words())
    text = {**shape["text_config"], **text_token_ids(tokenizer), **(text_overrides or {})}
    text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
    config = config_cls(text_config=text, vision_config=dict(shape["vision_config"]),
                        tie_word_embeddings=text.get("tie_word_embeddings", False), **token_config(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = model_cls(config)
    model = model.to(dtype=dtype).eval()
    adapter = adapter_cls(model, tokenizer, name=preset, **kwargs)
    adapter.random_weights = True
    return adapter


def build_qwen2_5_vl(preset: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                     **kwargs: Any) -> Qwen2_5_VLAdapter:
    """A Qwen2.5-VL of a preset shape with random weights (see :func:`build_random_qwen`)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return build_random_qwen(REAL_CONFIGS[preset], preset, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                             Qwen2_5_VLAdapter, device, dtype, **kwargs)

