"""``fused_layer_norm``: the vision tower's layer norms, with the residual add before the MLP's norm,
as one-pass Triton kernels (:mod:`mukv.kernels.layer_norm`).

On the CPU the kernel runs under Triton's interpreter where triton is installed: run this file as
``TRITON_INTERPRET=1 python -m pytest tests/test_accel_layer_norm.py``. The CUDA build is tested by
``tests/gpu/test_gpu_fused_layer_norm.py``. Where triton or a GPU is missing, the acceleration is refused
with a clear error and nothing changes.
"""

import pytest
import torch

import mukv
from mukv.accel import accelerate
from mukv.kernels import layer_norm as lk
from mukv.plugins.models.llava_onevision import build_llava_onevision

from helpers import HAS_TRITON, INTERPRETING, needs_triton, stored_levels


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = (torch.randn(*shape, generator=g) * 3 + 1).to(dtype)
    r = torch.randn(*shape, generator=g).to(dtype)
    w, b, c = (torch.randn(d, generator=g).to(dtype) for _ in range(3))
    return x, r, w, b, c


def _own_forwards(adapter):
    """The modules of ``adapter`` whose forward is set on the instance (what a fusion changes)."""
    return {name for name, m in adapter.model.named_modules() if "forward" in vars(m)}


@needs_triton
@pytest.mark.parametrize("shape", [(2, 5, 1152), (7, 72), (1, 1, 3), (3, 2, 17, 40), (4, 1)])
@pytest.mark.parametrize("with_residual,with_carry", [(False, False), (True, False), (True, True)])
def test_the_kernel_is_the_eager_arithmetic(interpret, shape, with_residual, with_carry):
    x, r, w, b, c = _inputs(shape)
    r = r if with_residual else None
    c = c if with_carry else None
    want_s, want_y = lk.layer_norm_reference(x, w, b, 1e-6, r, c)
    got_s, got_y = lk.layer_norm(x, w, b, 1e-6, r, c)
    torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-5)
    assert got_y.shape == x.shape and got_y.dtype == x.dtype
    if with_residual:
        assert torch.equal(got_s, want_s)  # one add (and one more with the carry), rounded as the eager adds
    else:
        assert got_s is None


@needs_triton
def test_half_precision_rounds_the_stream_as_the_eager_add_and_the_norm_once(interpret):
    x, r, w, b, c = _inputs((6, 9, 1152), torch.float16, seed=3)
    got_s, got_y = lk.layer_norm(x, w, b, 1e-5, r, c)
    want_s, _ = lk.layer_norm_reference(x, w, b, 1e-5, r, c)
    assert torch.equal(got_s, want_s)
    exact = torch.nn.functional.layer_norm((r + x).float(), (1152,), w.float(), b.float(), 1e-5)
    assert (got_y.float() - exact).abs().max() <= exact.abs().max() * 2 ** -10  # one rounding to float16


@needs_triton
def test_strided_inputs_and_no_rows(interpret):
    x, r, w, b, c = _inputs((4, 3, 64))
    xt = x.transpose(0, 1)  # not a view of rows: copied first
    want = lk.layer_norm_reference(xt, w, b, 1e-6, r.transpose(0, 1), c)
    got = lk.layer_norm(xt, w, b, 1e-6, r.transpose(0, 1), c)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], want[0])
    s, y = lk.layer_norm(x[:0], w, b, 1e-6, r[:0], c)
    assert s.shape == y.shape == (0, 3, 64)  # no rows: empty outputs, no launch


@needs_triton
def test_tensors_the_kernel_does_not_take_are_refused_with_the_reason(interpret):
    x, r, w, b, c = _inputs((2, 8))
    cases = [
        ((x, w[:4], b), "expected x \\[..., D\\]"),
        ((x, w, b[:3]), "expected x"),
        ((x, w, b, r[:1]), "residual"),
        ((x, w, b, None, c), "carry"),
        ((x.long(), w, b), "floating point"),
        ((x, w.long(), b), "floating point"),
        ((x, w, b, r.double()), "share one of float16, bfloat16 and float32"),
        ((x.double(), w, b), "share one of float16, bfloat16 and float32"),
        (("x", w, b), "must be tensors"),
        ((torch.randn(2, lk.MAX_WIDTH + 1), torch.ones(lk.MAX_WIDTH + 1), torch.zeros(lk.MAX_WIDTH + 1)), "rows of"),
        ((x, w.requires_grad_(), b), "no backward"),
    ]
    for args, reason in cases:
        with pytest.raises(mukv.ConfigError, match="layer_norm: .*" + reason):
            lk.layer_norm(args[0], args[1], args[2], 1e-6, *args[3:])
    w.requires_grad_(False)
    for eps in (-1.0, float("nan"), float("inf"), "0.1", True, None):
        with pytest.raises(mukv.ConfigError, match="eps"):
            lk.layer_norm(x, w, b, eps)


@needs_triton
def test_a_cpu_model_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    adapter = build_llava_onevision("tiny-llava-ov")
    before = _own_forwards(adapter)
    with pytest.raises(mukv.ConfigError, match="fused_layer_norm runs a Triton kernel on a CUDA GPU"):
        accelerate(adapter, ["fused_residual", "fused_layer_norm"])
    assert _own_forwards(adapter) == before  # refused before anything changed


@pytest.mark.skipif(HAS_TRITON, reason="checks the refusal where triton is missing")
def test_without_triton_it_is_refused_and_changes_nothing():
    adapter = build_llava_onevision("tiny-llava-ov")
    before = _own_forwards(adapter)
    with pytest.raises(mukv.ConfigError, match="fused_layer_norm: .*triton"):
        accelerate(adapter, ["fused_layer_norm"])
    assert _own_forwards(adapter) == before
    x, _, w, b, _ = _inputs((2, 8))
    with pytest.raises(mukv.ConfigError, match="triton|CUDA"):
        lk.layer_norm(x, w, b, 1e-6)


@needs_triton
def test_a_vision_tower_without_layer_norms_is_refused(interpret):
    from mukv.plugins.models.qwen2_5_vl import build_qwen2_5_vl

    adapter = build_qwen2_5_vl("tiny-qwen2.5-vl")
    with pytest.raises(mukv.ConfigError, match="fused_layer_norm: the vision tower of .* has no layer norm"):
        accelerate(adapter, ["fused_layer_norm"])


def test_calls_the_kernel_does_not_take_run_the_compiled_or_eager_arithmetic():
    """Off a GPU without the interpreter (and for inputs that need a backward) the fused forwards fall back."""
    from mukv.fusions import _kernel_layer_norm_forward, add_layer_norm, kernel_add_layer_norm

    x, r, w, b, c = _inputs((2, 3, 16))
    if not INTERPRETING:
        got = kernel_add_layer_norm(x, r, w, b, 1e-6, c)
        for g, want in zip(got, add_layer_norm(x, r, w, b, 1e-6, c)):
            torch.testing.assert_close(g, want)
    norm = torch.nn.LayerNorm(16)
    xg = x.clone().requires_grad_()
    y = _kernel_layer_norm_forward(norm, xg)  # needs a backward: the eager forward
    y.sum().backward()
    assert xg.grad is not None


@needs_triton
@pytest.mark.slow  # the interpreter runs each program in numpy
@pytest.mark.parametrize("which", [["fused_layer_norm"], ["fused_vision", "fused_residual", "fused_layer_norm"]])
def test_a_stream_through_the_kernel_stores_what_the_plain_path_stores(interpret, which):
    from mukv.fusions import kernel_add_layer_norm

    frames = torch.randint(0, 256, (8, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    want, want_text = stored_levels(build_llava_onevision("tiny-llava-ov"), frames)
    fast = build_llava_onevision("tiny-llava-ov")
    calls = []
    import mukv.fusions as fusions

    original = fusions.kernel_add_layer_norm

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    fusions.kernel_add_layer_norm = counted
    try:
        assert accelerate(fast, which) == which
        norms = [m for m in fast.model.modules() if fusions.runs_layer_norm_kernel(m)]
        assert norms and all("forward" in vars(m) for m in norms)
        got, got_text = stored_levels(fast, frames)
    finally:
        fusions.kernel_add_layer_norm = original
    assert bool(calls) == ("fused_residual" in which)  # the add and norm went through the kernel
    assert original is kernel_add_layer_norm
    for lv in want:
        assert torch.equal(got[lv][0], want[lv][0]), lv
        torch.testing.assert_close(got[lv][1], want[lv][1], rtol=1e-4, atol=1e-3)
    assert got_text == want_text
