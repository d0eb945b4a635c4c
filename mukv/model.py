"""The language-model side of a Video-LLM, written once for transformers decoders.

:class:`HFVideoLLM` implements everything a model adapter needs except
:meth:`~mukv.interfaces.ModelAdapter.encode_frames`:

* the system prompt's KV (computed once per session),
* batched prefill of blocks after the system prompt, returning every layer's
  KV and the last layer's attention column sums: only the last layer's
  attention is computed explicitly, every other layer stays on sdpa,
* the query vector of a question,
* greedy decoding from an assembled cache with explicit positions.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from .blocks import KVLayout
from .interfaces import ModelAdapter

ATTN_IMPL = "mukv_sdpa"
_capture = threading.local()
_registered = False


def _register_attention() -> None:
    """Register the "mukv_sdpa" attention: sdpa everywhere, plus column sums in
    the one layer a prefill asks for."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        target = getattr(_capture, "module", None)
        if target is not None and module is target:
            out, colsum = _attention_with_column_sums(query, key, value, attention_mask, scaling)
            _capture.colsum = colsum
            return out, None
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    AttentionInterface.register(ATTN_IMPL, attention)
    AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)
    _registered = True


def _attention_with_column_sums(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float | None,
    chunk: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention for one layer that also returns column sums.

    Args:
        query: ``[B, Hq, L, D]``; key, value: ``[B, Hk, S, D]`` (S = past + L).
        mask: boolean ``[B, 1, L, S]`` (True = attend) or ``None`` (causal,
            aligned to the end).

    Returns:
        ``(out [B, L, Hq, D], colsum [B, S])``: the attention output in the
        layout transformers expects, and the attention each key position
        receives, summed over queries and averaged over heads (float32).
    """
    b, hq, length, d = query.shape
    hk, s = key.shape[1], key.shape[2]
    rep = hq // hk
    scale = scaling if scaling is not None else d**-0.5
    k = key.repeat_interleave(rep, dim=1) if rep > 1 else key
    v = value.repeat_interleave(rep, dim=1) if rep > 1 else value
    out = torch.empty_like(query)
    colsum = torch.zeros(b, s, dtype=torch.float32, device=query.device)
    past = s - length
    for i in range(0, length, chunk):
        q = query[:, :, i : i + chunk]
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, Hq, c, S]
        if mask is not None:
            m = mask[:, :, i : i + chunk]
            if m.dtype == torch.bool:
                logits = logits.masked_fill(~m, float("-inf"))
            else:
                logits = logits + m.float()
        else:
            rows = torch.arange(i, i + q.shape[2], device=q.device)[:, None] + past
            cols = torch.arange(s, device=q.device)[None, :]
            logits = logits.masked_fill(cols > rows, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        out[:, :, i : i + chunk] = torch.matmul(weights, v.float()).to(query.dtype)
        colsum += weights.sum(dim=2).mean(dim=1)
    return out.transpose(1, 2).contiguous(), colsum


@dataclass
class PrefixKV:
    """KV of the system prompt: ``kv [Y, 2, 1, H, P, D]`` and its token ids."""

    kv: torch.Tensor
    token_ids: torch.Tensor

    @property
    def length(self) -> int:
        """P, tokens in the system prompt."""
        return self.kv.shape[4]


def kv_to_cache(kv: torch.Tensor):
    """Wrap ``[Y, 2, B, H, S, D]`` as a transformers ``DynamicCache`` (no copy)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(kv[y, 0], kv[y, 1]) for y in range(kv.shape[0])])


def cache_to_kv(cache) -> torch.Tensor:
    """Stack a ``DynamicCache`` into ``[Y, 2, B, H, S, D]`` (one copy)."""
    return torch.stack([torch.stack((layer.keys, layer.values)) for layer in cache.layers])


class HFVideoLLM(ModelAdapter):
    """A transformers Video-LLM: a vision encoder (subclass) + a decoder language model.

    Args:
        model: the transformers model (e.g. ``LlavaOnevisionForConditionalGeneration``).
        tokenizer: a transformers tokenizer (fast).
        language_model: the decoder stack (``model.model.language_model``).
        lm_head: the output projection.
        grid: ``(h, w)`` visual tokens per frame.
        system_prompt: default text before every block and question.
        query_template: text whose final token's key is the query vector
            (``{question}`` is replaced).
        answer_template: text between the retrieved KV and the answer.
        stop_tokens: token strings that end decoding.
        name: model id, recorded in stores.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        language_model: nn.Module,
        lm_head: nn.Module,
        grid: tuple[int, int],
        system_prompt: str,
        query_template: str,
        answer_template: str,
        stop_tokens: Iterable[str] = (),
        name: str = "",
    ):
        _register_attention()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.language_model = language_model
        self.lm_head = lm_head
        self.grid = grid
        self.default_system_prompt = system_prompt
        self.query_template = query_template
        self.answer_template = answer_template
        self.name = name
        model.set_attn_implementation(ATTN_IMPL)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = language_model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.layout = KVLayout(
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            dtype=self.dtype,
            model_id=f"{name}:{cfg.model_type}:{cfg.num_hidden_layers}x{cfg.num_key_value_heads}x{head_dim}",
        )
        self.hidden_size = cfg.hidden_size
        ids = set()
        for tok in stop_tokens:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid >= 0 and tid != getattr(tokenizer, "unk_token_id", None):
                ids.add(tid)
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        self.stop_ids = sorted(ids)
        self._embed = language_model.get_input_embeddings()

    # -- properties --------------------------------------------------------------------
    @property
    def tokens_per_frame(self) -> int:
        """T, visual tokens per frame."""
        return self.grid[0] * self.grid[1]

    def tokenize(self, text: str) -> torch.Tensor:
        """``LongTensor[n]`` token ids of ``text`` (no special tokens added)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[..., E]`` input embeddings of token ids."""
        return self._embed(ids)

    # -- prefill ------------------------------------------------------------------------
    @torch.inference_mode()
    def prefix(self, system_prompt: str | None = None) -> PrefixKV:
        """KV of the system prompt (computed once per session)."""
        text = self.default_system_prompt if system_prompt is None else system_prompt
        ids = self.tokenize(text)
        if ids.numel() == 0:
            kv = torch.empty(self.layout.num_layers, 2, 1, self.layout.num_kv_heads, 0, self.layout.head_dim,
                             dtype=self.dtype, device=self.device)
            return PrefixKV(kv, ids)
        out = self.language_model(input_ids=ids[None], use_cache=True)
        return PrefixKV(cache_to_kv(out.past_key_values), ids)

    @torch.inference_mode()
    def prefill_blocks(
        self, prefix: PrefixKV, embeds: torch.Tensor, attention: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Run a batch of blocks, each on its own after the system prompt.

        Each block attends to the system prompt and causally within itself, at
        positions ``P .. P + L - 1``, as in the authors' method; blocks of a
        batch never see each other.

        Args:
            prefix: the system prompt's KV.
            embeds: ``[B, L, E]`` input embeddings of the blocks.
            attention: also return the last layer's attention column sums.

        Returns:
            ``(kv [Y, 2, B, H, L, D], attention [B, L] or None, positions [L])``.
        """
        b, length, _ = embeds.shape
        p = prefix.length
        past = prefix.kv.expand(-1, -1, b, -1, -1, -1)
        cache = kv_to_cache(past)
        positions = torch.arange(p, p + length, device=self.device)
        last = self.language_model.layers[-1].self_attn
        _capture.module = last if attention else None
        _capture.colsum = None
        try:
            self.language_model(
                inputs_embeds=embeds.to(self.dtype), past_key_values=cache,
                position_ids=positions[None].expand(b, -1), use_cache=True,
            )
            colsum = _capture.colsum
        finally:
            _capture.module = None
            _capture.colsum = None
        kv = cache_to_kv(cache)[:, :, :, :, p:]
        cols = colsum[:, p:] if colsum is not None else None
        return kv.contiguous(), cols, positions

    @torch.inference_mode()
    def query_vector(self, prefix: PrefixKV, question: str) -> torch.Tensor:
        """``[V]`` last-layer key of the question's final token, after the system prompt (float32)."""
        ids = self.tokenize(self.query_template.format(question=question))
        cache = kv_to_cache(prefix.kv)
        p = prefix.length
        positions = torch.arange(p, p + ids.numel(), device=self.device)[None]
        self.language_model(input_ids=ids[None], past_key_values=cache, position_ids=positions, use_cache=True)
        key = cache.layers[-1].keys[0, :, -1, :]  # [H, D]
        return key.reshape(-1).float()

    # -- decoding -----------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self, context: torch.Tensor, question: str, max_new_tokens: int, start_position: int | None = None
    ) -> tuple[str, list[int], dict[str, float]]:
        """Greedy answer to ``question`` from an assembled context.

        Args:
            context: ``[Y, 2, 1, H, C, D]`` KV of the system prompt + retrieved blocks.
            question: the question.
            max_new_tokens: decoding budget.
            start_position: RoPE position of the first prompt token (default C).

        Returns:
            ``(text, token ids, timings)`` with timings "prefill" (answer prompt),
            "first_token" and "generate" in seconds.
        """
        timings: dict[str, float] = {}
        cache = kv_to_cache(context)
        ids = self.tokenize(self.answer_template.format(question=question))
        pos = context.shape[4] if start_position is None else start_position
        t0 = time.perf_counter()
        positions = torch.arange(pos, pos + ids.numel(), device=self.device)[None]
        hidden = self.language_model(
            input_ids=ids[None], past_key_values=cache, position_ids=positions, use_cache=True
        ).last_hidden_state[:, -1]
        pos += ids.numel()
        token = int(self.lm_head(hidden).argmax(-1))
        _sync(self.device)
        timings["prefill"] = timings["first_token"] = time.perf_counter() - t0
        out: list[int] = []
        stop = set(self.stop_ids)
        while token not in stop and len(out) < max_new_tokens:
            out.append(token)
            if len(out) == max_new_tokens:
                break
            step = torch.tensor([[token]], device=self.device)
            hidden = self.language_model(
                input_ids=step, past_key_values=cache, position_ids=torch.tensor([[pos]], device=self.device),
                use_cache=True,
            ).last_hidden_state[:, -1]
            pos += 1
            token = int(self.lm_head(hidden).argmax(-1))
        _sync(self.device)
        timings["generate"] = time.perf_counter() - t0
        text = self.tokenizer.decode(out, skip_special_tokens=True).strip()
        return text, out, timings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
