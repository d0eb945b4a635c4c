"""Hand-written GPU kernels behind some accelerations of :mod:`mukv.accel` (Triton, CUDA only).

Each kernel has a plain torch counterpart that is the reference for its tests; ``triton`` is
imported only when a kernel is used, so CPU installs do not need it.

* :mod:`mukv.kernels.swiglu`: the SwiGLU MLP's gate and up products and ``silu(gate) * up`` as
  one matrix product with the activation in its epilogue (``fused_mlp``).
* :mod:`mukv.kernels.rope`: the rotary embedding of queries and keys in one pass at copy speed
  (``fused_rope``).
"""
