"""On a GPU: the ``fused_layer_norm`` kernel (:mod:`mukv.kernels.layer_norm`, Triton) against the eager
arithmetic at the vision towers' widths in bf16, and a stream through it (alone, and with every other
fusion, the language model's forwards recorded into CUDA graphs) storing what the plain path stores.

Run through the device tool (skipped without CUDA or triton)::

    python -m pytest -q tests/gpu/test_gpu_fused_layer_norm.py
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mukv.fusions import _compiled, add_layer_norm
from mukv.kernels import layer_norm as lk

from helpers import assert_accelerated_stream_stores_alike

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")]

DEVICE = torch.device("cuda")


@pytest.mark.parametrize("rows,d", [(64 * 729, 1152), (3 * 729, 1152), (1, 1152), (1000, 1280), (77, 72)])
def test_the_bf16_kernel_is_as_close_to_float32_as_the_compiled_function(rows, d):
    g = torch.Generator(device=DEVICE).manual_seed(rows)
    x = (torch.randn(rows, d, device=DEVICE, generator=g) * 2).bfloat16()
    r = torch.randn(rows, d, device=DEVICE, generator=g).bfloat16()
    w, b, c = (torch.randn(d, device=DEVICE, generator=g).bfloat16() for _ in range(3))
    s, y = lk.layer_norm(x, w, b, 1e-6, r, c)
    cs, cy = _compiled("add_layer_norm", add_layer_norm)(x, r, w, b, 1e-6, c)
    assert torch.equal(s, (r + x) + c)  # the residual stream rounded as the eager adds round it
    exact = torch.nn.functional.layer_norm((r + x).float(), (d,), w.float(), b.float(), 1e-6)
    err = ((y.float() - exact).norm() / exact.norm()).item()
    err_c = ((cy.float() - exact).norm() / exact.norm()).item()
    assert y.dtype == torch.bfloat16 and err < 5e-3 and err <= 1.5 * err_c + 1e-6, (err, err_c)
    _, plain = lk.layer_norm(x, w, b, 1e-6)
    eager = torch.nn.functional.layer_norm(x, (d,), w, b, 1e-6)
    assert (plain.float() - eager.float()).abs().max() <= eager.float().abs().max() * 2 ** -7  # a bf16 rounding


ORDER = ("fused_vision", "fused_llm", "fused_norms", "fused_residual", "fused_rope", "fused_layer_norm",
         "graph_prefill")


@pytest.mark.parametrize("which", [["fused_layer_norm"], ["fused_vision", "fused_llm", "fused_norms", "fused_residual",
                                                          "fused_rope", "fused_layer_norm", "graph_prefill"]])
def test_a_stream_through_the_kernel_stores_what_the_plain_path_stores(which):
    assert_accelerated_stream_stores_alike(which, ORDER, DEVICE)
