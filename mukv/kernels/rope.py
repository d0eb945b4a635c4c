"""The rotary embedding of queries and keys as one Triton kernel, at the speed of a copy.

transformers' ``apply_rotary_pos_emb`` computes ``q * cos + rotate_half(q) * sin`` (and the same
for ``k``) as five elementwise ops per tensor. ``fused_llm`` first compiled that function with
``torch.compile(dynamic=True)``; on an H100 the kernel it makes moved its bytes at 419-473 GB/s, a
quarter of a copy of the same tensors (``benchmarks/rope_bench.py``, 2026-12-07), and took 41 ms of
a 512-frame 0.5B prefill. Its indices are divided by sizes known only at run time, for every
element.

Here one program takes a tile of ``BLOCK_T`` tokens of one batch row: it reads the tile's ``cos``
and ``sin`` once, then, for every query head and every key head, reads the two halves of the
head's vectors, rotates them in float32 and writes them (one rounding to the input's dtype): the
queries in their own memory order (``[B, T, H, D]`` for the attention's projections, so the
attention's output needs no copy), the keys contiguous ``[B, H, T, D]`` (the layout of the KV buffer
they are copied into). Head dimension and
head counts are compile-time constants, so no index is divided at run time.

Arithmetic: with ``x = (x1, x2)`` the two halves of a head's vector,
``out = (x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2)`` in float32, rounded once; the same
formula as transformers' (which rounds after each op in bf16), so results agree with
:func:`rope_reference` to the output dtype's rounding.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from . import available, built, interpreting

#: Tokens per program, and warps per program (:data:`NUM_WARPS`): timed from CUDA graphs on an H100
#: (``benchmarks/rope_bench.py``, 2026-12-07), 16 tokens and 8 warps took 0.0207 / 0.0246 / 0.0048 ms at the
#: patch, segment and frame levels' token counts, against 0.0232 / 0.0281 / 0.0086 ms for 64 and 4.
BLOCK_T = 16
NUM_WARPS = 8
#: Fewer tokens per program under Triton's CPU interpreter (tests run small shapes).
INTERPRET_BLOCK_T = 8



def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' arithmetic for ``q [B, Hq, T, D]``, ``k [B, Hk, T, D]`` and ``cos``, ``sin``
    ``[B or 1, T, D]``, in the inputs' dtype (each op rounded)."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    half = q.shape[-1] // 2
    rq = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    rk = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return q * c + rq * s, k * c + rk * s


def _make(triton: Any, tl: Any) -> Any:
    @triton.jit
    def rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, oq_ptr, ok_ptr, T, sqb, sqh, sqt, skb, skh, skt,
                    scb, sct, ssb, sst, sob, soh, sot, spb, sph, spt, HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr,
                    HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)  # offsets in 64 bits: a batch of long blocks passes 2**31 elements
        t = (tl.program_id(0) * BLOCK_T).to(tl.int64) + tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        mask = (t[:, None] < T) & (d[None, :] < HALF)
        c_ptr = cos_ptr + b * scb + t[:, None] * sct + d[None, :]
        s_ptr = sin_ptr + b * ssb + t[:, None] * sst + d[None, :]
        c1 = tl.load(c_ptr, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(c_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(s_ptr, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(s_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        for h in tl.static_range(HQ):  # every query head of the tile (head counts are constants)
            src = q_ptr + b * sqb + h * sqh + t[:, None] * sqt + d[None, :]
            x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
            dst = oq_ptr + b * sob + h * soh + t[:, None] * sot + d[None, :]
            tl.store(dst, (x1 * c1 - x2 * s1).to(oq_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + HALF, (x2 * c2 + x1 * s2).to(oq_ptr.dtype.element_ty), mask=mask)
        for h in tl.static_range(HK):  # then every key head
            src = k_ptr + b * skb + h * skh + t[:, None] * skt + d[None, :]
            x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
            dst = ok_ptr + b * spb + h * sph + t[:, None] * spt + d[None, :]
            tl.store(dst, (x1 * c1 - x2 * s1).to(ok_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + HALF, (x2 * c2 + x1 * s2).to(ok_ptr.dtype.element_ty), mask=mask)

    return rope_kernel


def _kernel() -> Any:
    """The Triton kernel, built on first use."""
    return built("rope", _make)


def why_not(q: Any, k: Any, cos: Any, sin: Any) -> str | None:
    """Why :func:`rope` cannot take these tensors (the caller then runs the reference arithmetic),
    or ``None``."""
    ts = (q, k, cos, sin)
    if not all(isinstance(t, torch.Tensor) for t in ts):
        return "queries, keys, cos and sin must be tensors"
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        return (f"expected q [B, Hq, T, D], k [B, Hk, T, D], cos and sin [B, T, D]; got {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}")
    b, _, t, d = q.shape
    if k.shape[0] != b or k.shape[2:] != (t, d) or d % 2 or cos.shape != sin.shape:
        return f"queries {tuple(q.shape)} and keys {tuple(k.shape)} disagree (or an odd head dimension)"
    if cos.shape[1:] != (t, d) or cos.shape[0] not in (1, b):
        return f"cos and sin {tuple(cos.shape)} do not fit queries {tuple(q.shape)}"
    if len({x.device for x in ts}) != 1 or len({x.dtype for x in ts}) != 1 or not q.is_floating_point():
        return "queries, keys, cos and sin must share one floating-point dtype and one device"
    if q.device.type != "cuda" and not interpreting():
        return f"the rotary kernel runs on a CUDA GPU (or Triton's interpreter); these tensors are on {q.device}"
    if any(x.stride(-1) != 1 for x in ts):
        return "the head dimension must be contiguous (stride 1)"
    if q.requires_grad or k.requires_grad:
        return "the kernel has no backward"
    return available()


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_t: int | None = None,
         num_warps: int = NUM_WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of ``q`` and ``k`` as one kernel.

    Args:
        q: ``[B, Hq, T, D]`` queries, any strides with the last dimension contiguous (the attention's
            ``q_proj(x).view(B, T, Hq, D).transpose(1, 2)``).
        k: ``[B, Hk, T, D]`` keys, likewise.
        cos, sin: ``[B or 1, T, D]`` the rotary tables (transformers' ``position_embeddings``).
        block_t: tokens per program (a power of two; default :data:`BLOCK_T`, or
            :data:`INTERPRET_BLOCK_T` under the interpreter); ``num_warps``: warps per program (default
            :data:`NUM_WARPS`).
            Tuning knobs for ``benchmarks/rope_bench.py``.

    Returns:
        ``(q_rot, k_rot)``, ``[B, Hq, T, D]`` in ``q``'s memory order (a dense ``q``; else contiguous)
        and contiguous ``[B, Hk, T, D]``, in the inputs' dtype. Attention run on ``q_rot`` then writes
        its output in the ``[B, T, Hq, D]`` memory the output projection reads, without a copy (a
        contiguous ``q_rot`` cost one copy of the attention's output per layer, measured on an H100).

    Raises:
        ConfigError: tensors the kernel does not take (:func:`why_not` says which).
    """
    why = why_not(q, k, cos, sin)
    if why:
        raise ConfigError(f"rope: {why}")
    return _launch(q, k, cos, sin, block_t, num_warps)


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_t: int | None = None,
           num_warps: int = NUM_WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope` for tensors :func:`why_not` has already passed (a caller that checks them first, as
    ``fused_rope``'s rotary function does once per call, does not check them twice)."""
    b, hq, t, d = q.shape
    hk = k.shape[1]
    oq = torch.empty_like(q)  # in q's memory order where q is dense: the attention's output then needs no copy
    ok = torch.empty((b, hk, t, d), dtype=k.dtype, device=k.device)
    if oq.numel() == 0 or ok.numel() == 0:
        return oq, ok
    half = d // 2
    if block_t is None:
        block_t = INTERPRET_BLOCK_T if interpreting() else BLOCK_T
    if not (isinstance(block_t, int) and block_t > 0 and block_t & (block_t - 1) == 0) or num_warps not in (1, 2, 4, 8, 16):
        raise ConfigError(f"rope: block_t must be a power of two and num_warps 1, 2, 4, 8 or 16; got {block_t!r}, "
                          f"{num_warps!r}")
    cb, sb = (cos.stride(0) if cos.shape[0] > 1 else 0), (sin.stride(0) if sin.shape[0] > 1 else 0)
    _kernel()[(-(-t // block_t), b)](
        q, k, cos, sin, oq, ok, t, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cb, cos.stride(1), sb, sin.stride(1), *(oq.stride()[:3]), *(ok.stride()[:3]), HQ=hq, HK=hk, D=d, HALF=half,
        BLOCK_D=max(16, 1 << (half - 1).bit_length()), BLOCK_T=block_t, num_warps=num_warps)
    return oq, ok
