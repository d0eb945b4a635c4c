"""On a GPU: the ``fused_rope`` kernel (:mod:`mukv.kernels.rope`, Triton) against transformers' arithmetic
at the real architectures' head layouts in bf16, and a stream through it (alone, and with every other
fusion recorded into CUDA graphs) storing what the plain path stores.

Run through the device tool (skipped without CUDA or triton)::

    python -m pytest -q tests/gpu/test_gpu_fused_rope.py
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mukv.fusions import _compiled, rotate_pair
from mukv.kernels import rope as rk

from helpers import assert_accelerated_stream_stores_alike

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")]

DEVICE = torch.device("cuda")


@pytest.fixture(autouse=True)
def restore_rotary():
    from transformers.models.qwen2 import modeling_qwen2

    original = modeling_qwen2.apply_rotary_pos_emb
    yield
    modeling_qwen2.apply_rotary_pos_emb = original


@pytest.mark.parametrize("b,t,hq,hk,d", [(1, 196 * 64, 14, 2, 64), (20, 784, 14, 2, 64), (1, 300, 28, 4, 128),
                                         (3, 1, 14, 2, 64), (2, 77, 3, 1, 6)])
def test_the_bf16_kernel_is_as_close_to_float32_as_the_compiled_function(b, t, hq, hk, d):
    g = torch.Generator(device=DEVICE).manual_seed(t)
    q = torch.randn(b, t, hq * d, device=DEVICE, generator=g).bfloat16().view(b, t, hq, d).transpose(1, 2)
    k = torch.randn(b, t, hk * d, device=DEVICE, generator=g).bfloat16().view(b, t, hk, d).transpose(1, 2)
    ang = torch.arange(t, device=DEVICE, dtype=torch.float32)[:, None] * torch.rand(d // 2, device=DEVICE, generator=g)
    ang = torch.cat((ang, ang), dim=-1)[None]
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    exact = rk.rope_reference(q.float(), k.float(), cos.float(), sin.float())
    got = rk.rope(q, k, cos, sin)
    compiled = _compiled("rope", rotate_pair)(q, k, cos, sin)
    assert got[0].stride() == q.stride() and got[1].is_contiguous()  # queries in their own memory order
    for x, c, e in zip(got, compiled, exact):
        assert x.dtype == torch.bfloat16 and x.shape == e.shape
        err, err_c = ((x.float() - e).norm() / e.norm()).item(), ((c.float() - e).norm() / e.norm()).item()
        assert err < 5e-3 and err <= 1.5 * err_c + 1e-6, (err, err_c)  # one bf16 rounding, as the compiled one


ORDER = ("fused_vision", "fused_llm", "fused_norms", "fused_residual", "fused_rope", "graph_prefill")


@pytest.mark.parametrize("which", [["fused_rope"], ["fused_vision", "fused_llm", "fused_norms", "fused_residual",
                                                    "fused_rope", "graph_prefill"]])
def test_a_stream_through_the_kernel_stores_what_the_plain_path_stores(which):
    assert_accelerated_stream_stores_alike(which, ORDER, DEVICE)
