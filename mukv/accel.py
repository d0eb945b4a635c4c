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
  Triton's CPU interpreter); it replaces ``fused_llm``'s SwiGLU where both are asked for.
* ``fused_residual``: the residual adds of the decoder layers and of the vision tower's encoder
  layers: the add after attention in the same compiled kernel as the norm that follows it, the add
  after the MLP in its last matrix product's epilogue (``torch.addmm`` with the residual stream as
  its C operand; the vision MLP's bias carried in that residual). Each layer class is checked on a
  probe input against its own forward first; a layer that differs is left alone.
* ``graph_prefill``: each level forward of a batch shape recorded once as a CUDA graph and
  replayed (:mod:`mukv.graph_prefill`: batches padded by at most 12.5%); CUDA only.
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .kernels import swiglu as swiglu_kernel  # light: triton is imported when the kernel is first built

#: The accelerations :func:`accelerate` knows.
KNOWN = ("compile_vision", "fp8_vision", "compile_llm", "fp8_llm", "fused_vision", "fused_llm", "fused_norms",
         "fused_mlp", "fused_residual", "graph_prefill")
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


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, elementwise (any equal shapes)."""
    return F.silu(gate) * up


def rotate_pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of queries ``[B, Hq, T, D]`` and keys ``[B, Hk, T, D]`` with ``cos`` and
    ``sin`` ``[B, T, D]``: the arithmetic of transformers' ``apply_rotary_pos_emb``."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    half = q.shape[-1] // 2
    rq = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    rk = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return q * cos + rq * sin, k * cos + rk * sin


_COMPILED: dict[str, Callable[..., Any]] = {}


def _compiled(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled once per process (dynamic shapes: one kernel for every token count)."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[name]


def _fused_swiglu_hidden(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _compiled("swiglu", swiglu)(self.gate_proj(x), self.up_proj(x))


def _swiglu_hidden(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of a SwiGLU MLP's down product: mukv's fused kernel where one was applied, else its own."""
    fused = getattr(mlp, "mukv_hidden", None)
    return fused(x) if fused is not None else mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def _gelu_hidden(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of a GELU MLP's ``fc2``: mukv's fused epilogue where it was applied, else its own."""
    fused = getattr(mlp, "mukv_hidden", None)
    return fused(x) if fused is not None else mlp.activation_fn(mlp.fc1(x))


def _down_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(self.mukv_hidden(x))


def _fc2_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.mukv_hidden(x))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm (T5 layer norm) of ``x [..., D]`` with ``weight [D]``: statistics
    in float32, the weight applied after the cast back to ``x``'s dtype."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _fused_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _compiled("rms_norm", rms_norm)(x, self.weight, self.variance_epsilon)


def _is_rms_norm(m: nn.Module) -> bool:
    """``m`` is an RMSNorm whose forward computes :func:`rms_norm` (checked on a probe input)."""
    w, eps = getattr(m, "weight", None), getattr(m, "variance_epsilon", None)
    if not type(m).__name__.endswith("RMSNorm") or not isinstance(w, torch.Tensor) or w.dim() != 1:
        return False
    if not isinstance(eps, (float, int)) or isinstance(eps, bool):
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    probe = (torch.randn(3, w.shape[0], generator=g) + 0.5).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        want = type(m).forward(m, probe)
        return want.shape == probe.shape and torch.allclose(want.float(), rms_norm(probe, w, float(eps)).float(),
                                                            rtol=1e-3, atol=1e-3)


def _rms_norms(adapter: Any) -> list[nn.Module]:
    return [m for m in adapter.language_model.modules() if _is_rms_norm(m)]


def _apply_norms(adapter: Any, norms: list[nn.Module]) -> None:
    for m in norms:
        m.forward = types.MethodType(_fused_norm_forward, m)


def fuse_norms(adapter: Any) -> int:
    """Every RMSNorm of the language model as one compiled kernel; returns how many."""
    return _fuse("fused_norms", adapter)


def _fused_gelu_hidden(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fc1 = self.fc1
    if type(fc1) is not nn.Linear or fc1.bias is None:  # e.g. an FP8Linear: its own product, then GELU
        return F.gelu(fc1(x), approximate="tanh")
    x2 = x.reshape(-1, x.shape[-1])
    h = torch._addmm_activation(fc1.bias, x2, fc1.weight.t(), use_gelu=True)  # tanh GELU in the epilogue
    return h.reshape(*x.shape[:-1], fc1.out_features)


def _gelu_mlps(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if hasattr(m, "fc1") and hasattr(m, "fc2")
            and type(getattr(m, "activation_fn", None)).__name__ in ("PytorchGELUTanh", "GELUTanh")]


def _apply_gelu(adapter: Any, mlps: list[nn.Module]) -> None:
    for m in mlps:
        m.mukv_hidden = types.MethodType(_fused_gelu_hidden, m)
        m.forward = types.MethodType(_fc2_forward, m)


def fuse_vision_mlps(module: nn.Module) -> int:
    """Give every MLP under ``module`` with ``fc1``/``fc2`` and a tanh-GELU activation the fused
    forward; returns how many."""
    if not isinstance(module, nn.Module):
        raise ConfigError(f"fuse_vision_mlps: expected a torch module (the vision tower), got {type(module).__name__}")
    mlps = _gelu_mlps(module)
    _apply_gelu(None, mlps)
    return len(mlps)


def _swiglu_mlps(adapter: Any) -> list[nn.Module]:
    return _swiglu_mlps_of(decoder_layers(adapter))


def _swiglu_mlps_of(layers: Iterable[nn.Module]) -> list[nn.Module]:
    out = []
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        swiglu_mlp = all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj"))
        if swiglu_mlp and type(getattr(mlp, "act_fn", None)).__name__ == "SiLUActivation":
            out.append(mlp)
    return out


def _apply_llm(adapter: Any, mlps: list[nn.Module]) -> None:
    for mlp in mlps:
        if "mukv_gate_up" not in vars(mlp):  # fused_mlp's kernel holds the SwiGLU already
            mlp.mukv_hidden = types.MethodType(_fused_swiglu_hidden, mlp)
            mlp.forward = types.MethodType(_down_forward, mlp)
    from transformers.models.qwen2 import modeling_qwen2

    if type(adapter.language_model).__module__ == modeling_qwen2.__name__:
        modeling_qwen2.apply_rotary_pos_emb = _compiled("rope", rotate_pair)


def fuse_llm(adapter: Any) -> int:
    """SwiGLU of every decoder layer's MLP as one kernel, and transformers' Qwen2 rotary
    embedding as one kernel (process-wide); returns how many MLPs were fused."""
    return _fuse("fused_llm", adapter)


def _fused_mlp_hidden(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    joint = self.mukv_gate_up
    if x.dtype != joint.dtype or x.device != joint.device:  # e.g. a float32 probe: the composed path
        return swiglu(self.gate_proj(x), self.up_proj(x))
    h = swiglu_kernel.swiglu_matmul(x.reshape(-1, x.shape[-1]), joint)
    return h.reshape(*x.shape[:-1], h.shape[-1])


def _require_fused_mlp(adapter: Any) -> None:
    """:class:`ConfigError` unless the fused SwiGLU kernel can run for ``adapter`` (triton installed; a
    CUDA device, or Triton's CPU interpreter)."""
    why = swiglu_kernel.available()
    if why:
        raise ConfigError(f"fused_mlp: {why}")
    device = getattr(adapter, "device", torch.device("cpu"))
    if device.type != "cuda" and not swiglu_kernel.interpreting():
        raise ConfigError(f"fused_mlp runs a Triton kernel on a CUDA GPU; this model runs on {device}")


def _plain_swiglu_mlps(adapter: Any) -> list[nn.Module]:
    """The SwiGLU MLPs whose gate and up are bias-free ``nn.Linear`` layers of one shape."""
    out = []
    for mlp in _swiglu_mlps(adapter):
        gate, up = mlp.gate_proj, mlp.up_proj
        if all(type(p) is nn.Linear and p.bias is None for p in (gate, up)) and gate.weight.shape == up.weight.shape:
            out.append(mlp)
    return out


def _apply_mlp(adapter: Any, mlps: list[nn.Module]) -> None:
    for mlp in mlps:
        gate, up = mlp.gate_proj, mlp.up_proj
        with torch.no_grad():
            joint = swiglu_kernel.interleave(gate.weight.detach(), up.weight.detach())
        gate.weight = nn.Parameter(joint[0::2], requires_grad=False)
        up.weight = nn.Parameter(joint[1::2], requires_grad=False)
        mlp.mukv_gate_up = joint
        mlp.mukv_hidden = types.MethodType(_fused_mlp_hidden, mlp)
        mlp.forward = types.MethodType(_down_forward, mlp)


def fuse_mlp(adapter: Any) -> int:
    """Every decoder layer's SwiGLU MLP (bias-free ``nn.Linear`` gate and up, SiLU) as one Triton
    product for gate, up and SwiGLU (:func:`mukv.kernels.swiglu.swiglu_matmul`); returns how many.

    The gate and up weights are replaced by row views of one joint weight (rows interleaved), so
    the layers keep their parameters and the model no extra memory.
    """
    _check_adapter(adapter, "fuse_mlp")
    _require_fused_mlp(adapter)
    return _fuse("fused_mlp", adapter)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream ``residual + x`` (``[..., D]``, in their dtype) and its :func:`rms_norm`."""
    s = residual + x
    return s, rms_norm(s, weight, eps)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   carry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + x`` (``[..., D]``) plus ``carry`` ``[D]`` (the next product's bias, carried in the
    residual stream), and the layer norm of ``residual + x``."""
    s = residual + x
    return s + carry, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def _product_add(linear: nn.Linear, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + h @ linear.weight.T`` ``[..., N]``, the add in the product's epilogue (``residual``
    carries the product's bias, where it has one)."""
    out = torch.addmm(residual.reshape(-1, residual.shape[-1]), h.reshape(-1, h.shape[-1]), linear.weight.t())
    return out.view(residual.shape)


def _epilogue_ok(linear: nn.Module, h: torch.Tensor, residual: torch.Tensor) -> bool:
    return (type(linear) is nn.Linear and h.dtype == residual.dtype == linear.weight.dtype
            and h.device == linear.weight.device)


def _kernel(name: str, fn: Callable[..., Any], eager: bool) -> Callable[..., Any]:
    return fn if eager else _compiled(name, fn)


def _decoder_layer(self: nn.Module, hidden_states: torch.Tensor, eager: bool, **kwargs: Any) -> torch.Tensor:
    """A pre-norm decoder layer (transformers' Qwen2 arithmetic) with its residual adds fused."""
    residual = hidden_states
    h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    norm, mlp = self.post_attention_layernorm, self.mlp
    residual, h = _kernel("add_rms_norm", add_rms_norm, eager)(h, residual, norm.weight, norm.variance_epsilon)
    h = _swiglu_hidden(mlp, h)
    if not _epilogue_ok(mlp.down_proj, h, residual):  # e.g. an FP8 product
        return residual + mlp.down_proj(h)
    return _product_add(mlp.down_proj, h, residual)


def _residual_decoder_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    kwargs.update(zip(self.mukv_arg_names, args))  # arguments given by position, named as the layer's forward names them
    return _decoder_layer(self, hidden_states, False, **kwargs)


def _encoder_layer(self: nn.Module, hidden_states: torch.Tensor, eager: bool, **kwargs: Any) -> torch.Tensor:
    """A pre-norm vision encoder layer (transformers' SigLIP arithmetic) with its residual adds fused."""
    residual = hidden_states
    h, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), **kwargs)
    norm, mlp = self.layer_norm2, self.mlp
    fc2 = mlp.fc2
    if fc2.bias is None or not _epilogue_ok(fc2, h, residual):
        h = residual + h
        return h + mlp(norm(h))
    carry, h = _kernel("add_layer_norm", add_layer_norm, eager)(h, residual, norm.weight, norm.bias, norm.eps,
                                                                 fc2.bias)
    return _product_add(fc2, _gelu_hidden(mlp, h), carry)


def _residual_encoder_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    kwargs.update(zip(self.mukv_arg_names, args))  # transformers passes the attention mask by position
    return _encoder_layer(self, hidden_states, False, **kwargs)


def _is_decoder_layer(layer: nn.Module) -> bool:
    mlp = getattr(layer, "mlp", None)
    return (hasattr(layer, "self_attn") and _is_rms_norm(getattr(layer, "input_layernorm", None))
            and _is_rms_norm(getattr(layer, "post_attention_layernorm", None)) and mlp in _swiglu_mlps_of([layer])
            and isinstance(mlp.down_proj, nn.Linear))


def _is_encoder_layer(layer: nn.Module) -> bool:
    mlp, norms = getattr(layer, "mlp", None), [getattr(layer, n, None) for n in ("layer_norm1", "layer_norm2")]
    return (hasattr(layer, "self_attn") and all(type(n) is nn.LayerNorm and n.weight is not None
                                                and n.bias is not None for n in norms)
            and hasattr(mlp, "fc1") and isinstance(getattr(mlp, "fc2", None), nn.Linear))


def _probe_agrees(layer: nn.Module, fused: Callable[..., torch.Tensor], **kwargs: Any) -> bool:
    """``fused`` (eager) computes what ``layer``'s own forward computes on a probe of three tokens."""
    w = next(layer.parameters())
    tol = 1e-4 if w.dtype == torch.float32 else 5e-2
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        try:
            probe = torch.randn(1, 3, layer.self_attn.q_proj.in_features, generator=g).to(device=w.device, dtype=w.dtype)
            want = type(layer).forward(layer, probe, **kwargs)
            got = fused(layer, probe, True, **kwargs)
        except Exception:  # a layer of other parts or another signature: not one this fusion knows
            return False
    want = want[0] if isinstance(want, tuple) else want
    return (isinstance(want, torch.Tensor) and want.shape == got.shape
            and torch.allclose(got.float(), want.float(), rtol=tol, atol=tol))


def _residual_layers(adapter: Any) -> list[tuple[nn.Module, Callable[..., torch.Tensor]]]:
    """The decoder layers and vision encoder layers whose residual adds :data:`fused_residual` fuses, with
    the forward each gets. One layer of each class is checked on a probe against its own forward."""
    found: list[tuple[nn.Module, Callable[..., torch.Tensor]]] = []
    checked: dict[type, bool] = {}
    for layer in decoder_layers(adapter):
        if _is_decoder_layer(layer):
            if type(layer) not in checked:
                hd = layer.self_attn.head_dim
                w = next(layer.parameters())
                rope = (torch.ones(1, 3, hd, device=w.device, dtype=w.dtype),
                        torch.zeros(1, 3, hd, device=w.device, dtype=w.dtype))
                checked[type(layer)] = _probe_agrees(layer, _decoder_layer, attention_mask=None,
                                                     position_embeddings=rope)
            if checked[type(layer)]:
                found.append((layer, _residual_decoder_forward))
    try:
        tower = vision_tower(adapter)
    except ConfigError:
        return found
    for layer in tower.modules():
        if _is_encoder_layer(layer):
            if type(layer) not in checked:
                checked[type(layer)] = _probe_agrees(layer, _encoder_layer, attention_mask=None)
            if checked[type(layer)]:
                found.append((layer, _residual_encoder_forward))
    return found


def _apply_residual(adapter: Any, layers: list[tuple[nn.Module, Callable[..., torch.Tensor]]]) -> None:
    for layer, forward in layers:
        params = list(inspect.signature(type(layer).forward).parameters.values())[2:]  # after self, hidden_states
        layer.mukv_arg_names = tuple(p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD)
        layer.forward = types.MethodType(forward, layer)


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


def vision_tower(adapter: Any) -> nn.Module:
    """The adapter's vision tower (LLaVA-OneVision ``vision_tower``, Qwen-VL ``visual``)."""
    inner = getattr(adapter.model, "model", adapter.model)
    for name in ("vision_tower", "visual"):
        tower = getattr(inner, name, None)
        if isinstance(tower, nn.Module):
            return tower
    raise ConfigError(f"model {getattr(adapter, 'name', '?')} has no vision tower that acceleration knows")


def decoder_layers(adapter: Any) -> Iterable[nn.Module]:
    return list(adapter.language_model.layers)


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
    for FP8, ``fused_mlp`` or ``graph_prefill`` where the device cannot run them, or for a fusion
    whose modules the model lacks.
    """
    which = acceleration_names(which)
    _check_adapter(adapter, "accelerate")
    if "graph_prefill" in which:
        from .graph_prefill import require_cuda

        require_cuda(adapter)
    if "fused_mlp" in which:
        _require_fused_mlp(adapter)
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
