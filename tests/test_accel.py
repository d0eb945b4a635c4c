"""mukv.accel: compiled vision tower and decoder layers store what the plain path stores; FP8 and unknown
names are refused where they cannot run."""

import pytest
import torch

import mukv
from mukv.accel import FP8Linear, accelerate, fp8_supported, to_fp8
from mukv.plugins.models.llava_onevision import build_llava_onevision

from helpers import stored_levels


@pytest.mark.slow  # two compilations on the CPU, about a minute
def test_compiled_vision_tower_and_layers_store_what_the_plain_path_stores():
    frames = torch.randint(0, 256, (12, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = build_llava_onevision("tiny-llava-ov")
    fast = build_llava_onevision("tiny-llava-ov")
    assert accelerate(fast, ["compile_vision", "compile_llm"]) == ["compile_vision", "compile_llm"]
    torch.testing.assert_close(fast.encode_frames(frames), plain.encode_frames(frames), rtol=1e-5, atol=1e-5)
    want, want_text = stored_levels(plain, frames)
    got, got_text = stored_levels(fast, frames)
    for lv in want:
        assert torch.equal(got[lv][0], want[lv][0]), lv  # the same kept tokens
        torch.testing.assert_close(got[lv][1], want[lv][1], rtol=1e-4, atol=1e-5)
    assert got_text == want_text


def test_unknown_acceleration_and_fp8_without_fp8_products_are_refused():
    adapter = build_llava_onevision("tiny-llava-ov")
    with pytest.raises(mukv.ConfigError, match="unknown acceleration 'fast'"):
        accelerate(adapter, ["fast"])
    with pytest.raises(mukv.ConfigError, match="unknown acceleration 'fast'"):
        accelerate(adapter, "fast")  # one name, not its letters
    with pytest.raises(mukv.ConfigError, match="expected names"):
        accelerate(adapter, 3)
    with pytest.raises(mukv.ConfigError, match="expected a model adapter"):
        accelerate("model", ["compile_vision"])
    if not fp8_supported(adapter.device):
        with pytest.raises(mukv.ConfigError, match="FP8"):
            accelerate(adapter, ["fp8_vision"])


@pytest.mark.skipif(not (torch.cuda.is_available() and fp8_supported(torch.device("cuda"))), reason="FP8 GPU")
def test_fp8_linear_is_close_to_the_bf16_product():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 33, 256, device="cuda", dtype=torch.bfloat16)
    want = lin(x).float()
    mod = torch.nn.Sequential(lin)
    assert to_fp8(mod) == 1 and isinstance(mod[0], FP8Linear)
    got = mod(x).float()
    assert ((got - want).norm() / want.norm()).item() < 0.05


def test_fp8_leaves_multihead_attention_projections_alone():
    # nn.MultiheadAttention reads its out_proj's weight directly: replacing it broke SigLIP's head
    mod = torch.nn.ModuleDict({"attn": torch.nn.MultiheadAttention(32, 2), "fc": torch.nn.Linear(32, 64)})
    assert to_fp8(mod) == 1
    assert isinstance(mod["fc"], FP8Linear) and type(mod["attn"].out_proj) is not FP8Linear


def test_fused_rotary_embedding_is_transformers_arithmetic():
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from mukv.accel import rotate_pair

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 9, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g)
    cos, sin = torch.randn(1, 9, 16, generator=g), torch.randn(1, 9, 16, generator=g)
    for got, want in zip(rotate_pair(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(got, want)


def _accelerated_stored(which, frames):
    """A fresh tiny model with ``which`` applied: what it stores of ``frames``, its answer, the model,
    and its visual tokens (transformers' rotary function, replaced process-wide, restored after)."""
    from transformers.models.qwen2 import modeling_qwen2

    original = modeling_qwen2.apply_rotary_pos_emb
    fast = build_llava_onevision("tiny-llava-ov")
    try:
        assert accelerate(fast, which) == which
        got, got_text = stored_levels(fast, frames)
        return got, got_text, fast, fast.encode_frames(frames)
    finally:
        modeling_qwen2.apply_rotary_pos_emb = original


def _assert_stores_alike(got, want, rel, label):
    for lv in want:
        assert torch.equal(got[lv][0], want[lv][0]), (label, lv)  # the same kept tokens
        assert ((got[lv][1] - want[lv][1]).norm() / want[lv][1].norm()).item() < rel, (label, lv)


@pytest.mark.slow  # compiles two small kernels on the CPU
def test_fused_vision_and_llm_store_what_the_plain_path_stores():
    frames = torch.randint(0, 256, (12, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    plain = build_llava_onevision("tiny-llava-ov")
    want, want_text = stored_levels(plain, frames)
    got, got_text, _, visual = _accelerated_stored(["fused_vision", "fused_llm"], frames)
    torch.testing.assert_close(visual, plain.encode_frames(frames), rtol=1e-5, atol=1e-5)
    # float32: the fused LLM kernels are exact here; the GELU epilogue rounds differently
    _assert_stores_alike(got, want, 1e-3, "fused_vision+fused_llm")
    assert got_text == want_text


def test_graph_prefill_pads_a_batch_to_its_bucket_and_returns_the_real_rows_alone():
    """The padded batch (the arithmetic every recorded graph replays, run eagerly on the CPU): each real
    block's KV, column sums and positions are those of the unpadded batch, and they are new tensors."""
    from mukv.graph_prefill import GraphPrefill

    adapter = build_llava_onevision("tiny-llava-ov")
    prefix = adapter.prefix("system")
    g = torch.Generator().manual_seed(0)
    gp = GraphPrefill(adapter.prefill_blocks, bucket=8, record=False)
    for b, length in ((5, 12), (8, 12), (3, 12), (6, 7)):
        embeds = torch.randn(b, length, adapter.hidden_size, generator=g)
        tokens = torch.randperm(length, generator=g)[None].expand(b, -1)
        want = adapter.prefill_blocks(prefix, embeds, attention=True, token_index=tokens)
        got = gp(prefix, embeds, attention=True, token_index=tokens)
        assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        assert got[0].is_contiguous() and got[0].untyped_storage().data_ptr() != \
            gp._graphs[next(k for k in gp._graphs if k[0] == -(-b // 8) * 8 and k[1] == length)].out[0] \
            .untyped_storage().data_ptr()
    assert len(gp._graphs) == 2 and gp.replays == 4  # batches of 5, 8 and 3 blocks of 12 tokens share one shape


def test_graph_prefill_pads_by_at_most_an_eighth_or_to_a_fixed_bucket():
    from mukv.graph_prefill import GraphPrefill, padded_size

    for b in range(1, 2000):
        n = padded_size(b)
        assert b <= n <= b * 1.125 and padded_size(n) == n  # a padded size is its own shape
    assert [padded_size(b) for b in (7, 20, 83, 332)] == [7, 20, 88, 352]
    assert [padded_size(b, 16) for b in (5, 20, 83)] == [16, 32, 96]
    with pytest.raises(mukv.ConfigError, match="bucket"):
        GraphPrefill(lambda *a, **k: None, bucket=-1)


def test_graph_prefill_stores_what_the_plain_path_stores_and_needs_cuda():
    from mukv.graph_prefill import install

    frames = torch.randint(0, 256, (12, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = build_llava_onevision("tiny-llava-ov")
    padded = build_llava_onevision("tiny-llava-ov")
    gp = install(padded, bucket=16, record=False)
    assert install(padded, record=False) is gp  # once
    want, want_text = stored_levels(plain, frames)
    got, got_text = stored_levels(padded, frames)
    assert gp.replays > 0
    for lv in want:
        assert torch.equal(got[lv][0], want[lv][0]), lv
        torch.testing.assert_close(got[lv][1], want[lv][1], rtol=1e-4, atol=1e-5)
    assert got_text == want_text
    if not torch.cuda.is_available():
        with pytest.raises(mukv.ConfigError, match="graph_prefill records CUDA graphs"):
            accelerate(plain, ["graph_prefill"])
        with pytest.raises(mukv.ConfigError, match="CUDA"):
            install(plain)


def test_a_shape_whose_forward_cannot_be_recorded_runs_eagerly_with_a_warning(caplog):
    """Recording fails here (no CUDA on a CPU, as a model whose forward cannot be captured would): the
    batch still runs, eagerly and unpadded, with one warning naming the shape; later batches of that
    shape run eagerly without trying again."""
    from mukv.graph_prefill import GraphPrefill

    adapter = build_llava_onevision("tiny-llava-ov")
    prefix = adapter.prefix("system")
    embeds = torch.randn(5, 12, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    gp = GraphPrefill(adapter.prefill_blocks, bucket=8, record=True)
    want = adapter.prefill_blocks(prefix, embeds, attention=True)
    with caplog.at_level("WARNING", logger="mukv.graph_prefill"):
        for _ in range(2):
            got = gp(prefix, embeds, attention=True)
            for x, y in zip(got, want):
                torch.testing.assert_close(x, y)
    assert gp.eager_calls == 2 and gp.replays == 0
    assert len([r for r in caplog.records if "run eagerly" in r.getMessage()]) == 1


@pytest.mark.slow  # compiles small kernels on the CPU
def test_fused_norms_store_what_the_plain_path_stores():
    frames = torch.randint(0, 256, (12, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    plain = build_llava_onevision("tiny-llava-ov")
    want, want_text = stored_levels(plain, frames)
    keys = set(plain.model.state_dict())
    for which in (["fused_norms"], ["fused_llm", "fused_norms"]):
        got, got_text, fast, _ = _accelerated_stored(which, frames)
        # float32: the compiled norm rounds like the eager one up to its reduction order
        _assert_stores_alike(got, want, 1e-4, which)
        assert got_text == want_text
        assert set(fast.model.state_dict()) == keys  # a checkpoint saved from it has the plain names


def test_fused_norms_leave_a_norm_of_other_arithmetic_alone():
    from mukv.accel import fuse_norms

    class MeanRMSNorm(torch.nn.Module):  # the name of an RMSNorm, a layer norm's arithmetic
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.ones(8)), 1e-6

        def forward(self, x):
            return torch.nn.functional.layer_norm(x, (8,), self.weight, eps=self.variance_epsilon)

    adapter = build_llava_onevision("tiny-llava-ov")
    n = sum(type(m).__name__.endswith("RMSNorm") for m in adapter.language_model.modules())
    adapter.language_model.layers[0].extra_norm = MeanRMSNorm()
    assert fuse_norms(adapter) == n
    assert "forward" not in vars(adapter.language_model.layers[0].extra_norm)
    assert "forward" in vars(adapter.language_model.norm)


def test_fused_residual_stores_what_the_plain_path_stores():
    frames = torch.randint(0, 256, (12, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    plain = build_llava_onevision("tiny-llava-ov")
    want, want_text = stored_levels(plain, frames)
    want_visual = plain.encode_frames(frames)
    for which in (["fused_residual"], ["fused_vision", "fused_llm", "fused_norms", "fused_residual"]):
        got, got_text, fast, visual = _accelerated_stored(which, frames)
        layers = [*fast.language_model.layers, *_encoder_layers(fast)]
        assert all("forward" in vars(layer) for layer in layers), which  # every layer took the fused forward
        torch.testing.assert_close(visual, want_visual, rtol=1e-4, atol=1e-4)
        # float32: the adds in the products' epilogues and the compiled norms round differently, by little
        _assert_stores_alike(got, want, 1e-3, which)
        assert got_text == want_text


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_fused_residual_on_other_architectures_stores_what_their_plain_path_stores(preset):
    from mukv.session import load_model

    frames = torch.randint(0, 256, (8, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    want, want_text = stored_levels(load_model(preset, torch.device("cpu")), frames)
    fast = load_model(preset, torch.device("cpu"))
    assert accelerate(fast, ["fused_residual"]) == ["fused_residual"]
    assert all("forward" in vars(layer) for layer in fast.language_model.layers)
    got, got_text = stored_levels(fast, frames)
    _assert_stores_alike(got, want, 1e-4, preset)
    assert got_text == want_text


def _encoder_layers(adapter):
    from mukv.accel import vision_tower

    return [m for m in vision_tower(adapter).modules() if type(m).__name__ == "SiglipEncoderLayer"]


def test_fused_residual_takes_positional_arguments_and_leaves_a_layer_of_other_arithmetic_alone():
    from mukv.accel import fuse_residual

    adapter = build_llava_onevision("tiny-llava-ov")
    layer = _encoder_layers(adapter)[0]
    x = torch.randn(1, 5, layer.layer_norm1.normalized_shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = layer(x, None)
        # the second decoder layer computes something else: its post-attention add is doubled
        odd = adapter.language_model.layers[1]

        class Doubled(type(odd)):
            def forward(self, hidden_states, **kwargs):
                h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
                hidden_states = hidden_states + 2 * h
                return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

        odd.__class__ = Doubled
        n = fuse_residual(adapter)
        assert n == len(adapter.language_model.layers) - 1 + len(_encoder_layers(adapter))
        assert "forward" not in vars(odd)
        before = x.clone()
        torch.testing.assert_close(layer(x, None), want, rtol=1e-5, atol=1e-5)  # the mask given by position
        assert torch.equal(x, before)  # the product accumulates in place into its own tensor, not the input
        h = torch.randn(1, 5, adapter.language_model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        before = h.clone()
        rope = adapter.language_model.rotary_emb(h, torch.arange(5)[None])
        adapter.language_model.layers[0](h, attention_mask=None, position_embeddings=rope)
        assert torch.equal(h, before)


def test_every_public_acceleration_function_refuses_what_is_not_a_model_clearly():
    from mukv.accel import fuse_llm, fuse_mlp, fuse_norms, fuse_residual, fuse_vision_mlps
    from mukv.kernels import swiglu as sk

    for fn in (fuse_norms, fuse_llm, fuse_mlp, fuse_residual):
        for bad in (None, object(), "tiny-llava-ov"):
            with pytest.raises(mukv.ConfigError, match="expected a model adapter"):
                fn(bad)
    for fn in (fuse_vision_mlps, to_fp8):
        with pytest.raises(mukv.ConfigError, match="expected a torch module"):
            fn(None)
    adapter = build_llava_onevision("tiny-llava-ov")
    for which in (b"fused_llm", {"fused_llm": True}, 5, None, ["fused_llm", 3]):
        with pytest.raises(mukv.ConfigError, match="accelerations|unknown acceleration"):
            accelerate(adapter, which)
    with pytest.raises(mukv.ConfigError, match="must be tensors"):
        sk.interleave(None, torch.zeros(2, 2))
    with pytest.raises(mukv.ConfigError, match="must be tensors"):
        sk.swiglu_matmul([[1.0]], torch.zeros(2, 1))
    with pytest.raises(mukv.ConfigError, match="floating-point"):
        sk.swiglu_matmul(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(4, 3, dtype=torch.int32))


def test_a_compiled_function_runs_eagerly_where_the_compiler_refuses_a_call(caplog):
    import torch._dynamo

    from mukv.fusions import _compiled

    def scaled_norm(x, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    fn = _compiled("test_scaled_norm", scaled_norm)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level("WARNING", logger="mukv.fusions"):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):  # dynamo compiles again for each dtype
            torch.testing.assert_close(fn(x.to(dtype), 1e-6), scaled_norm(x.to(dtype), 1e-6))
    assert fn.refused == 2
    assert sum("runs eagerly" in r.getMessage() for r in caplog.records) == 1  # one warning per function


@pytest.mark.slow  # compiles the fused helpers once more on the CPU
@pytest.mark.parametrize("static", [True, False])
def test_compiled_helpers_with_a_fixed_or_dynamic_last_dimension_store_what_the_plain_path_stores(monkeypatch, static):
    """``mukv.fusions.STATIC_LAST_DIM`` (the default): the compiled helpers fix each tensor's last dimension
    and keep the others dynamic; or every dimension dynamic. Feeds of several token counts store what the
    plain path stores, without eager fallbacks."""
    from mukv import fusions

    frames = torch.randint(0, 256, (12, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    chunks = [frames[:5], frames[5:7], frames[7:]]  # level forwards of several batch sizes
    want, want_text = stored_levels(build_llava_onevision("tiny-llava-ov"), chunks)
    monkeypatch.setattr(fusions, "STATIC_LAST_DIM", static)
    which = ["fused_vision", "fused_llm", "fused_norms", "fused_residual"]
    from transformers.models.qwen2 import modeling_qwen2

    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", modeling_qwen2.apply_rotary_pos_emb)  # restored after
    fast = build_llava_onevision("tiny-llava-ov")
    assert accelerate(fast, which) == which
    got, got_text = stored_levels(fast, chunks)
    _assert_stores_alike(got, want, 1e-3, "static last dimension")
    assert got_text == want_text
    if static:  # one compiled copy per width of the model: its own recompile limit, not shared with other widths
        norms = fusions._COMPILED[("rms_norm", True)]
        width = fast.language_model.norm.weight.shape[0]
        assert (width, width) in norms.copies and norms.copies[(width, width)].static_last


@pytest.mark.slow  # compiles the fused helpers on the CPU
def test_the_gpu_tests_stream_comparison_runs_on_the_cpu():
    """``helpers.assert_accelerated_stream_stores_alike``, which the GPU tests of the Triton kernels use,
    on the CPU with the fusions that run here (so the GPU tests' own check is itself checked)."""
    from helpers import assert_accelerated_stream_stores_alike

    assert_accelerated_stream_stores_alike(["fused_llm", "fused_norms", "fused_residual"],
                                           ("fused_vision", "fused_llm", "fused_norms", "fused_residual"),
                                           torch.device("cpu"))


@pytest.mark.slow  # compiles the decoder layers on the CPU
def test_the_fused_helpers_inside_compiled_layers_are_traced_into_their_graphs():
    """Under ``compile_llm`` the fused helpers are called while dynamo traces a layer: they run their eager
    arithmetic there (traced into the layer's graph) rather than their own compiled copies, so they add no
    graph break; the stream stores what the plain path stores."""
    from torch._dynamo.utils import counters

    frames = torch.randint(0, 256, (8, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    want, want_text = stored_levels(build_llava_onevision("tiny-llava-ov"), frames)
    counters.clear()
    which = ["fused_llm", "fused_norms", "fused_residual", "compile_llm"]
    got, got_text, _, _ = _accelerated_stored(which, frames)
    breaks = [k.splitlines()[0] for k in counters["graph_break"]]
    assert all("torch.compiler.disable" in b for b in breaks), breaks  # only mukv's attention, kept eager on purpose
    _assert_stores_alike(got, want, 1e-3, "compiled layers")
    assert got_text == want_text
