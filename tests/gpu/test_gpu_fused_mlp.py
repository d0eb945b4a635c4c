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

from mukv.accel import accelerate
from mukv.kernels import swiglu as sk
from mukv.session import load_model

from helpers import stored_feeds

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
    feeds = [8, 5, 16]
    # float32 (load_model picks bf16 on CUDA): the kernel multiplies in full float32, so the stored KV
    # is compared at float32 tolerances rather than one bf16 rounding of the SwiGLU apart
    want, want_text = stored_feeds(load_model("tiny-llava-ov", DEVICE, torch.float32), feeds, DEVICE)
    fast = load_model("tiny-llava-ov", DEVICE, torch.float32)
    assert accelerate(fast, which) == [w for w in ORDER if w in which]
    got, got_text = stored_feeds(fast, feeds, DEVICE)
    if "graph_prefill" in which:  # the Triton kernel was recorded into the graphs, not left to the eager fallback
        gp = fast.prefill_blocks
        assert gp.replays > 0 and gp._graphs and all(g.graph is not None for g in gp._graphs.values())
    for lv in want:
        (ki, kv), (wi, wv) = got[lv], want[lv]
        same = (ki == wi).all(dim=1)
        assert same.float().mean() >= 0.9, (lv, same.float().mean())  # a padded graph batch may swap near ties
        torch.testing.assert_close(kv[same], wv[same], rtol=1e-3, atol=1e-3)
