"""``fused_rope``: the rotary embedding of queries and keys as one Triton kernel
(:mod:`mukv.kernels.rope`).

On the CPU the kernel runs under Triton's interpreter where triton is installed: run this file as
``TRITON_INTERPRET=1 python -m pytest tests/test_accel_rope.py`` (triton takes the mode when first
imported). The CUDA build is tested by ``tests/gpu/test_gpu_fused_mlp.py`` (every fusion in the recorded
graphs) and timed by ``benchmarks/rope_bench.py``. Where triton or a GPU is missing, the acceleration
is refused with a clear error and nothing changes.
"""

import pytest
import torch

import mukv
from mukv.accel import accelerate, fuse_rope
from mukv.kernels import rope as rk
from mukv.plugins.models.llava_onevision import build_llava_onevision

from helpers import HAS_TRITON, INTERPRETING, needs_triton, stored_levels


@pytest.fixture(autouse=True)
def restore_rotary():
    """``fused_rope`` replaces transformers' Qwen2 rotary function process-wide: put it back after each test."""
    from transformers.models.qwen2 import modeling_qwen2

    original = modeling_qwen2.apply_rotary_pos_emb
    yield
    modeling_qwen2.apply_rotary_pos_emb = original


def _inputs(b, hq, hk, t, d, dtype=torch.float32, batch_tables=True, seed=0):
    """Queries and keys as the attention makes them (strided views of the projections), and tables
    shaped as transformers' rotary embedding returns them (halves equal), or free (halves differ)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq * d, generator=g).to(dtype).view(b, t, hq, d).transpose(1, 2)
    k = torch.randn(b, t, hk * d, generator=g).to(dtype).view(b, t, hk, d).transpose(1, 2)
    ang = torch.randn(b if batch_tables else 1, t, d, generator=g)
    return q, k, ang.cos().to(dtype), ang.sin().to(dtype)


@needs_triton
@pytest.mark.parametrize("b,hq,hk,t,d", [(1, 14, 2, 37, 64), (2, 3, 1, 9, 16), (1, 2, 2, 5, 6), (3, 4, 2, 70, 128),
                                         (1, 1, 1, 1, 2)])
@pytest.mark.parametrize("batch_tables", [True, False])
def test_the_kernel_is_transformers_arithmetic(interpret, b, hq, hk, t, d, batch_tables):
    """Strided inputs, token counts that are not multiples of the tile, head dimensions whose half is not
    a power of two, tables per batch row or shared: float32 results equal the reference."""
    q, k, cos, sin = _inputs(b, hq, hk, t, d, batch_tables=batch_tables, seed=t * d)
    got_q, got_k = rk.rope(q, k, cos, sin)
    want_q, want_k = rk.rope_reference(q, k, cos, sin)
    # the queries in their own memory order ([B, T, H, D], what the attention's output projection reads)
    assert got_q.stride() == q.stride() and got_k.is_contiguous()
    cq, ck = rk.rope(q.contiguous(), k, cos, sin)
    assert cq.is_contiguous() and torch.equal(cq, got_q) and torch.equal(ck, got_k)
    assert got_q.shape == q.shape and got_k.shape == k.shape
    torch.testing.assert_close(got_q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k, want_k, rtol=1e-6, atol=1e-6)


@needs_triton
def test_half_precision_rounds_once(interpret):
    q, k, cos, sin = _inputs(2, 4, 2, 33, 32, dtype=torch.float16)
    got_q, got_k = rk.rope(q, k, cos, sin)
    want_q, want_k = rk.rope_reference(q.float(), k.float(), cos.float(), sin.float())
    assert got_q.dtype == torch.float16
    for got, want in ((got_q, want_q), (got_k, want_k)):
        assert ((got.float() - want).norm() / want.norm()).item() < 1e-3  # one fp16 rounding


@needs_triton
def test_tensors_the_kernel_does_not_take_are_refused_with_the_reason(interpret):
    q, k, cos, sin = _inputs(1, 2, 1, 6, 8)
    bad = [((q[0], k, cos, sin), "expected q"), ((q, k[..., :4], cos, sin), "disagree"),
           ((q, k, cos[:, :5], sin[:, :5]), "do not fit"), ((q, k, cos.double(), sin.double()), "one floating-point"),
           ((q.int(), k.int(), cos.int(), sin.int()), "floating-point"), (("q", k, cos, sin), "must be tensors"),
           ((q.detach().clone().requires_grad_(), k, cos, sin), "no backward"),
           ((q, k, cos[..., ::2], sin[..., ::2]), "do not fit"),
           ((q, k, cos.transpose(1, 2).contiguous().transpose(1, 2), sin), "contiguous")]
    for args, match in bad:
        why = rk.why_not(*args)
        assert why and match in why, (match, why)
        with pytest.raises(mukv.ConfigError, match="rope: "):
            rk.rope(*args)
    q, k, cos, sin = _inputs(1, 2, 1, 0, 8)
    assert rk.rope(q, k, cos, sin)[0].shape == (1, 2, 0, 8)  # no tokens: empty outputs, no launch


@needs_triton
def test_a_cpu_model_without_the_interpreter_is_refused(monkeypatch):
    from transformers.models.qwen2 import modeling_qwen2

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    adapter = build_llava_onevision("tiny-llava-ov")
    before = modeling_qwen2.apply_rotary_pos_emb
    with pytest.raises(mukv.ConfigError, match="fused_rope runs a Triton kernel on a CUDA GPU"):
        accelerate(adapter, ["fused_llm", "fused_rope"])
    assert modeling_qwen2.apply_rotary_pos_emb is before  # refused before fused_llm was applied
    assert not any("forward" in vars(layer.mlp) for layer in adapter.language_model.layers)


@pytest.mark.skipif(HAS_TRITON, reason="checks the refusal where triton is missing")
def test_without_triton_it_is_refused_and_changes_nothing():
    from transformers.models.qwen2 import modeling_qwen2

    adapter = build_llava_onevision("tiny-llava-ov")
    before = modeling_qwen2.apply_rotary_pos_emb
    for call in (lambda: accelerate(adapter, ["fused_rope"]), lambda: fuse_rope(adapter)):
        with pytest.raises(mukv.ConfigError, match="fused_rope: .*triton"):
            call()
    assert modeling_qwen2.apply_rotary_pos_emb is before
    q, k, cos, sin = _inputs(1, 2, 1, 4, 8)
    with pytest.raises(mukv.ConfigError, match="triton|CUDA"):
        rk.rope(q, k, cos, sin)


@needs_triton
def test_a_language_model_that_is_not_qwen2_is_refused(interpret):
    from mukv.plugins.models.qwen2_5_vl import build_qwen2_5_vl

    adapter = build_qwen2_5_vl("tiny-qwen2.5-vl")
    with pytest.raises(mukv.ConfigError, match="is not transformers' Qwen2"):
        accelerate(adapter, ["fused_rope"])
    with pytest.raises(mukv.ConfigError, match="is not transformers' Qwen2"):
        fuse_rope(adapter)


def test_calls_the_kernel_does_not_take_run_the_compiled_function():
    """On the CPU without the interpreter (a probe, another unsqueeze dimension) ``kernel_rope`` runs
    ``fused_llm``'s compiled arithmetic."""
    from mukv.fusions import kernel_rope

    q, k, cos, sin = _inputs(1, 3, 1, 5, 8)
    want = rk.rope_reference(q, k, cos, sin)
    if not INTERPRETING:
        for got, w in zip(kernel_rope(q, k, cos, sin), want):
            torch.testing.assert_close(got, w)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)  # [B, T, H, D] with unsqueeze_dim 2
    for got, w in zip(kernel_rope(qt, kt, cos, sin, unsqueeze_dim=2), want):
        torch.testing.assert_close(got, w.transpose(1, 2))


@needs_triton
@pytest.mark.slow  # the interpreter runs each program in numpy
@pytest.mark.parametrize("which", [["fused_rope"], ["fused_vision", "fused_llm", "fused_norms", "fused_rope"]])
def test_a_stream_through_the_kernel_stores_what_the_plain_path_stores(interpret, which):
    from transformers.models.qwen2 import modeling_qwen2

    from mukv.fusions import kernel_rope

    frames = torch.randint(0, 256, (8, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    want, want_text = stored_levels(build_llava_onevision("tiny-llava-ov"), frames)
    fast = build_llava_onevision("tiny-llava-ov")
    assert accelerate(fast, which) == which
    assert modeling_qwen2.apply_rotary_pos_emb is kernel_rope  # the later of fused_llm and fused_rope holds
    got, got_text = stored_levels(fast, frames)
    for lv in want:
        assert torch.equal(got[lv][0], want[lv][0]), lv
        # float32: the kernel alone rounds as the reference does; with the compiled norms, by a little more
        atol = 1e-5 if which == ["fused_rope"] else 1e-3
        torch.testing.assert_close(got[lv][1], want[lv][1], rtol=1e-4, atol=atol)
    assert got_text == want_text
