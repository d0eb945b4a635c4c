"""Faster ingest forwards: compiled vision tower and language-model layers, FP8 matrix products.

Each acceleration rewrites a model adapter's modules in place and is measured against the
plain bf16 path (``benchmarks/accel_bench.py``: frames/s, and the first-token logits, kept
tokens and stored KV of the same stream). They are opt-in (:func:`accelerate` on a session's model):
the plain path stays the reference, and the authors'-path comparisons run without them.

* ``compile_vision``: ``torch.compile`` of the vision tower (one graph per batch shape;
  the scheduler's batches come in a few shapes, so few recompiles).
* ``fp8_vision``: the vision tower's linear layers as FP8 (e4m3) matrix products with
  row-wise scales (activations scaled per token at run time, weights per output channel
  once), on GPUs with FP8 tensor cores (compute capability 8.9 or more).
* ``compile_llm``: ``torch.compile`` of each language-model decoder layer (regional
  compilation: one graph reused by every layer).
* ``fp8_llm``: the decoder layers' linear layers as FP8 products (this changes the stored KV:
  measured, never on by default).
* ``fused_vision``: the vision tower's MLP runs its bias and tanh-GELU in the matrix
  product's epilogue (``torch._addmm_activation``: one kernel instead of two).
* ``fused_llm``: the language model's SwiGLU (``silu(gate) * up``) and rotary embedding each
  as one fused kernel (small compiled elementwise functions, no graph around mukv's
  attention). The rotary function is replaced in transformers' Qwen2 module, so it holds for
  every Qwen2 model of the process.
* ``fused_norms``: every RMSNorm of the language model as one compiled kernel (transformers'
  arithmetic: float32 statistics, the weight applied in the input's dtype) instead of the
  five or six elementwise kernels of its eager forward. A norm whose forward does not match
  that arithmetic on a probe is left alone.
* ``fused_mlp``: each decoder layer's gate and up products and its SwiGLU as one Triton matrix
  product with the activation in its epilogue (:mod:`mukv.kernels.swiglu`; the gate and up
  weights become row views of one interleaved joint weight, no extra memory). CUDA only (or
  Triton's CPU interpreter); it replaces ``fused_llm``'s SwiGLU where both are asked for. On an
  H100 at the 0.5B architecture it ingested 9% fewer frames/s than without it (its product runs
  slower than cuBLAS's): keep it off there.
* ``fused_residual``: the residual adds of the decoder layers and of the vision tower's encoder
  layers: the add after attention in the same compiled kernel as the norm that follows it, the add
  after the MLP in its last matrix product's epilogue (``addmm_`` accumulating into the residual
  stream in place; the vision MLP's bias carried in that residual). Each layer class is checked on a
  probe input against its own forward first; a layer that differs is left alone.
* ``fused_rope``: the rotary embedding of queries and keys as one Triton kernel
  (:mod:`mukv.kernels.rope`: each tile of tokens reads its ``cos`` and ``sin`` once and rotates
  every head, with no index divided at run time), in place of ``fused_llm``'s compiled function
  (whose kernel moved its bytes at a quarter of a copy's speed on an H100). CUDA only (or Triton's
  CPU interpreter); process-wide for Qwen2 models like ``fused_llm``'s, and the later of the two
  applied holds. On an H100 at 0.5B: 14 instead of 40 ms of a 512-frame prefill's kernels, +1-1.6%
  frames/s without the vision tower and +0.8% with it over the fastest set without it.
* ``fused_layer_norm``: the vision tower's layer norms, and with ``fused_residual`` the residual add
  before its MLP's norm, as one-pass Triton kernels (:mod:`mukv.kernels.layer_norm`: one program holds
  a row, so SigLIP's 1,152-wide rows are read once, where inductor's compiled reduction, past 1,024
  elements, reads them twice). CUDA only (or Triton's CPU interpreter). On an H100 at 0.5B, in two
  calls not alternated: the vision tower 4.8% faster, the ingest with it 2.1% (1.3% of it drift).
* ``graph_prefill``: each level forward of a batch shape recorded once as a CUDA graph and
  replayed (:mod:`mukv.graph_prefill`: batches padded by at most 12.5%); CUDA only.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from .errors import ConfigError
from . import kernels  # light: triton is imported when a kernel is first built
from .fusions import (_apply_gelu, _apply_layer_norms, _apply_llm, _apply_mlp, _apply_norms, _apply_residual,
                      _apply_rope, _compiled, _gelu_mlps, _plain_swiglu_mlps, _qwen2_language_models,
                      _residual_layers, _rms_norms, _swiglu_mlps, _vision_layer_norms, add_layer_norm, add_rms_norm,
                      decoder_layers, fuse_vision_mlps, rms_norm, rotate_pair, swiglu, vision_tower)

#: what this module's users import from it (the fused forwards' pieces live in :mod:`mukv.fusions`)
__all__ = ["KNOWN", "FP8Linear", "accelerate", "acceleration_names", "add_layer_norm", "add_rms_norm",
           "decoder_layers", "fp8_supported", "fuse_llm", "fuse_mlp", "fuse_norms", "fuse_residual", "fuse_rope",
           "fuse_vision_mlps", "quantize_rows", "rms_norm", "rotate_pair", "swiglu", "to_fp8", "vision_tower"]

#: The accelerations :func:`accelerate` knows.
KNOWN = ("compile_vision", "fp8_vision", "compile_llm", "fp8_llm", "fused_vision", "fused_llm", "fused_norms",
         "fused_mlp", "fused_residual", "fused_rope", "fused_layer_norm", "graph_prefill")
E4M3_MAX = 448.0


class FP8Linear(nn.Module):
    """A linear layer whose product runs in FP8 (e4m3) with row-wise scales.

    The weight ``[N, K]`` is quantised once with one float32 scale per output channel; the
    input ``[..., K]`` is quantised per row (token) at each call. The product and the bias are
    computed by ``torch._scaled_mm`` with a bf16 (or the input's) output.
    """

    def __init__(self, linear: nn.Linear):
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"FP8Linear wraps an nn.Linear; got {type(linear).__name__}")
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)
        self.register_buffer("weight_fp8", (w / scale).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale.view(1, -1).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs = _compiled("quantize_rows", quantize_rows)(x.reshape(-1, shape[-1]))
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        bias = None if self.bias is None else self.bias.to(out_dtype)
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale, bias=bias,
                             out_dtype=out_dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, K]`` -> e4m3 codes ``[M, K]`` and float32 scales ``[M, 1]`` (one per row)."""
    xs = (x2.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
    return (x2.float() / xs).to(torch.float8_e4m3fn), xs


def fuse_norms(adapter: Any) -> int:
    """Every RMSNorm of the language model as one compiled kernel; returns how many."""
    return _fuse("fused_norms", adapter)


def fuse_llm(adapter: Any) -> int:
    """SwiGLU of every decoder layer's MLP as one kernel, and transformers' Qwen2 rotary
    embedding as one kernel (process-wide); returns how many MLPs were fused."""
    return _fuse("fused_llm", adapter)


def _require_triton(adapter: Any, name: str = "fused_mlp") -> None:
    """:class:`ConfigError` unless the Triton kernel of ``name`` (``fused_mlp``, ``fused_rope``,
    ``fused_layer_norm``) can run for ``adapter`` (triton installed; a CUDA device, or Triton's CPU
    interpreter)."""
    why = kernels.available()
    if why:
        raise ConfigError(f"{name}: {why}")
    device = getattr(adapter, "device", torch.device("cpu"))
    if device.type != "cuda" and not kernels.interpreting():
        raise ConfigError(f"{name} runs a Triton kernel on a CUDA GPU; this model runs on {device}")


def fuse_mlp(adapter: Any) -> int:
    """Every decoder layer's SwiGLU MLP (bias-free ``nn.Linear`` gate and up, SiLU) as one Triton
    product for gate, up and SwiGLU (:func:`mukv.kernels.swiglu.swiglu_matmul`); returns how many.

    The gate and up weights are replaced by row views of one joint weight (rows interleaved), so
    the layers keep their parameters and the model no extra memory.
    """
    _check_adapter(adapter, "fuse_mlp")
    _require_triton(adapter, "fused_mlp")
    return _fuse("fused_mlp", adapter)


def fuse_rope(adapter: Any) -> int:
    """transformers' Qwen2 rotary function replaced by the Triton kernel (:mod:`mukv.kernels.rope`;
    process-wide, see :data:`KNOWN`'s ``fused_rope``); returns 1, or raises ConfigError for a model
    that is not Qwen2 or a device without the kernel."""
    _check_adapter(adapter, "fuse_rope")
    _require_triton(adapter, "fused_rope")
    if not _qwen2_language_models(adapter):
        raise ConfigError(f"fused_rope: {_FUSIONS['fused_rope'][2].format(getattr(adapter, 'name', '?'))}")
    return _fuse("fused_rope", adapter)


def fuse_residual(adapter: Any) -> int:
    """The residual adds of every decoder layer and vision encoder layer fused into the next norm's kernel
    and the MLP's last product (see :data:`KNOWN`'s ``fused_residual``); returns how many layers."""
    return _fuse("fused_residual", adapter)


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor-core products exist on this device (CUDA, compute capability 8.9 or more)."""
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError, ValueError):
        raise ConfigError(f"fp8_supported: expected a torch device; got {device!r}"[:200]) from None
    if device.type != "cuda" or not hasattr(torch, "float8_e4m3fn"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def to_fp8(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module`` whose sizes FP8 products take (multiples of
    16) by an :class:`FP8Linear`; returns how many were replaced."""
    if not isinstance(module, nn.Module):
        raise ConfigError(f"to_fp8: expected a torch module, got {type(module).__name__}")
    n = 0
    if isinstance(module, nn.MultiheadAttention):  # reads its out_proj's weight itself
        return 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
            setattr(module, name, FP8Linear(child))
            n += 1
        else:
            n += to_fp8(child)
    return n


#: the fusions :func:`accelerate` applies, in this order: what finds the modules each changes (all
#: found before anything is changed), what changes them, and what a model without such modules lacks
_FUSIONS: dict[str, tuple[Callable[[Any], list], Callable[[Any, list], None], str]] = {
    "fused_vision": (lambda a: _gelu_mlps(vision_tower(a)), _apply_gelu,
                     "the vision tower of {} has no tanh-GELU MLP (fc1, fc2) it knows"),
    "fused_llm": (_swiglu_mlps, _apply_llm,
                  "the decoder layers of {} have no SwiGLU MLP (gate_proj, up_proj, down_proj) it knows"),
    "fused_norms": (_rms_norms, _apply_norms, "the language model of {} has no RMSNorm whose arithmetic it knows"),
    "fused_mlp": (_plain_swiglu_mlps, _apply_mlp,
                  "the decoder layers of {} have no bias-free SwiGLU MLP (gate_proj, up_proj, down_proj) it knows"),
    "fused_residual": (_residual_layers, _apply_residual,
                       "{} has no pre-norm decoder or vision encoder layer whose arithmetic it knows"),
    "fused_rope": (_qwen2_language_models, _apply_rope,
                   "the language model of {} is not transformers' Qwen2, whose rotary function it replaces"),
    "fused_layer_norm": (_vision_layer_norms, _apply_layer_norms,
                         "the vision tower of {} has no layer norm (nn.LayerNorm with weight and bias) it knows"),
}


def _fuse(name: str, adapter: Any) -> int:
    """The fusion ``name`` of :data:`_FUSIONS` applied to whatever modules of ``adapter`` it finds; how many."""
    _check_adapter(adapter, name)
    find, apply, _ = _FUSIONS[name]
    modules = find(adapter)
    apply(adapter, modules)
    return len(modules)


def _check_adapter(adapter: Any, what: str) -> None:
    if not isinstance(getattr(adapter, "language_model", None), nn.Module) or not hasattr(adapter, "device"):
        raise ConfigError(f"{what}: expected a model adapter (session.model), got {type(adapter).__name__}")


def acceleration_names(which: Iterable[str] | str) -> list[str]:
    """``which`` (names of :data:`KNOWN`, or one name) as a list without repeats; ConfigError for
    anything else."""
    if isinstance(which, str):
        which = [which]
    if isinstance(which, (bytes, bytearray, dict)):
        raise ConfigError(f"accelerations: expected names of {', '.join(KNOWN)}, got {type(which).__name__}")
    try:
        which = list(dict.fromkeys(which))
    except TypeError:
        raise ConfigError(f"accelerations: expected names of {', '.join(KNOWN)}, got {type(which).__name__}") from None
    unknown = [w for w in which if not isinstance(w, str) or w not in KNOWN]
    if unknown:
        raise ConfigError(f"unknown acceleration {unknown[0]!r}; known: {', '.join(KNOWN)}")
    return which


def accelerate(adapter: Any, which: Iterable[str] | str) -> list[str]:
    """Apply accelerations (names of :data:`KNOWN`, or one name) to ``adapter`` in place.

    Returns what was applied. Raises ConfigError before anything is changed: for an unknown name,
    for FP8, ``fused_mlp``, ``fused_rope``, ``fused_layer_norm`` or ``graph_prefill`` where the device cannot
    run them, or for a fusion whose modules the model lacks.
    """
    which = acceleration_names(which)
    _check_adapter(adapter, "accelerate")
    if "graph_prefill" in which:
        from .graph_prefill import require_cuda

        require_cuda(adapter)
    for name in ("fused_mlp", "fused_rope", "fused_layer_norm"):
        if name in which:
            _require_triton(adapter, name)
    if any(w.startswith("fp8") for w in which) and not fp8_supported(adapter.device):
        raise ConfigError(f"FP8 products need a CUDA GPU of compute capability 8.9 or more; "
                          f"this model runs on {adapter.device}")
    if "fused_mlp" in which and "fp8_llm" in which:
        raise ConfigError("fused_mlp multiplies the decoder layers' bf16 gate and up weights; fp8_llm replaces "
                          "them: ask for one of the two")
    if "compile_vision" in which or "fp8_vision" in which:
        vision_tower(adapter)  # ConfigError now, before anything is changed, for a model without one
    found = {}
    for name, (find, _, missing) in _FUSIONS.items():
        if name in which:
            found[name] = find(adapter)
            if not found[name]:
                raise ConfigError(f"{name}: {missing.format(getattr(adapter, 'name', '?'))}")
    done = []
    if "fp8_vision" in which:
        to_fp8(vision_tower(adapter))
        done.append("fp8_vision")
    if "fp8_llm" in which:
        for layer in decoder_layers(adapter):
            to_fp8(layer)
        done.append("fp8_llm")
    for name, (_, apply, _) in _FUSIONS.items():
        if name in found:
            apply(adapter, found[name])
            done.append(name)
    if "compile_vision" in which:
        vision_tower(adapter).compile(dynamic=False)
        done.append("compile_vision")
    if "compile_llm" in which:
        from .attention import keep_attention_eager

        keep_attention_eager()
        for layer in decoder_layers(adapter):
            layer.compile(dynamic=False)
        done.append("compile_llm")
    if "graph_prefill" in which:  # last: the graphs record the forwards as the modes above left them
        from .graph_prefill import install

        install(adapter)
        done.append("graph_prefill")
    return done
