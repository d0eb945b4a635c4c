"""LLaVA-OneVision through transformers' ``LlavaOnevisionForConditionalGeneration``.

Frames are preprocessed by mukv (resize to the vision tower's input size,
normalise with the checkpoint's mean and std) because transformers' processor
classes need torchvision. Video frames go through the vision tower, the
projector and LLaVA-OneVision's 2x2 bilinear pooling: 196 tokens per frame for
the real checkpoints (27x27 patches pooled to 14x14).

Two presentations of the same model (:class:`LlavaOnevisionSettings`):

* ``parity="mukv"`` (the default): the prompt text the model's chat template
  produces (ChatML, a newline after every role tag and after ``<|im_end|>``) and
  frames resized on the session's device (bilinear with antialiasing, batched);
* ``parity="authors"``: what the MuKV authors' code feeds the model, for a
  side-by-side comparison with it: their prompt strings (where each newline
  falls around ``system``, ``<|im_end|>`` and the question differs) and their
  frame resizing (PIL bicubic on the CPU, as the LLaVA-OneVision processor of
  transformers 4.x does it, then rescale and normalise).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import model_validator

from mukv.checkpoints import channel_stats
from mukv.model import HFVideoLLM, load_checkpoint, read_model_defaults
from mukv.specs import PluginSettings

#: The chat template's text (ChatML): before the blocks, after them (the query vector's text,
#: whose final key is the query), and between the retrieved context and the answer.
SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
QUERY_TEMPLATE = "\n{question}"
ANSWER_TEMPLATE = "\n{question}<|im_end|>\n<|im_start|>assistant\n"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")

#: The MuKV authors' strings for LLaVA-OneVision (their ``load_model``, ``get_prompt`` and
#: ``question_answering``): a space before the newline after ``system``, no newline after
#: ``<|im_end|>``, a space instead of a newline after ``user``, the bare question for the query.
AUTHORS_SYSTEM_PROMPT = "<|im_start|>system \nYou are a helpful assistant.<|im_end|><|im_start|>user "
AUTHORS_QUERY_TEMPLATE = "{question}"
AUTHORS_ANSWER_TEMPLATE = "\n{question}<|im_end|><|im_start|>assistant\n"

#: ``prompts`` setting -> (system prompt, query template, answer template).
PROMPTS: dict[str, tuple[str, str, str]] = {
    "chat_template": (SYSTEM_PROMPT, QUERY_TEMPLATE, ANSWER_TEMPLATE),
    "authors": (AUTHORS_SYSTEM_PROMPT, AUTHORS_QUERY_TEMPLATE, AUTHORS_ANSWER_TEMPLATE),
}
#: ``parity`` preset -> its prompts and resizing.
PARITY: dict[str, dict[str, str]] = {
    "mukv": {"prompts": "chat_template", "resize": "bilinear"},
    "authors": {"prompts": "authors", "resize": "pil_bicubic"},
}


class LlavaOnevisionSettings(PluginSettings):
    """Settings of the LLaVA-OneVision adapter and its presets, e.g.
    ``Session(model={"name": "llava-onevision-qwen2-0.5b-ov", "parity": "authors"})``.

    ``parity`` picks both presentations at once; ``prompts`` and ``resize`` change one of them.
    """

    parity: Literal["mukv", "authors"] = "mukv"
    """"mukv": the model's own chat template and mukv's batched resize on the device;
    "authors": the MuKV authors' prompt text and PIL bicubic resizing, to get the token
    ids and pixels of their code (docs/concepts/method.md says where they differ)."""

    prompts: Literal["chat_template", "authors"] | None = None
    """Prompt text: "chat_template" (ChatML as the chat template writes it) or "authors"
    (their strings); ``None``: as ``parity`` says."""

    resize: Literal["bilinear", "pil_bicubic"] | None = None
    """Frame resizing to the vision tower's input: "bilinear" (antialiased, on the session's
    device, batched) or "pil_bicubic" (PIL on the CPU, frame by frame, as the
    LLaVA-OneVision processor of transformers 4.x); ``None``: as ``parity`` says."""

    @model_validator(mode="after")
    def _fill(self) -> "LlavaOnevisionSettings":
        preset = PARITY[self.parity]
        if self.prompts is None:
            object.__setattr__(self, "prompts", preset["prompts"])
        if self.resize is None:
            object.__setattr__(self, "resize", preset["resize"])
        return self


class LlavaOnevisionAdapter(HFVideoLLM):
    """Model adapter for LLaVA-OneVision checkpoints (``model_type`` "llava_onevision").

    Args:
        model: a ``LlavaOnevisionForConditionalGeneration``.
        tokenizer: its tokenizer.
        image_mean, image_std: per-channel normalisation of the vision tower.
        name: model id recorded in stores.
        system_prompt: the default system prompt (``None``: the one ``prompts`` gives).
        parity, prompts, resize: see :class:`LlavaOnevisionSettings`.
    """

    model_types = ("llava_onevision",)
    Settings = LlavaOnevisionSettings

    def __init__(self, model, tokenizer, *, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), name="llava_onevision",
                 system_prompt: str | None = None, parity: str = "mukv", prompts: str | None = None,
                 resize: str | None = None):
        vc = model.config.vision_config
        side = vc.image_size // vc.patch_size
        pooled = math.ceil(side / 2)
        self.settings = LlavaOnevisionSettings(parity=parity, prompts=prompts, resize=resize)
        system, query, answer = PROMPTS[self.settings.prompts]
        super().__init__(
            model, tokenizer,
            language_model=model.model.language_model, lm_head=model.lm_head,
            grid=(pooled, pooled), system_prompt=system if system_prompt is None else system_prompt,
            query_template=query, answer_template=answer, stop_tokens=STOP_TOKENS, name=name,
        )
        self.image_size = vc.image_size
        self.feature_layer = model.config.vision_feature_layer
        self.select_strategy = model.config.vision_feature_select_strategy
        self._mean = torch.tensor(image_mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(image_std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        inner = model.model
        if hasattr(inner, "apply_pooling"):  # the same arithmetic, in the layout the GPU kernel is fast in
            inner.apply_pooling = lambda features: pool_frames(features, side)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``uint8 [n, H, W, 3]`` -> normalised ``[n, 3, S, S]`` pixels in the model dtype."""
        if self.settings.resize == "pil_bicubic":
            return self._preprocess_pil(frames)
        x = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        x = (x - self._mean) / self._std
        return x.to(self.dtype)

    def _preprocess_pil(self, frames: torch.Tensor) -> torch.Tensor:
        """The authors' path: each frame resized with PIL bicubic to ``S x S`` (uint8), then
        ``x / 255`` (computed in float64, kept as float32) and ``(x - mean) / std`` in float32,
        as the LLaVA-OneVision processor of transformers 4.x does."""
        from PIL import Image

        s = self.image_size
        host = frames.detach().cpu().numpy()
        resized = np.stack([np.asarray(Image.fromarray(f).resize((s, s), Image.BICUBIC)) for f in host])
        x = torch.from_numpy((resized.astype(np.float64) * (1 / 255)).astype(np.float32))
        x = x.permute(0, 3, 1, 2)
        x = (x - self._mean.cpu()) / self._std.cpu()
        return x.to(self.device, self.dtype)

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
        mean = channel_stats(pre, "image_mean", (0.5, 0.5, 0.5), path)
        std = channel_stats(pre, "image_std", (0.5, 0.5, 0.5), path)
        adapter = cls(model, tokenizer, image_mean=mean, image_std=std, name=Path(path).name, **kwargs)
        adapter.default_config = defaults
        return adapter


def pool_frames(features: torch.Tensor, side: int) -> torch.Tensor:
    """LLaVA-OneVision's pooling of each frame: ``[n, side * side, E]`` projected patch features
    -> ``[n, ceil(side / 2) ** 2, E]`` by 2x bilinear downscaling of the patch grid.

    The same arithmetic as transformers' ``apply_pooling`` (results are bit for bit equal), which
    first copies the grid to channels-first memory: there CUDA's bilinear kernel runs one thread
    per output position (196 of them) and loops over every frame and channel, which took 47 ms
    of 242 for 128 frames on an H100 (``benchmarks/profile_ingest.py``). Channels-last memory
    takes the kernel that runs a thread per output element.
    """
    n, _, dim = features.shape
    grid = features.view(n, side, side, dim).permute(0, 3, 1, 2)  # a channels-last view, no copy
    pooled = F.interpolate(grid, size=[math.ceil(side / 2)] * 2, mode="bilinear")
    return pooled.permute(0, 2, 3, 1).reshape(n, -1, dim)


# ------------------------------------------------------------------------------ presets
#: Language model and vision tower shapes of the real checkpoints (llava-hf configs).
REAL_CONFIGS: dict[str, dict[str, Any]] = {
    "llava-onevision-qwen2-0.5b-ov": dict(
        text_config=dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0, vocab_size=151647,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                           vision_use_head=False),
    ),
    "llava-onevision-qwen2-7b-ov": dict(
        text_config=dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, rope_theta=1_000_000.0, vocab_size=152128,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                           vision_use_head=False),
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
                          seed: int = 0, words: tuple[str, ...] = (), **settings: Any) -> LlavaOnevisionAdapter:
    """A LLaVA-OneVision of a preset shape with random weights, built offline and deterministically
    (``settings``: :class:`LlavaOnevisionSettings`)."""
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
    adapter = LlavaOnevisionAdapter(model, tokenizer, name=preset, **settings)
    adapter.random_weights = True
    return adapter


def _bench_words() -> tuple[str, ...]:
    try:
        from mukv.bench import VOCABULARY
    except Exception:  # the benchmark is optional for a random model
        return ()
    return tuple(VOCABULARY)
