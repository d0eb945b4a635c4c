"""The "int4" codec: 4-bit KV in groups along the head dimension, two values per byte."""

from __future__ import annotations

import functools

import torch
from pydantic import Field

from mukv.blocks import EncodedKV
from mukv.errors import ConfigError
from mukv.interfaces import CodecSettings, KVCodec

from ._rows import RowLayout, affine, dequantise_, quantise_

LEVELS = 15


class Int4Settings(CodecSettings):
    """Settings of the "int4" codec."""

    group_size: int = Field(default=64, ge=1, le=4096)
    """Channels of one token (keys and values alike) that share a minimum and a step, along the head
    dimension. A head dimension smaller than it is one group; otherwise it must divide the head
    dimension. Smaller groups: smaller error, more bytes (two float16 per group: 0.5 bit per value at 64,
    1 bit at 32)."""


class Int4Codec(KVCodec):
    """4-bit KV: every token's keys and values are cut into groups of ``G`` consecutive channels of a
    head (``G = min(group_size, D)``); a group shares a minimum and a step (float16), asymmetric, codes
    0..15, packed two per byte.

    Row of a block ``(Y, 2, H, K, D)``, ``uint8 [S]``, sections at 16-byte aligned offsets:

    1. ``q``: uint8 ``[Y, 2, H, K, D / 2]``: channel ``2j`` in the low nibble of byte ``j``,
       channel ``2j + 1`` in the high nibble;
    2. ``min``, ``step``: float16 ``[Y, 2, H, K, D / G]`` each.

    A value decodes as ``min + q * step`` (float32, then the model's dtype). Bytes per value:
    ``0.5 + 4 / G`` (0.5625 at ``G = 64``: 28% of bfloat16).

    Error bound: every value is within ``step / 2`` of its decoded value (float32 arithmetic), where
    ``step <= (max - min) / 15 * (1 + 2**-9)`` of its group; groups of one float16 value (zeros
    included) decode exactly; then one rounding to the model's dtype. KV whose minimum or step does not fit
    float16 (a minimum below -65504, a range above 65504 x 15) is refused.

    At the 0.5B layout this is 1.19 GB of KV per stream-hour (1.20 with the index), above issue 20's 1.1 GB:
    the float16 scales alone are 0.5 bit per value. ``kivi4`` stores 1.09 (per-channel scales in MuKV's long
    segment blocks); on mukv-tiny's held-out clips int4 answered 1.0 point below bf16 and kivi4 1.5
    (docs/codecs-results.md).
    """

    Settings = Int4Settings

    def group(self, head_dim: int) -> int:
        """``G`` for a head dimension (raises :class:`ConfigError` if the layout cannot be stored)."""
        g = min(int(self.settings.group_size), head_dim)
        if head_dim % 2 or head_dim % g:
            raise ConfigError(f"kv_codec int4: group_size {self.settings.group_size} does not divide the head "
                              f"dimension {head_dim} (which must also be even); use a divisor of {head_dim}")
        return g

    @functools.lru_cache(maxsize=64)
    def _rows(self, block_shape: tuple[int, ...]) -> RowLayout:
        y, _, h, k, d = block_shape
        n = d // self.group(d)
        return RowLayout([("q", (y, 2, h, k, d // 2), torch.uint8), ("min", (y, 2, h, k, n), torch.float16),
                          ("step", (y, 2, h, k, n), torch.float16)])

    def row_layout(self, block_shape, dtype):
        return (self._rows(tuple(int(s) for s in block_shape)).nbytes,), torch.uint8

    def encode(self, kv: torch.Tensor) -> EncodedKV:
        shape = tuple(kv.shape[1:])
        b, (y, _, h, k, d) = kv.shape[0], shape
        layout = self._rows(shape)
        g = self.group(d)
        rows = layout.allocate(b, kv.device)
        v = layout.views(rows)
        x = (kv.float() if kv.dtype != torch.float32 else kv.clone()).reshape(b, y, 2, h, k, d // g, g)
        m, s = affine(*torch.aminmax(x, dim=-1), LEVELS, "int4")  # [B, Y, 2, H, K, D / G]
        q = quantise_(x, m.unsqueeze(-1), s.unsqueeze(-1), LEVELS).reshape(b, y, 2, h, k, d // 2, 2)
        v["q"].copy_(q[..., 0] | (q[..., 1] << 4))
        v["min"].copy_(m)
        v["step"].copy_(s)
        return EncodedKV(rows, shape, kv.dtype)

    def decode(self, encoded: EncodedKV, device: torch.device | str) -> torch.Tensor:
        rows = encoded.rows.to(device, non_blocking=True)
        b, (y, _, h, k, d) = rows.shape[0], encoded.block_shape
        g = self.group(d)
        v = self._rows(tuple(encoded.block_shape)).views(rows)
        p = v["q"]
        x = torch.empty((b, y, 2, h, k, d), dtype=torch.float32, device=rows.device)
        x[..., 0::2] = p & 15  # the nibbles, straight into the float32 codes
        x[..., 1::2] = p >> 4
        dequantise_(x.view(b, y, 2, h, k, d // g, g), v["min"].unsqueeze(-1), v["step"].unsqueeze(-1))
        return x.to(encoded.dtype)
