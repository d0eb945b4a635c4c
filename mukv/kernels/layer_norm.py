"""The vision tower's layer norms, and the residual add before them, as one-pass Triton kernels.

SigLIP's layers are 1,152 wide. torch's inductor compiles a reduction of more than 1,024 elements
per row as a looped kernel that reads each row twice (``fused_residual``'s compiled add and layer
norm: 14.5 ms of 128 frames' vision tower on an H100, about half the memory bandwidth), and the
eager layer norm before attention ran at a similar rate (7.2 ms). With its
``triton.multi_kernel`` option inductor also builds the one-pass kernel, and the vision tower ran
3-4% faster (715 against 687-693 frames/s, H100, 2026-12-07), but that option recompiles the
language model's helpers past dynamo's limit. Here one program holds one row in registers (the
width rounded up to a power of two, masked): the row is read once, its statistics taken, and the
result written once.

Arithmetic, as the eager forward computes it: ``s = residual + x`` rounded to the dtype (the
residual stream), ``s + carry`` rounded (the next product's bias carried in that stream, as
``fused_residual`` does), and ``(s - mean) * rstd * weight + bias`` in float32, rounded once. Mean
and variance are two-pass float32 sums over the row (the eager kernel's Welford order differs by
float32 rounding only).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError
from . import available, built, interpreting

#: Widest row a program holds (elements); wider rows go to the caller's fallback.
MAX_WIDTH = 8192
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)



def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                         residual: torch.Tensor | None = None,
                         carry: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The eager arithmetic for ``x`` ``[..., D]``: ``(residual + x [+ carry], layer_norm(residual + x))``,
    or ``(None, layer_norm(x))`` without ``residual``."""
    if residual is None:
        return None, torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    s = residual + x
    y = torch.nn.functional.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return (s if carry is None else s + carry), y


def _make(triton: Any, tl: Any) -> Any:
    @triton.jit
    def layer_norm_kernel(x_ptr, r_ptr, w_ptr, b_ptr, c_ptr, s_ptr, y_ptr, D, sx, sr, eps,
                          HAS_RES: tl.constexpr, HAS_CARRY: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a vision batch passes 2**31 elements
        d = tl.arange(0, BLOCK_D)
        mask = d < D
        x = tl.load(x_ptr + row * sx + d, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(r_ptr + row * sr + d, mask=mask, other=0.0).to(tl.float32)
            s = (x + r).to(s_ptr.dtype.element_ty)  # the residual stream, rounded as the eager add rounds it
            x = s.to(tl.float32)
            if HAS_CARRY:
                c = tl.load(c_ptr + d, mask=mask, other=0.0).to(tl.float32)
                s = (x + c).to(s_ptr.dtype.element_ty)
            tl.store(s_ptr + row * D + d, s, mask=mask)
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
        w = tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + d, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * D + d, (xc * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)

    return layer_norm_kernel


def _kernel() -> Any:
    """The Triton kernel, built on first use."""
    return built("layer_norm", _make)


def why_not(x: Any, weight: Any, bias: Any, residual: Any = None, carry: Any = None) -> str | None:
    """Why :func:`layer_norm` cannot take these tensors (the caller then runs the eager arithmetic), or
    ``None``."""
    ts = [t for t in (x, weight, bias, residual, carry) if t is not None]
    if not all(isinstance(t, torch.Tensor) for t in ts) or x is None or weight is None or bias is None:
        return "x, weight and bias (and residual and carry, where given) must be tensors"
    if x.dim() < 1 or weight.dim() != 1 or bias.shape != weight.shape or x.shape[-1] != weight.shape[0]:
        return (f"expected x [..., D] with weight and bias [D]; got {tuple(x.shape)}, {tuple(weight.shape)}, "
                f"{tuple(bias.shape)}")
    if residual is not None and residual.shape != x.shape:
        return f"residual {tuple(residual.shape)} is not shaped as x {tuple(x.shape)}"
    if carry is not None and (residual is None or carry.shape != weight.shape):
        return "carry [D] goes with a residual"
    if not 0 < x.shape[-1] <= MAX_WIDTH:
        return f"rows of {x.shape[-1]} elements (the kernel holds 1 to {MAX_WIDTH})"
    if len({t.device for t in ts}) != 1:
        return "the tensors must be on one device"
    if any(not t.is_floating_point() for t in ts):
        return "the tensors must be floating point"
    if x.dtype not in _DTYPES or (residual is not None and residual.dtype != x.dtype):
        return (f"x and residual must share one of float16, bfloat16 and float32 (it computes in float32); "
                f"got {x.dtype}")
    if x.device.type != "cuda" and not interpreting():
        return f"the layer-norm kernel runs on a CUDA GPU (or Triton's interpreter); these tensors are on {x.device}"
    if any(t.requires_grad for t in ts) and torch.is_grad_enabled():
        return "the kernel has no backward"
    return available()


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               residual: torch.Tensor | None = None,
               carry: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Layer norm of ``x`` (or of ``residual + x``) over its last dimension, one read and one write per row.

    Args:
        x: ``[..., D]``, any strides (copied to rows first where they are not a view of rows).
        weight, bias: ``[D]``.
        eps: added to the variance.
        residual: ``[..., D]`` like ``x``, or ``None``: then the norm is of ``residual + x``.
        carry: ``[D]`` added to the residual stream returned (the next product's bias), with ``residual`` only.

    Returns:
        ``(stream, normed)``: ``stream`` is ``residual + x (+ carry)`` ``[..., D]`` (``None`` without a
        residual), ``normed`` the layer norm, both contiguous in ``x``'s dtype.

    Raises:
        ConfigError: tensors the kernel does not take (:func:`why_not` says which).
    """
    why = why_not(x, weight, bias, residual, carry)
    if why:
        raise ConfigError(f"layer_norm: {why}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (math.isfinite(eps) and eps >= 0):
        raise ConfigError(f"layer_norm: eps must be a finite number of at least 0; got {eps!r}"[:200])
    return _launch(x, weight, bias, float(eps), residual, carry)


def _rows(t: torch.Tensor) -> torch.Tensor:
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
            carry: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """:func:`layer_norm` for tensors :func:`why_not` has passed."""
    d = x.shape[-1]
    xr = _rows(x)
    rr = _rows(residual) if residual is not None else xr
    y = torch.empty(xr.shape, dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else None
    if xr.shape[0]:
        block = max(16, 1 << (d - 1).bit_length())
        _kernel()[(xr.shape[0],)](
            xr, rr, weight.contiguous(), bias.contiguous(), (carry if carry is not None else weight).contiguous(),
            s if s is not None else y, y, d, xr.stride(0), rr.stride(0), eps, HAS_RES=residual is not None,
            HAS_CARRY=carry is not None, BLOCK_D=block, num_warps=min(max(block // 256, 1), 8))
    return (s.view(x.shape) if s is not None else None), y.view(x.shape)
