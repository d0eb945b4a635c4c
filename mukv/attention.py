"""mukv's attention inside a transformers decoder: the "mukv_sdpa" attention function and the
per-call state that steers it.

Inside :class:`~mukv.model.HFVideoLLM`'s own calls (:class:`_Causal`: prefill, query vector,
answer) every layer runs sdpa with a lower-right causal bias, and one named layer also returns
its attention column sums (:func:`attention_column_sums`, computed in chunks so its attention
weights never exist whole); under an explicit mask (the static decoder, ReKV's window) every
layer attends under that mask (:func:`static_attention`). Any other call goes to transformers'
sdpa unchanged.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTN_IMPL = "mukv_sdpa"
_capture = threading.local()
_registered = False
#: Per device type: whether sdpa with a lower-right causal bias (flash attention where
#: the device has it) matched the masked reference on its first use.
_LOWER_RIGHT_OK: dict[str, bool] = {}
#: Whether CUDA graph capture works in this process ("ok"), and why not ("error").
GRAPHS: dict[str, Any] = {}
#: Upper bound on the float32 logits one chunk of the column-sum pass may hold.
COLUMN_SUM_CHUNK_BYTES = 256 * 2**20


def _register_attention() -> None:
    """Register the "mukv_sdpa" attention function.

    Inside :class:`HFVideoLLM`'s own calls (prefill, query vector, answer), where
    the mask is known to be causal aligned to the end with no padding, every
    layer runs sdpa with a lower-right causal bias (flash attention on CUDA, no
    mask tensor, no repeated KV heads), and the one layer a prefill names also
    returns its attention column sums. Any other call (the vision tower, a user's
    own ``model.generate``) goes to transformers' sdpa unchanged.

    Under an explicit mask (``_capture.static_mask``: the static decoder, the
    sliding-window prefill of :mod:`mukv.local_window`) every layer attends under that
    mask. ``_capture.hook``, when set, sees every layer's ``(module, query, key,
    value, scaling)`` of our calls (RoPE applied): the window prefill takes its column
    sums there, :func:`mukv.local_window.question_queries` the question's queries; in a causal
    call it may return new ``(key, value)`` to attend to (the question run over each
    layer's own retrieved blocks).
    """
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        mask = getattr(_capture, "static_mask", None)
        hook = getattr(_capture, "hook", None)
        if mask is not None:
            if hook is not None:
                hook(module, query, key, value, scaling)
            return static_attention(query, key, value, mask, scaling).transpose(1, 2).contiguous(), None
        if not getattr(_capture, "causal", False) or dropout:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                          **kwargs)
        if hook is not None:  # it may put more keys and values before the call's own (a layer's own context)
            key, value = hook(module, query, key, value, scaling) or (key, value)
        out = causal_attention(query, key, value, scaling)
        if getattr(_capture, "module", None) is module:
            _capture.colsum = attention_column_sums(query, key, scaling)
        return out.transpose(1, 2).contiguous(), None

    global _attention
    _attention = attention
    AttentionInterface.register(ATTN_IMPL, attention)
    AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)
    _registered = True


_attention = None


def keep_attention_eager() -> None:
    """Run the "mukv_sdpa" attention function outside any compiled graph (``mukv.accel``'s
    compiled decoder layers): it reads per-call state (``_capture``) that a graph would bake in."""
    from transformers import AttentionInterface

    _register_attention()
    AttentionInterface.register(ATTN_IMPL, torch.compiler.disable(_attention, recursive=True))


def _masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Lower-right causal attention with an explicit mask and repeated KV heads (the portable path)."""
    length, s = query.shape[2], key.shape[2]
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    mask = torch.ones(length, s, dtype=torch.bool, device=query.device).tril(s - length)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Attention of ``query [B, Hq, L, D]`` over ``key, value [B, Hk, S, D]`` (S >= L),
    causal aligned to the end: query i sees keys ``0 .. S - L + i``. Returns ``[B, Hq, L, D]``.

    Uses sdpa with a lower-right causal bias and grouped-query heads (flash
    attention on CUDA): no mask tensor and no copies of the KV heads. The first
    call on a device is checked against the masked path; if they disagree the
    masked path is used from then on.
    """
    length, s = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    if length == 1:
        return F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=gqa)
    if length == s:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=gqa)
    dev = query.device.type
    ok = _LOWER_RIGHT_OK.get(dev)
    if ok is False:
        return _masked_attention(query, key, value, scale)
    try:
        from torch.nn.attention.bias import causal_lower_right

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=causal_lower_right(length, s), scale=scale,
                                             enable_gqa=gqa)
    except (RuntimeError, TypeError, ValueError, ImportError):
        _LOWER_RIGHT_OK[dev] = False
        return _masked_attention(query, key, value, scale)
    if ok is None:
        ref = _masked_attention(query[:1], key[:1], value[:1], scale)
        err = (out[:1].float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)
        _LOWER_RIGHT_OK[dev] = bool(err < 2e-2)
        if not _LOWER_RIGHT_OK[dev]:
            return _masked_attention(query, key, value, scale)
    return out


def static_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scale: float | None) -> torch.Tensor:
    """Attention of ``query [1, Hq, Lq, D]`` over a whole KV workspace ``key, value
    [1, Hk, C, D]`` under ``mask [Lq, C]`` (True = attend), or that mask already
    folded to ``[1, 1, rep * Lq, C]`` (boolean or additive). Returns ``[1, Hq, Lq, D]``.

    The query heads that share a KV head are folded into the query axis, so
    grouped-query attention needs no copy of the workspace and the mask is
    one ``[Hk-shared rows, C]`` matrix.
    """
    b, hq, lq, d = query.shape
    hk, c = key.shape[1], key.shape[2]
    rep = hq // hk
    q = query.reshape(b, hk, rep * lq, d)
    if mask.ndim == 2:  # [Lq, C] -> one row per folded query head
        mask = mask[None].expand(rep, lq, c).reshape(1, 1, rep * lq, c)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, lq, out.shape[-1])


def attention_column_sums(query: torch.Tensor, key: torch.Tensor, scaling: float | None,
                          chunk_bytes: int | None = None) -> torch.Tensor:
    """Column sums of one layer's causal attention, without its attention output.

    Args:
        query: ``[B, Hq, L, D]``; key: ``[B, Hk, S, D]`` (``S = past + L``; query
            i sees keys ``0 .. past + i``, grouped-query heads as in ``repeat_kv``).
        scaling: softmax scale (default ``D ** -0.5``).
        chunk_bytes: float32 logits held at once (default
            :data:`COLUMN_SUM_CHUNK_BYTES`); the query axis is cut to fit.

    Returns:
        ``colsum [B, S]`` (float32): the attention each key position receives,
        summed over queries and averaged over query heads.

    The logits are float32 (a float32 product of the bf16 inputs); each chunk
    of queries is multiplied only with the keys it can see, masked, normalised
    in place and summed. Nothing of size ``[B, Hq, L, S]`` exists at once unless
    it fits ``chunk_bytes``.
    """
    b, hq, length, d = query.shape
    hk, s = key.shape[1], key.shape[2]
    rep = hq // hk
    past = s - length
    scale = scaling if scaling is not None else d**-0.5
    budget = COLUMN_SUM_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    chunk = max(1, min(length, budget // max(1, b * hq * s * 4)))
    kf = key.float()
    colsum = torch.zeros(b, s, dtype=torch.float32, device=query.device)
    for i in range(0, length, chunk):
        c = min(chunk, length - i)
        visible = past + i + c  # keys this chunk can see
        # [B, Hq, c, D] -> [B, Hk, rep * c, D]: each KV head with the query heads it serves
        q = (query[:, :, i : i + c].float() * scale).reshape(b, hk, rep * c, d)
        logits = torch.matmul(q, kf[:, :, :visible].transpose(-1, -2))  # [B, Hk, rep * c, visible]
        rows = torch.arange(past + i, past + i + c, device=query.device)[:, None]
        hidden = torch.arange(visible, device=query.device)[None, :] > rows  # [c, visible]
        logits.view(b, hk, rep, c, visible).masked_fill_(hidden, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        colsum[:, :visible] += weights.sum(dim=2).sum(dim=1)
    return colsum.div_(hq)


class _Causal:
    """Marks a call as one of ours: causal aligned to the end, no padding (see
    :func:`_register_attention`); optionally names the layer whose column sums
    to capture."""

    def __init__(self, module: nn.Module | None = None):
        self.module = module

    def __enter__(self) -> "_Causal":
        self._saved = (getattr(_capture, "causal", False), getattr(_capture, "module", None),
                       getattr(_capture, "fast", False))
        _capture.causal, _capture.module, _capture.colsum, _capture.fast = True, self.module, None, True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.colsum = getattr(_capture, "colsum", None)
        _capture.causal, _capture.module, _capture.fast = self._saved
        _capture.colsum = None
