"""Hand-written GPU kernels behind some accelerations of :mod:`mukv.accel` (Triton, CUDA only).

Each kernel has a plain torch counterpart that is the reference for its tests; ``triton`` is
imported only when a kernel is used, so CPU installs do not need it.

* :mod:`mukv.kernels.swiglu`: the SwiGLU MLP's gate and up products and ``silu(gate) * up`` as
  one matrix product with the activation in its epilogue (``fused_mlp``).
* :mod:`mukv.kernels.rope`: the rotary embedding of queries and keys in one pass at copy speed
  (``fused_rope``).
* :mod:`mukv.kernels.layer_norm`: a layer norm, with the residual add before it, reading each row
  once (``fused_layer_norm``).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable

from ..errors import ConfigError

_BUILT: dict[str, Any] = {}


def available() -> str | None:
    """Why the Triton kernels cannot run here (no triton), or ``None``."""
    if importlib.util.find_spec("triton") is None:  # found, not imported: importing decides the interpreter mode
        return "Triton kernels need the triton package (installed with torch's CUDA builds)"
    return None


def interpreting() -> bool:
    """Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET`` set when triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def built(name: str, make: Callable[[Any, Any], Any]) -> Any:
    """The kernel ``name``, made on first use by ``make(triton, triton.language)`` and kept;
    :class:`~mukv.errors.ConfigError` where triton is missing (:func:`available`)."""
    if name not in _BUILT:
        why = available()
        if why:
            raise ConfigError(why)
        import triton
        import triton.language as tl

        _BUILT[name] = make(triton, tl)
    return _BUILT[name]
