"""The training forward: the "mukv_train" attention (differentiable, with the same
lower-right causal mask and column sums as inference), the hooks that record what
the training-only losses need, and the pieces of a forward pass (encode, system prompt,
block prefill, answer logits, query vectors), each the training twin of a
:class:`mukv.model.HFVideoLLM` method."""

from __future__ import annotations

import threading
from typing import Any, Sequence

import torch

TRAIN_ATTN_IMPL = "mukv_train"
_state = threading.local()
_train_registered = False


def register_train_attention() -> None:
    """Register the "mukv_train" attention: inside :func:`_ours` calls, every layer runs
    mukv's :func:`~mukv.model.causal_attention` (lower-right causal sdpa, differentiable)
    and the named layer also records :func:`~mukv.model.attention_column_sums` under
    ``no_grad`` (exactly what :class:`~mukv.model.HFVideoLLM` computes at inference);
    every other call (the vision tower) goes to transformers' sdpa."""
    global _train_registered
    if _train_registered:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from ..model import attention_column_sums, causal_attention

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if not getattr(_state, "active", False):
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
        out = causal_attention(query, key, value, scaling)
        cap = getattr(_state, "capture", None)
        if cap is not None and getattr(module, "layer_idx", None) in cap.layers:
            cap.record(query, key, scaling)
        if getattr(_state, "module", None) is module:
            with torch.no_grad():
                _state.colsum = attention_column_sums(query.detach(), key.detach(), scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(TRAIN_ATTN_IMPL, attention)
    AttentionMaskInterface.register(TRAIN_ATTN_IMPL, sdpa_mask)
    _train_registered = True


class EvidenceAttention:
    """Attention of the answer position to the evidence tokens, recorded during
    one answer-prompt forward (training only; see ``TrainConfig.attn_sup``).

    Args:
        layers: language-model layer indices whose attention is read.
        heads: the first ``heads`` query heads of each of those layers.
        evidence: float ``[Q, C]``, 1 on the context positions (system prompt +
            memory) that hold the question's evidence.
        rows: ``[Q]`` index, within the answer prompt, of the position that
            predicts the answer word.

    After the forward, :attr:`mass` is ``[Q, len(layers) * heads]``: the share of
    each head's attention (softmax over the whole context and the prompt up to
    that position) that falls on the evidence.
    """

    def __init__(self, layers: Sequence[int], heads: int, evidence: torch.Tensor, rows: torch.Tensor):
        self.layers, self.heads, self.evidence, self.rows = set(layers), int(heads), evidence, rows
        self._mass: list[torch.Tensor] = []

    def record(self, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        """``query [Q, H, N, D]`` (the prompt), ``key [Q, Hkv, C + N, D]`` (context + prompt)."""
        q, h, n, d = query.shape
        c = key.shape[2] - n
        idx = torch.arange(q, device=query.device)
        rows = query[idx, : self.heads, self.rows].float()  # [Q, h, D]
        groups = h // key.shape[1]
        keys = key[:, torch.arange(self.heads, device=key.device) // groups].float()  # [Q, h, C + N, D]
        logits = torch.einsum("qhd,qhsd->qhs", rows, keys) * (scaling if scaling is not None else d ** -0.5)
        pos = torch.arange(c + n, device=key.device)
        logits = logits.masked_fill((pos[None, :] > c + self.rows[:, None])[:, None, :], float("-inf"))
        p = logits.softmax(-1)[..., : self.evidence.shape[1]]
        self._mass.append((p * self.evidence[:, None, :].to(p.dtype)).sum(-1))

    @property
    def mass(self) -> torch.Tensor:
        return torch.cat(self._mass, dim=1)


class MidCapture:
    """Records the residual stream entering language-model layer ``layer`` during
    the calls made while :attr:`key` is set (training only: the targets of
    ``TrainConfig.aux_mid`` and ``TrainConfig.query_aux``).

    Use as a context manager around a training forward; set :attr:`key` to a name
    before a call whose input hidden states ``[B, L, E]`` should be kept under it.
    """

    def __init__(self, adapter, layer: int):
        self.layer, self.key = int(layer), None
        self.store: dict[str, torch.Tensor] = {}
        self._module = adapter.language_model.layers[self.layer]
        self._handle = None

    def _hook(self, module, args, kwargs):
        if self.key is not None:
            self.store[self.key] = args[0] if args else kwargs["hidden_states"]

    def __enter__(self) -> "MidCapture":
        self._handle = self._module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()
        self.key = None


class _ours:
    """Marks a language-model call as causal aligned to the end (see :func:`register_train_attention`)."""

    def __init__(self, module: torch.nn.Module | None = None, capture: EvidenceAttention | None = None):
        self.module = module
        self.capture = capture
        self.colsum = None

    def __enter__(self) -> "_ours":
        self._saved = (getattr(_state, "active", False), getattr(_state, "module", None),
                       getattr(_state, "capture", None))
        _state.active, _state.module, _state.colsum, _state.capture = True, self.module, None, self.capture
        return self

    def __exit__(self, *exc: Any) -> None:
        self.colsum = getattr(_state, "colsum", None)
        _state.active, _state.module, _state.capture = self._saved
        _state.colsum = None


def training_mode(adapter, on: bool = True) -> None:
    """Switch ``adapter.model`` between training ("mukv_train" attention, train mode)
    and mukv's inference attention (eval mode)."""
    from ..model import ATTN_IMPL

    if on:
        register_train_attention()
        adapter.model.set_attn_implementation(TRAIN_ATTN_IMPL)
        adapter.model.train()
    else:
        adapter.model.set_attn_implementation(ATTN_IMPL)
        adapter.model.eval()


KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), [B, H, S, D]


def _cache(kv: KV | None):
    from transformers import DynamicCache

    return DynamicCache() if kv is None else DynamicCache(ddp_cache_data=[(k, v) for k, v in kv])


def encode(adapter, frames: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, F, S, S, 3]`` -> visual tokens ``[B, F, T, E]`` (with gradients):
    the adapter's own preprocessing and ``get_video_features`` (tower, projector, 2x2 pooling)."""
    b, f = frames.shape[:2]
    pixels = adapter.preprocess(frames.reshape(b * f, *frames.shape[2:]))
    pixels = pixels.reshape(b, f, *pixels.shape[1:])
    out = adapter.model.model.get_video_features(
        pixels, vision_feature_layer=adapter.feature_layer, vision_feature_select_strategy=adapter.select_strategy,
    ).pooler_output  # [B, F * T (+ 1), E]: newer transformers append the newline embedding
    return out[:, : f * adapter.tokens_per_frame].reshape(b, f, adapter.tokens_per_frame, -1)


def prefix_kv(adapter, system_prompt: str | None = None) -> KV:
    """KV of the system prompt ``[1, H, P, D]`` per layer (with gradients)."""
    ids = adapter.tokenize(adapter.default_system_prompt if system_prompt is None else system_prompt)
    cache = _cache(None)
    with _ours():
        adapter.language_model(input_ids=ids[None], past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def prefill(adapter, prefix: KV, embeds: torch.Tensor, attention: bool = False,
            hidden: list[torch.Tensor] | None = None, prefix_ids: torch.Tensor | None = None
            ) -> tuple[KV, torch.Tensor | None]:
    """Blocks ``[B, L, E]``, each on its own after the system prompt at positions
    ``P .. P + L - 1`` (the training twin of ``HFVideoLLM.prefill_blocks``).

    Returns the blocks' KV ``[B, H, L, D]`` per layer (prompt positions dropped)
    and, with ``attention``, the last layer's column sums ``[B, L]`` (no gradient).
    With ``hidden`` (a list), the blocks' final hidden states ``[B, L, E]`` are appended to it.

    With ``prefix_ids`` (the system prompt's ids ``[P]``) and no ``attention``, the
    system prompt is run again in front of every block instead of read from
    ``prefix``: the same KV (same tokens, same positions), but every attention call
    is then square and causal, which sdpa runs as flash attention in the backward
    pass too; the end-aligned mask of a cached prefix falls back to a kernel that
    materialises ``[B, H, L, P + L]`` scores on some torch builds.
    """
    b, length, _ = embeds.shape
    p = prefix[0][0].shape[2]
    if prefix_ids is not None and not attention:
        pe = adapter.language_model.embed_tokens(prefix_ids)[None].expand(b, -1, -1)
        seq = torch.cat([pe.to(embeds.dtype), embeds], dim=1)
        cache = _cache(None)
        positions = torch.arange(p + length, device=embeds.device)[None].expand(b, -1)
        with _ours():
            out = adapter.language_model(inputs_embeds=seq, past_key_values=cache, position_ids=positions,
                                         use_cache=True)
        if hidden is not None:
            hidden.append(out.last_hidden_state[:, p:])
        return [(layer.keys[:, :, p:], layer.values[:, :, p:]) for layer in cache.layers], None
    cache = _cache([(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix])
    positions = torch.arange(p, p + length, device=embeds.device)[None].expand(b, -1)
    last = adapter.language_model.layers[-1].self_attn
    with _ours(last if attention else None) as call:
        out = adapter.language_model(inputs_embeds=embeds, past_key_values=cache, position_ids=positions,
                                     use_cache=True)
    if hidden is not None:
        hidden.append(out.last_hidden_state)
    kv = [(layer.keys[:, :, p:], layer.values[:, :, p:]) for layer in cache.layers]
    cols = call.colsum[:, p:] if call.colsum is not None else None
    return kv, cols


def answer_logits(adapter, context: KV, ids: torch.Tensor, start: torch.Tensor, at: torch.Tensor,
                  capture: EvidenceAttention | None = None) -> torch.Tensor:
    """Logits of the answer prompt + teacher-forced answer run after ``context``.

    Args:
        context: ``[Q, H, C, D]`` per layer (system prompt + memory).
        ids: ``[Q, N]`` answer-prompt + answer token ids (right-padded).
        start: ``[Q]`` RoPE position of each row's first token (``C`` in ``HFVideoLLM.generate``).
        at: ``[Q, M]`` token positions (within ``ids``) whose next-token logits are wanted.
        capture: records the answer position's attention to the evidence.

    Returns:
        ``[Q, M, V]`` logits.
    """
    n = ids.shape[1]
    positions = start[:, None] + torch.arange(n, device=ids.device)[None]
    with _ours(capture=capture):
        hidden = adapter.language_model(input_ids=ids, past_key_values=_cache(context), position_ids=positions,
                                        use_cache=True).last_hidden_state
    hidden = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))
    return adapter.lm_head(hidden)


def query_vectors(adapter, prefix: KV, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[Q, V]`` last-layer key of each question's final token after the system
    prompt (``HFVideoLLM.query_vector``, batched over right-padded ``ids``)."""
    q = ids.shape[0]
    p = prefix[0][0].shape[2]
    cache = _cache([(k.expand(q, -1, -1, -1), v.expand(q, -1, -1, -1)) for k, v in prefix])
    positions = torch.arange(p, p + ids.shape[1], device=ids.device)[None].expand(q, -1)
    with _ours():
        adapter.language_model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True)
    keys = cache.layers[-1].keys  # [Q, H, P + N, D]
    last = keys[torch.arange(q, device=ids.device), :, p + lengths - 1]  # [Q, H, D]
    return last.reshape(q, -1).float()


def _cat_kv(parts: Sequence[KV]) -> KV:
    return [(torch.cat([p[y][0] for p in parts], dim=2), torch.cat([p[y][1] for p in parts], dim=2))
            for y in range(len(parts[0]))]


def _take(kv: KV, index: torch.Tensor) -> KV:
    return [(k.index_select(0, index), v.index_select(0, index)) for k, v in kv]
