"""The "fp8" codec: float8 e4m3 KV with a float32 scale per block row (where torch has the dtype)."""

from __future__ import annotations

import functools

import torch

from mukv.blocks import EncodedKV
from mukv.interfaces import KVCodec

from ._rows import RowLayout, exact_div

#: the largest finite float8 e4m3fn value
FP8_MAX = 448.0


class Fp8Codec(KVCodec):
    """float8 e4m3 KV (``torch.float8_e4m3fn``: 4 exponent bits, 3 mantissa bits) with per-block
    scales: each block row (one layer's keys or values of one head, ``K x D`` values) is divided by
    ``scale = max|x| / 448``, so its largest value maps to e4m3's largest.

    Row of a block ``(Y, 2, H, K, D)``, ``uint8 [S]``, sections at 16-byte aligned offsets:

    1. ``q``: float8_e4m3fn ``[Y, 2, H, K, D]`` (one byte each);
    2. ``scale``: float32 ``[Y, 2, H]``.

    A value decodes as ``q * scale`` (float32, then the model's dtype).

    Error bound: ``|x - x'| <= |x| / 16 + scale * 2**-10`` (round to nearest with 3 mantissa bits;
    the second term is half the subnormal spacing, for values far below their row's largest); zero
    rows decode exactly; then one rounding to the model's dtype.
    """

    @functools.lru_cache(maxsize=64)
    def _rows(self, block_shape: tuple[int, ...]) -> RowLayout:
        y, _, h, k, d = block_shape
        return RowLayout([("q", (y, 2, h, k, d), torch.float8_e4m3fn), ("scale", (y, 2, h), torch.float32)])

    def row_layout(self, block_shape, dtype):
        return (self._rows(tuple(int(s) for s in block_shape)).nbytes,), torch.uint8

    def encode(self, kv: torch.Tensor) -> EncodedKV:
        shape = tuple(kv.shape[1:])
        layout = self._rows(shape)
        rows = layout.allocate(kv.shape[0], kv.device)
        v = layout.views(rows)
        x = kv.float() if kv.dtype != torch.float32 else kv.clone()  # our own copy: scaled in place
        scale = exact_div(x.abs().amax(dim=(-2, -1)), FP8_MAX)  # [B, Y, 2, H], the same bytes on every device
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero rows (or a subnormal max)
        v["q"].copy_(x.div_(scale[..., None, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))
        v["scale"].copy_(scale)
        return EncodedKV(rows, shape, kv.dtype)

    def decode(self, encoded: EncodedKV, device: torch.device | str) -> torch.Tensor:
        rows = encoded.rows.to(device, non_blocking=True)
        v = self._rows(tuple(encoded.block_shape)).views(rows)
        return v["q"].float().mul_(v["scale"][..., None, None]).to(encoded.dtype)
