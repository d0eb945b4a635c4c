"""The fused forwards behind :mod:`mukv.accel`'s ``fused_*`` accelerations: the elementwise functions
they compile, the forwards they give a model's modules, and how each finds the modules it may change.

Each ``_apply_*`` replaces a module's ``forward`` on the instance (the class stays transformers'); each
finder returns only modules whose arithmetic the fused forward reproduces: RMSNorms and whole layers
are checked on a probe input against their own forward first. :func:`mukv.accel.accelerate` finds every
fusion's modules before it changes any.
"""

from __future__ import annotations

import inspect
import logging
import types
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .kernels import layer_norm as ln_kernel  # light: triton is imported when a kernel is first built
from .kernels import rope as rope_kernel
from .kernels import swiglu as swiglu_kernel

log = logging.getLogger(__name__)


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


_COMPILED: dict[tuple[str, bool], Callable[..., Any]] = {}

#: Compile the elementwise functions with each tensor's last dimension (the hidden width, the head
#: dimension) fixed and only the others (batch, tokens) dynamic, instead of every dimension dynamic:
#: the kernels then index without run-time divisions. Still one kernel for every token count, and
#: one more per width. Measured on an H100 at the 0.5B architecture (2026-12-07, two runs): the
#: compiled SwiGLU took 71 instead of 87 ms of a 512-frame prefill, and the fastest set ingested
#: 1-3% more frames/s without the vision tower, about 1% more with it. ``False`` compiles every
#: dimension dynamic, as before (``benchmarks/accel_bench.py`` modes with ``+dynamic_dims``).
STATIC_LAST_DIM = True


def _compiled(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled once per process (dynamic shapes: one kernel for every token count; see
    :data:`STATIC_LAST_DIM` for which dimensions).

    A call the compiler cannot serve runs ``fn`` eagerly, with one warning per function: dynamo
    compiles again for each new grad mode, dtype or float argument (an ``eps``) and refuses past its
    recompile limit (8 per function), which models of several configurations in one process, or calls
    outside inference mode, reach. With :data:`STATIC_LAST_DIM` each set of widths gets its own copy
    of ``fn`` (its own code object, so its own recompile limit): a process holding models of several
    widths does not spend one function's limit on them. The arithmetic is the same either way."""
    key = (name, STATIC_LAST_DIM)
    if key not in _COMPILED:
        _COMPILED[key] = (_ByWidth if STATIC_LAST_DIM else _EagerFallback)(name, fn)
    return _COMPILED[key]


def _code_copy(fn: Callable[..., Any], suffix: str) -> Callable[..., Any]:
    """A copy of the plain function ``fn`` with its own code object (dynamo keeps compilations, and counts
    recompilations, per code object)."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{suffix}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _compiler_refusals() -> tuple[type[BaseException], ...]:
    """The exceptions with which torch.compile refuses a call (dynamo's, by the names this torch has)."""
    from torch._dynamo import exc as dynamo_exc

    return tuple(getattr(dynamo_exc, n) for n in ("TorchDynamoException", "FailOnRecompileLimitHit")
                 if hasattr(dynamo_exc, n))


class _EagerFallback:
    """``fn`` compiled with every dimension dynamic (or every one but the last: ``static_last``); its
    eager original runs for the calls the compiler refuses."""

    def __init__(self, name: str, eager: Callable[..., Any], compiled: Callable[..., Any] | None = None,
                 static_last: bool = False):
        self.name, self.eager, self.refused = name, eager, 0
        self.compiled = compiled or torch.compile(eager, dynamic=True, fullgraph=True)
        self.static_last = static_last

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # inside a compiled region (compile_llm): traced into its graph
            return self.eager(*args, **kwargs)
        if self.static_last:  # the last dimension a constant of the kernel, the others dynamic
            from torch._dynamo import mark_static

            for a in args:
                if isinstance(a, torch.Tensor) and a.dim():
                    mark_static(a, a.dim() - 1)
        try:
            return self.compiled(*args, **kwargs)
        except _compiler_refusals() as exc:
            self.refused += 1
            if self.refused == 1:
                log.warning("mukv's compiled %s runs eagerly for calls torch.compile refuses (%s: %s)", self.name,
                            type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            return self.eager(*args, **kwargs)


class _ByWidth:
    """``fn`` compiled with each tensor argument's last dimension fixed and the others dynamic: one
    compiled copy of ``fn`` per set of widths (:func:`_code_copy`), each an :class:`_EagerFallback`."""

    def __init__(self, name: str, eager: Callable[..., Any]):
        self.name, self.eager, self.copies = name, eager, {}

    @property
    def refused(self) -> int:
        """Calls run eagerly because the compiler refused them, over every width."""
        return sum(c.refused for c in self.copies.values())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # inside a compiled region (compile_llm): traced into its graph
            return self.eager(*args, **kwargs)
        widths = tuple(a.shape[-1] if a.dim() else 0 for a in args if isinstance(a, torch.Tensor))
        copy = self.copies.get(widths)
        if copy is None:
            fn = _code_copy(self.eager, "_".join(map(str, widths)))
            copy = self.copies[widths] = _EagerFallback(
                self.name, self.eager, torch.compile(fn, dynamic=True, fullgraph=True), static_last=True)
        return copy(*args, **kwargs)


def _fused_swiglu_hidden(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _compiled("swiglu", swiglu)(self.gate_proj(x), self.up_proj(x))


def _mlp_hidden(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of an MLP's last product (a SwiGLU MLP's ``down_proj``, a GELU MLP's ``fc2``): mukv's
    fused activation where one was applied, else the MLP's own."""
    fused = getattr(mlp, "mukv_hidden", None)
    if fused is not None:
        return fused(x)
    if hasattr(mlp, "gate_proj"):
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    return mlp.activation_fn(mlp.fc1(x))


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


def kernel_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` as ``fused_rope`` runs it: the Triton kernel
    (:func:`mukv.kernels.rope.rope`) for the tensors it takes, ``fused_llm``'s compiled function for
    others (a CPU probe, another dtype of ``cos``)."""
    if unsqueeze_dim == 1 and rope_kernel.why_not(q, k, cos, sin) is None:
        return rope_kernel._launch(q, k, cos, sin)
    return _compiled("rope", rotate_pair)(q, k, cos, sin, unsqueeze_dim)


def _qwen2_language_models(adapter: Any) -> list[nn.Module]:
    """The adapter's language model where it is transformers' Qwen2 (whose rotary function
    ``fused_llm`` and ``fused_rope`` replace), else nothing."""
    from transformers.models.qwen2 import modeling_qwen2

    lm = adapter.language_model
    return [lm] if type(lm).__module__ == modeling_qwen2.__name__ else []


def _apply_rope(adapter: Any, models: list[nn.Module]) -> None:
    from transformers.models.qwen2 import modeling_qwen2

    if models:
        modeling_qwen2.apply_rotary_pos_emb = kernel_rope


def _fused_mlp_hidden(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    joint = self.mukv_gate_up
    if x.dtype != joint.dtype or x.device != joint.device:  # e.g. a float32 probe: the composed path
        return swiglu(self.gate_proj(x), self.up_proj(x))
    h = swiglu_kernel.swiglu_matmul(x.reshape(-1, x.shape[-1]), joint)
    return h.reshape(*x.shape[:-1], h.shape[-1])


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


def kernel_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float, carry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_layer_norm` as ``fused_layer_norm`` runs it: the one-pass Triton kernel
    (:mod:`mukv.kernels.layer_norm`) for the tensors it takes, the compiled function for others."""
    if ln_kernel.why_not(x, weight, bias, residual, carry) is None:
        return ln_kernel._launch(x, weight, bias, float(eps), residual, carry)
    return _compiled("add_layer_norm", add_layer_norm)(x, residual, weight, bias, eps, carry)


def _kernel_layer_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An ``nn.LayerNorm``'s forward through the one-pass kernel where it takes ``x`` (else the eager one)."""
    if ln_kernel.why_not(x, self.weight, self.bias) is None:
        return ln_kernel._launch(x, self.weight, self.bias, float(self.eps))[1]
    return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def _vision_layer_norms(adapter: Any) -> list[nn.Module]:
    """The vision tower's ``nn.LayerNorm`` modules over one dimension, with weight and bias."""
    try:
        tower = vision_tower(adapter)
    except ConfigError:
        return []
    return [m for m in tower.modules() if type(m) is nn.LayerNorm and len(m.normalized_shape) == 1
            and m.weight is not None and m.bias is not None]


def _apply_layer_norms(adapter: Any, norms: list[nn.Module]) -> None:
    for norm in norms:
        norm.forward = types.MethodType(_kernel_layer_norm_forward, norm)


def runs_layer_norm_kernel(norm: nn.Module) -> bool:
    """``norm``'s forward is ``fused_layer_norm``'s (then ``fused_residual``'s encoder layer also runs its
    add and norm through the kernel)."""
    return getattr(vars(norm).get("forward"), "__func__", None) is _kernel_layer_norm_forward


def _product_add(linear: nn.Linear, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + h @ linear.weight.T`` ``[..., N]``, the add in the product's epilogue (``residual``
    carries the product's bias, where it has one). ``residual`` is a tensor this layer made, and the
    product accumulates into it in place: an out-of-place ``addmm`` would first copy it to its output,
    the very pass over the residual stream this saves."""
    out = residual.reshape(-1, residual.shape[-1])
    out.addmm_(h.reshape(-1, h.shape[-1]), linear.weight.t())
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
    h = _mlp_hidden(mlp, h)
    if not _epilogue_ok(mlp.down_proj, h, residual):  # e.g. an FP8 product
        return residual + mlp.down_proj(h)
    return _product_add(mlp.down_proj, h, residual)


def _encoder_layer(self: nn.Module, hidden_states: torch.Tensor, eager: bool, **kwargs: Any) -> torch.Tensor:
    """A pre-norm vision encoder layer (transformers' SigLIP arithmetic) with its residual adds fused."""
    residual = hidden_states
    h, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), **kwargs)
    norm, mlp = self.layer_norm2, self.mlp
    fc2 = mlp.fc2
    if fc2.bias is None or not _epilogue_ok(fc2, h, residual):
        h = residual + h
        return h + mlp(norm(h))
    add_norm = (kernel_add_layer_norm if not eager and runs_layer_norm_kernel(norm)
                else _kernel("add_layer_norm", add_layer_norm, eager))
    carry, h = add_norm(h, residual, norm.weight, norm.bias, norm.eps, fc2.bias)
    return _product_add(fc2, _mlp_hidden(mlp, h), carry)


def _residual_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The forward :func:`_apply_residual` gives a layer: its fused arithmetic (``mukv_fused_layer``:
    :func:`_decoder_layer` or :func:`_encoder_layer`), with arguments given by position (transformers
    passes SigLIP's attention mask so) named as the layer's own forward names them."""
    kwargs.update(zip(self.mukv_arg_names, args))
    return self.mukv_fused_layer(self, hidden_states, False, **kwargs)


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


def _decoder_probe(layer: nn.Module) -> dict[str, Any] | None:
    """The keyword arguments of a decoder layer's probe (identity rotary embedding), None where its attention
    has no head dimension to build them from."""
    hd, w = getattr(layer.self_attn, "head_dim", None), next(layer.parameters())
    if not isinstance(hd, int):
        return None
    rope = (torch.ones(1, 3, hd, device=w.device, dtype=w.dtype), torch.zeros(1, 3, hd, device=w.device, dtype=w.dtype))
    return {"attention_mask": None, "position_embeddings": rope}


def _residual_layers(adapter: Any) -> list[tuple[nn.Module, Callable[..., torch.Tensor]]]:
    """The decoder layers and vision encoder layers whose residual adds :data:`fused_residual` fuses, with
    the fused arithmetic each gets. One layer of each class is checked on a probe against its own forward."""
    try:
        vision = list(vision_tower(adapter).modules())
    except ConfigError:
        vision = []
    kinds = ((decoder_layers(adapter), _is_decoder_layer, _decoder_layer, _decoder_probe),
             (vision, _is_encoder_layer, _encoder_layer, lambda layer: {"attention_mask": None}))
    found: list[tuple[nn.Module, Callable[..., torch.Tensor]]] = []
    checked: dict[type, bool] = {}
    for layers, is_kind, fused, probe_kwargs in kinds:
        for layer in layers:
            if not is_kind(layer):
                continue
            if type(layer) not in checked:
                kwargs = probe_kwargs(layer)
                checked[type(layer)] = kwargs is not None and _probe_agrees(layer, fused, **kwargs)
            if checked[type(layer)]:
                found.append((layer, fused))
    return found


def _apply_residual(adapter: Any, layers: list[tuple[nn.Module, Callable[..., torch.Tensor]]]) -> None:
    for layer, fused in layers:
        params = list(inspect.signature(type(layer).forward).parameters.values())[2:]  # after self, hidden_states
        layer.mukv_arg_names = tuple(p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD)
        layer.mukv_fused_layer = fused
        layer.forward = types.MethodType(_residual_forward, layer)


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

