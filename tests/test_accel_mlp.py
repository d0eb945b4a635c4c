"""``fused_mlp``: the SwiGLU MLP's gate and up products and its activation as one Triton kernel
(:mod:`mukv.kernels.swiglu`).

On the CPU the kernel runs under Triton's interpreter where triton is installed: run this file as
``TRITON_INTERPRET=1 python -m pytest tests/test_accel_mlp.py`` (triton takes the mode when first
imported, so the variable must be set before anything imports it). The CUDA build is tested by
``tests/gpu/test_gpu_fused_mlp.py``. Where triton is missing, the acceleration is refused with a clear
error.
"""

import pytest
import torch

import mukv
from mukv.accel import accelerate
from mukv.kernels import swiglu as sk
from mukv.plugins.models.llava_onevision import build_llava_onevision

from helpers import HAS_TRITON, needs_triton, stored_levels


def test_interleave_puts_gate_and_up_rows_side_by_side():
    g, u = torch.arange(6.0).reshape(3, 2), -torch.arange(6.0).reshape(3, 2)
    j = sk.interleave(g, u)
    assert j.shape == (6, 2) and j.is_contiguous()
    assert torch.equal(j[0::2], g) and torch.equal(j[1::2], u)
    with pytest.raises(mukv.ConfigError, match="equal 2-d shapes"):
        sk.interleave(g, u[:2])


@pytest.mark.skipif(HAS_TRITON, reason="checks the refusal where triton is missing")
def test_fused_mlp_without_triton_is_refused_and_changes_nothing():
    adapter = build_llava_onevision("tiny-llava-ov")
    before = {k: v.clone() for k, v in adapter.language_model.state_dict().items()}
    with pytest.raises(mukv.ConfigError, match="triton"):
        accelerate(adapter, ["fused_mlp"])
    with pytest.raises(mukv.ConfigError, match="triton"):
        accelerate(adapter, ["fused_llm", "fused_mlp"])  # refused before fused_llm is applied
    assert not any("forward" in vars(layer.mlp) for layer in adapter.language_model.layers)
    with pytest.raises(mukv.ConfigError, match="triton"):
        sk.swiglu_matmul(torch.zeros(2, 4), torch.zeros(6, 4))
    after = adapter.language_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@needs_triton
def test_fused_mlp_on_a_cpu_model_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    adapter = build_llava_onevision("tiny-llava-ov")
    with pytest.raises(mukv.ConfigError, match="CUDA GPU"):
        accelerate(adapter, ["fused_llm", "fused_mlp"])
    assert not any("forward" in vars(layer.mlp) for layer in adapter.language_model.layers)


@needs_triton
@pytest.mark.parametrize("m,k,n", [(1, 32, 16), (7, 40, 24), (100, 96, 80), (33, 64, 23), (65, 100, 37)])
def test_the_kernel_is_the_torch_composition(interpret, m, k, n):
    """Rows, columns and the inner dimension that are not multiples of the blocks (masked loads, rows
    past the end, an odd intermediate width), float32 in full precision."""
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=g)
    wg, wu = torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, k, generator=g) / k ** 0.5
    j = sk.interleave(wg, wu)
    got = sk.swiglu_matmul(x, j)
    assert got.shape == (m, n) and got.dtype == x.dtype
    torch.testing.assert_close(got, torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t()), rtol=1e-5, atol=1e-5)


@needs_triton
def test_half_precision_rounds_once(interpret):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 64, generator=g).half()
    j = sk.interleave(torch.randn(40, 64, generator=g).half() / 8, torch.randn(40, 64, generator=g).half() / 8)
    got = sk.swiglu_matmul(x, j)
    want = sk.swiglu_reference(x.float(), j.float())
    assert got.dtype == torch.float16
    assert ((got.float() - want).norm() / want.norm()).item() < 2e-3  # one fp16 rounding of the result


@needs_triton
def test_bad_shapes_and_mixed_dtypes_are_refused(interpret):
    x, j = torch.randn(4, 8), torch.randn(6, 8)
    for bad_x, bad_j, match in [(x, torch.randn(5, 8), "joint weight"), (x[0], j, "joint weight"),
                                (torch.randn(4, 7), j, "joint weight"), (x.double(), j, "differ")]:
        with pytest.raises(mukv.ConfigError, match=match):
            sk.swiglu_matmul(bad_x, bad_j)
    assert sk.swiglu_matmul(torch.zeros(0, 8), j).shape == (0, 3)


@needs_triton
@pytest.mark.slow  # the interpreter runs each program in numpy
@pytest.mark.parametrize("which", [["fused_mlp"], ["fused_mlp", "fused_residual"]])
def test_a_stream_through_the_fused_mlp_stores_what_the_plain_path_stores(interpret, which):
    frames = torch.randint(0, 256, (8, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    want, want_text = stored_levels(build_llava_onevision("tiny-llava-ov"), frames)
    fast = build_llava_onevision("tiny-llava-ov")
    params = sum(p.numel() for p in fast.language_model.parameters())
    assert accelerate(fast, which) == which
    assert sum(p.numel() for p in fast.language_model.parameters()) == params  # views of the joint weight
    got, got_text = stored_levels(fast, frames)
    for lv in want:
        assert torch.equal(got[lv][0], want[lv][0]), lv
        # fused_residual rounds the adds inside the products, a little more than fused_mlp alone
        atol = 1e-4 if "fused_residual" in which else 1e-5
        torch.testing.assert_close(got[lv][1], want[lv][1], rtol=1e-4, atol=atol)
    assert got_text == want_text


def test_a_fusion_whose_modules_are_missing_is_refused_before_any_other_changes_the_model(monkeypatch):
    from mukv import accel

    adapter = build_llava_onevision("tiny-llava-ov")
    forwards = {id(m): vars(m).get("forward") for m in adapter.model.modules()}
    monkeypatch.setitem(accel._FUSIONS, "fused_norms", (lambda a: [], accel._apply_norms, "no RMSNorm in {}"))
    with pytest.raises(mukv.ConfigError, match="fused_norms: no RMSNorm in"):
        accelerate(adapter, ["fused_vision", "fused_llm", "fused_norms"])
    assert {id(m): vars(m).get("forward") for m in adapter.model.modules()} == forwards  # nothing was fused
    if not accel.fp8_supported(adapter.device):
        return
    with pytest.raises(mukv.ConfigError, match="ask for one of the two"):
        accelerate(adapter, ["fp8_llm", "fused_mlp"])
