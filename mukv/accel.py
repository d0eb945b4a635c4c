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
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .errors import ConfigError

#: The accelerations :func:`accelerate` knows.
KNOWN = ("compile_vision", "fp8_vision", "compile_llm", "fp8_llm")
E4M3_MAX = 448.0


class FP8Linear(nn.Module):
    """A linear layer whose product runs in FP8 (e4m3) with row-wise scales.

    The weight ``[N, K]`` is quantised once with one float32 scale per output channel; the
    input ``[..., K]`` is quantised per row (token) at each call. The product and the bias are
    computed by ``torch._scaled_mm`` with a bf16 (or the input's) output.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)
        self.register_buffer("weight_fp8", (w / scale).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale.view(1, -1).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xs = (x2.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
        xq = (x2.float() / xs).to(torch.float8_e4m3fn)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        bias = None if self.bias is None else self.bias.to(out_dtype)
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale, bias=bias,
                             out_dtype=out_dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor-core products exist on this device (CUDA, compute capability 8.9 or more)."""
    if device.type != "cuda" or not hasattr(torch, "float8_e4m3fn"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def to_fp8(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module`` whose sizes FP8 products take (multiples of
    16) by an :class:`FP8Linear`; returns how many were replaced."""
    n = 0
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


def accelerate(adapter: Any, which: Iterable[str] | str) -> list[str]:
    """Apply accelerations (names of :data:`KNOWN`, or one name) to ``adapter`` in place.

    Returns what was applied. Raises ConfigError for an unknown name, or FP8 where the device
    has no FP8 products.
    """
    if isinstance(which, str):
        which = [which]
    try:
        which = list(dict.fromkeys(which))
    except TypeError:
        raise ConfigError(f"accelerations: expected names of {', '.join(KNOWN)}, got {type(which).__name__}") from None
    unknown = [w for w in which if w not in KNOWN]
    if unknown:
        raise ConfigError(f"unknown acceleration {unknown[0]!r}; known: {', '.join(KNOWN)}")
    if not hasattr(adapter, "language_model") or not hasattr(adapter, "device"):
        raise ConfigError(f"accelerate: expected a model adapter (session.model), got {type(adapter).__name__}")
    if any(w.startswith("fp8") for w in which) and not fp8_supported(adapter.device):
        raise ConfigError(f"FP8 products need a CUDA GPU of compute capability 8.9 or more; "
                          f"this model runs on {adapter.device}")
    done = []
    if "fp8_vision" in which:
        to_fp8(vision_tower(adapter))
        done.append("fp8_vision")
    if "fp8_llm" in which:
        for layer in decoder_layers(adapter):
            to_fp8(layer)
        done.append("fp8_llm")
    if "compile_vision" in which:
        vision_tower(adapter).compile(dynamic=False)
        done.append("compile_vision")
    if "compile_llm" in which:
        from .attention import keep_attention_eager

        keep_attention_eager()
        for layer in decoder_layers(adapter):
            layer.compile(dynamic=False)
        done.append("compile_llm")
    return done
