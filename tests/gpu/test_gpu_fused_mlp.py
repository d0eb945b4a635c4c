"""On a GPU: the ``fused_mlp`` kernel (:mod:`mukv.kernels.swiglu`, Triton) against the torch composition
at the real architectures' widths in bf16, and a stream through it (alone, and with every other fusion,
``fused_residual`` among them, recorded into CUDA graphs) storing what the plain path stores.

Run through the device tool (skipped without CUDA or triton)::

    python -m pytest -q tests/gpu/test_gpu_fused_mlp.py
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mukv.kernels import swiglu as sk

from helpers import assert_accelerated_stream_stores_alike

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")]

DEVICE = torch.device("cuda")


@pytest.mark.parametrize("m,k,n", [(196 * 3 + 5, 896, 4864), (784 * 4, 896, 4864), (300, 3584, 18944), (17, 64, 40)])
def test_the_bf16_kernel_is_as_close_to_float32_as_the_torch_composition(m, k, n):
    g = torch.Generator(device=DEVICE).manual_seed(m)
    x = torch.randn(m, k, device=DEVICE, generator=g).bfloat16()
    wg = (torch.randn(n, k, device=DEVICE, generator=g) / k ** 0.5).bfloat16()
    wu = (torch.randn(n, k, device=DEVICE, generator=g) / k ** 0.5).bfloat16()
    joint = sk.interleave(wg, wu)
    exact = sk.swiglu_reference(x.float(), joint.float())
    got = sk.swiglu_matmul(x, joint)
    torch_bf16 = sk.swiglu_reference(x, joint)
    err = ((got.float() - exact).norm() / exact.norm()).item()
    err_torch = ((torch_bf16.float() - exact).norm() / exact.norm()).item()
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert err < 1e-2 and err <= 1.5 * err_torch, (err, err_torch)  # one rounding against four


def test_the_kernel_reads_strided_rows():
    x = torch.randn(64, 256, device=DEVICE).bfloat16()[::2]  # every other row
    joint = sk.interleave(torch.randn(96, 128, device=DEVICE).bfloat16() / 12,
                          torch.randn(96, 128, device=DEVICE).bfloat16() / 12)
    xs = x[:, :128]
    want = sk.swiglu_reference(xs.float(), joint.float())
    got = sk.swiglu_matmul(xs, joint)
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2


ORDER = ("fused_vision", "fused_llm", "fused_norms", "fused_mlp", "fused_residual", "graph_prefill")


@pytest.mark.parametrize("which", [["fused_mlp"], ["fused_llm", "fused_mlp", "graph_prefill"],
                                   ["fused_vision", "fused_llm", "fused_norms", "fused_mlp", "fused_residual",
                                    "graph_prefill"]])
def test_a_stream_through_the_fused_mlp_stores_what_the_plain_path_stores(which):
    assert_accelerated_stream_stores_alike(which, ORDER, DEVICE)
