"""The SwiGLU MLP's first half as one kernel: ``silu(x @ W_gate.T) * (x @ W_up.T)``.

A Qwen2 decoder layer's MLP computes ``down(silu(gate(x)) * up(x))``. Run as torch ops, the gate and up
products write two ``[tokens, intermediate]`` tensors (4,864 wide at 0.5B) that a third kernel reads
back to write the SwiGLU: at 0.5B that elementwise pass costs as much as the products it follows
(``benchmarks/profile_ingest.py``). Here one Triton matrix product computes both from one joint
weight whose rows interleave gate and up (row ``2i`` is gate row ``i``, row ``2i + 1`` up row ``i``),
so each output tile holds a gate column beside its up column and the epilogue writes
``silu(gate) * up`` straight from the float32 accumulator: one read of ``x``, one write of the result.

Arithmetic: float32 accumulation (float32 inputs multiplied in full float32, not TF32), the SwiGLU
in float32, one rounding to the input's dtype at the end (the torch path rounds the gate, the up,
the SiLU and the product each to bf16), so results agree with
:func:`swiglu_reference` to bf16 rounding, not bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from . import built, interpreting

#: Autotuning candidates (block sizes over tokens, joint-weight rows and the inner dimension; pipeline
#: stages; warps), tuned once per weight shape on the first call.
CONFIGS = (
    (128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4), (64, 256, 64, 4, 4),
    (256, 128, 64, 3, 8), (128, 256, 32, 4, 8), (64, 128, 64, 4, 4),
)
#: One small configuration for Triton's CPU interpreter (``TRITON_INTERPRET=1``, tests).
INTERPRET_CONFIG = (32, 32, 32, 1, 4)



def interleave(w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` gate and up weights -> the joint weight ``[2N, K]`` (rows gate 0, up 0, gate 1, ...)."""
    if not (isinstance(w_gate, torch.Tensor) and isinstance(w_up, torch.Tensor)):
        raise ConfigError(f"swiglu: gate and up weights must be tensors, got {type(w_gate).__name__} and "
                          f"{type(w_up).__name__}")
    if w_gate.shape != w_up.shape or w_gate.dim() != 2:
        raise ConfigError(f"swiglu: gate and up weights must be equal 2-d shapes, got {tuple(w_gate.shape)} "
                          f"and {tuple(w_up.shape)}")
    return torch.stack((w_gate, w_up), dim=1).reshape(2 * w_gate.shape[0], w_gate.shape[1]).contiguous()


def swiglu_reference(x: torch.Tensor, w_joint: torch.Tensor) -> torch.Tensor:
    """The torch composition ``silu(x @ W_gate.T) * (x @ W_up.T)`` for ``x [M, K]`` and the joint weight
    ``[2N, K]``; returns ``[M, N]`` in ``x``'s dtype."""
    gate, up = x @ w_joint[0::2].t(), x @ w_joint[1::2].t()
    return torch.nn.functional.silu(gate) * up


def _make(triton: Any, tl: Any, interpret: bool) -> Any:
    @triton.jit
    def swiglu_matmul_kernel(a_ptr, w_ptr, c_ptr, M, N2, K, stride_am, stride_ak, stride_wn, stride_wk,
                             stride_cm, stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N2, BLOCK_N)
        per_group = GROUP_M * num_n  # tiles of GROUP_M row blocks share the joint weight's columns in L2
        first_m = (pid // per_group) * GROUP_M
        group_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        am = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)  # rows past M read row 0 .. (stored never)
        wn = tl.max_contiguous(tl.multiple_of(rn % N2, BLOCK_N), BLOCK_N)
        a_ptrs = a_ptr + am[:, None] * stride_am + rk[None, :] * stride_ak
        w_ptrs = w_ptr + wn[None, :] * stride_wn + rk[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < left, other=0.0)
            w = tl.load(w_ptrs, mask=rk[:, None] < left, other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        out = gate * tl.sigmoid(gate) * up
        cn = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        c_ptrs = c_ptr + rm[:, None] * stride_cm + cn[None, :] * stride_cn
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (cn[None, :] < N2 // 2))

    if interpret:
        kernel = swiglu_matmul_kernel
    else:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s,
                                 num_warps=w) for bm, bn, bk, s, w in CONFIGS]
        kernel = triton.autotune(configs=configs, key=["N2", "K"])(swiglu_matmul_kernel)
    return kernel


def _kernel() -> Any:
    """The Triton kernel, built on first use (autotuned on a GPU, one fixed configuration when
    interpreted)."""
    interpret = interpreting()
    return built("swiglu_interpret" if interpret else "swiglu", lambda triton, tl: _make(triton, tl, interpret))


def swiglu_matmul(x: torch.Tensor, w_joint: torch.Tensor) -> torch.Tensor:
    """``silu(x @ W_gate.T) * (x @ W_up.T)`` as one Triton kernel.

    Args:
        x: ``[M, K]`` activations (bf16 or fp16 on a CUDA GPU; any float dtype under the interpreter).
        w_joint: ``[2N, K]`` the gate and up weights interleaved by rows (:func:`interleave`), same dtype.

    Returns:
        ``[M, N]`` in ``x``'s dtype.
    """
    if not (isinstance(x, torch.Tensor) and isinstance(w_joint, torch.Tensor)):
        raise ConfigError(f"swiglu_matmul: x and the joint weight must be tensors, got {type(x).__name__} and "
                          f"{type(w_joint).__name__}")
    if not (x.is_floating_point() and w_joint.is_floating_point()):
        raise ConfigError(f"swiglu_matmul: expected floating-point tensors, got {x.dtype} and {w_joint.dtype}")
    if x.dim() != 2 or w_joint.dim() != 2 or x.shape[1] != w_joint.shape[1] or w_joint.shape[0] % 2:
        raise ConfigError(f"swiglu_matmul: expected x [M, K] and a joint weight [2N, K], got {tuple(x.shape)} "
                          f"and {tuple(w_joint.shape)}")
    if x.dtype != w_joint.dtype or x.device != w_joint.device:
        raise ConfigError(f"swiglu_matmul: x ({x.dtype}, {x.device}) and the weight ({w_joint.dtype}, "
                          f"{w_joint.device}) differ")
    m, k = x.shape
    n2 = w_joint.shape[0]
    out = torch.empty((m, n2 // 2), dtype=x.dtype, device=x.device)
    kernel = _kernel()  # ConfigError without triton (checked once, when the kernel is first built)
    if m == 0:
        return out
    args = (x, w_joint, out, m, n2, k, x.stride(0), x.stride(1), w_joint.stride(0), w_joint.stride(1),
            out.stride(0), out.stride(1))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # float32 stays float32 (no TF32 products)
    if interpreting():
        bm, bn, bk, _, _ = INTERPRET_CONFIG
        kernel[(-(-m // bm) * -(-n2 // bn),)](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=2, PRECISION=precision)
    else:
        kernel[lambda meta: (-(-m // meta["BLOCK_M"]) * -(-n2 // meta["BLOCK_N"]),)](*args, PRECISION=precision)
    return out
