"""LLaVA-OneVision through transformers' ``LlavaOnevisionForConditionalGeneration``.

Frames are preprocessed by mukv (resize to the vision tower's input size,
normalise with the checkpoint's mean and std) because transformers' processor
classes need torchvision. Video frames go through the vision tower, the
projector and LLaVA-OneVision's 2x2 bilinear pooling: 196 tokens per frame for
the real checkpoints (27x27 patches pooled to 14x14).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mukv.model import HFVideoLLM, load_checkpoint, read_model_defaults

SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
QUERY_TEMPLATE = "\n{question}"
ANSWER_TEMPLATE = "\n{question}<|im_end|>\n<|im_start|>assistant\n"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


class LlavaOnevisionAdapter(HFVideoLLM):
    """Model adapter for LLaVA-OneVision checkpoints (``model_type`` "llava_onevision").

    Args:
        model: a ``LlavaOnevisionForConditionalGeneration``.
        tokenizer: its tokenizer.
        image_mean, image_std: per-channel normalisation of the vision tower.
        name: model id recorded in stores.
    """

    model_types = ("llava_onevision",)

    def __init__(self, model, tokenizer, *, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), name="llava_onevision",
                 system_prompt: str = SYSTEM_PROMPT):
        vc = model.config.vision_config
        side = vc.image_size // vc.patch_size
        pooled = math.ceil(side / 2)
        super().__init__(
            model, tokenizer,
            language_model=model.model.language_model, lm_head=model.lm_head,
            grid=(pooled, pooled), system_prompt=system_prompt, query_template=QUERY_TEMPLATE,
            answer_template=ANSWER_TEMPLATE, stop_tokens=STOP_TOKENS, name=name,
        )
        self.image_size = vc.image_size
        self.feature_layer = model.config.vision_feature_layer
        self.select_strategy = model.config.vision_feature_select_strategy
        self._mean = torch.tensor(image_mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(image_std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``uint8 [n, H, W, 3]`` -> normalised ``[n, 3, S, S]`` pixels in the model dtype."""
        x = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        x = (x - self._mean) / self._std
        return x.to(self.dtype)

    @torch.inference_mode()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """``uint8 [n, H, W, 3]`` -> ``[n, T, E]`` pooled, projected visual tokens."""
        pixels = self.preprocess(frames)
        n = pixels.shape[0]
        out = self.model.model.get_video_features(
            pixels[None], vision_feature_layer=self.feature_layer, vision_feature_select_strategy=self.select_strategy,
        ).pooler_output  # [1, n * T (+ 1), E]: transformers >= 5.2x appends the video's newline embedding
        return out[:, : n * self.tokens_per_frame].reshape(n, self.tokens_per_frame, -1)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                        **kwargs: Any) -> "LlavaOnevisionAdapter":
        """Load a local checkpoint directory (safetensors only; nothing is downloaded)."""
        from transformers import LlavaOnevisionForConditionalGeneration

        defaults = read_model_defaults(path)
        model, tokenizer, pre = load_checkpoint(path, LlavaOnevisionForConditionalGeneration, device, dtype)
        mean, std = tuple(pre.get("image_mean", (0.5, 0.5, 0.5))), tuple(pre.get("image_std", (0.5, 0.5, 0.5)))
        adapter = cls(model, tokenizer, image_mean=mean, image_std=std, name=Path(path).name, **kwargs)
        adapter.default_config = defaults
        return adapter


# ------------------------------------------------------------------------------ presets
#: Language model and vision tower shapes of the real checkpoints (llava-hf configs).
REAL_CONFIGS: dict[str, dict[str, Any]] = {
    "llava-onevision-qwen2-0.5b-ov": dict(
        text_config=dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0, vocab_size=151647,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14),
    ),
    "llava-onevision-qwen2-7b-ov": dict(
        text_config=dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, rope_theta=1_000_000.0, vocab_size=152128,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14),
    ),
    "tiny-llava-ov": dict(
        text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=10_000.0,
                         max_position_embeddings=65536, tie_word_embeddings=True),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=2),
    ),
}


def onevision_config(shape: dict[str, Any], tokenizer: Any, exact_vocab: bool = False):
    """A ``LlavaOnevisionConfig`` of a preset shape for a locally built tokenizer.

    The vocabulary is the shape's (at least the tokenizer's), or exactly the
    tokenizer's with ``exact_vocab`` (models trained here)."""
    from transformers import LlavaOnevisionConfig

    text = dict(shape["text_config"])
    text["vocab_size"] = len(tokenizer) if exact_vocab else max(text.get("vocab_size", 0), len(tokenizer))
    return LlavaOnevisionConfig(
        text_config=text, vision_config=dict(shape["vision_config"]),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        tie_word_embeddings=text.get("tie_word_embeddings", False),
    )


def build_llava_onevision(preset: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                          seed: int = 0, words: tuple[str, ...] = ()) -> LlavaOnevisionAdapter:
    """A LLaVA-OneVision of a preset shape with random weights, built offline and deterministically."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from mukv.tokenizer import build_word_tokenizer

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = REAL_CONFIGS[preset]
    tokenizer = build_word_tokenizer(words or _bench_words())
    config = onevision_config(shape, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlavaOnevisionForConditionalGeneration(config)
    model = model.to(dtype=dtype).eval()
    return LlavaOnevisionAdapter(model, tokenizer, name=preset)


def _bench_words() -> tuple[str, ...]:
    try:
        from mukv.bench import VOCABULARY
    except Exception:  # the benchmark is optional for a random model
        return ()
    return tuple(VOCABULARY)
