"""The "int8" codec: KIVI-style 8-bit KV (keys per channel, values per token)."""

from __future__ import annotations

import functools

import torch

from mukv.blocks import EncodedKV
from mukv.interfaces import KVCodec

from ._rows import RowLayout, affine, dequantise_, quantise_

LEVELS = 255


class Int8Codec(KVCodec):
    """8-bit KV as KIVI quantises it: **keys per channel** (each channel of a head over the block's
    ``K`` tokens shares a minimum and a step: channels with outliers get their own range) and
    **values per token** (each token's ``D`` channels of a head share them), asymmetric, codes 0..255.

    Row of a block ``(Y, 2, H, K, D)``, ``uint8 [S]``, sections at 16-byte aligned offsets:

    1. ``q``: uint8 ``[Y, 2, H, K, D]``, the codes (keys at index 0 of the second axis, values at 1);
    2. ``key_min``, ``key_step``: float16 ``[Y, H, D]`` each;
    3. ``value_min``, ``value_step``: float16 ``[Y, H, K]`` each.

    A value decodes as ``min + q * step`` (float32, then the model's dtype).

    Error bound: every value is within ``step / 2`` of its decoded value (float32 arithmetic),
    where ``step <= (max - min) / 255 * (1 + 2**-9)`` of its channel (keys) or token (values);
    channels and tokens of one float16 value (zeros included) decode exactly; then one rounding
    to the model's dtype. KV whose minimum or step does not fit float16 (a minimum below -65504,
    a range above 65504 x 255) is refused.
    """

    @functools.lru_cache(maxsize=64)
    def _rows(self, block_shape: tuple[int, ...]) -> RowLayout:
        y, _, h, k, d = block_shape
        f16 = torch.float16
        return RowLayout([("q", (y, 2, h, k, d), torch.uint8), ("key_min", (y, h, d), f16),
                          ("key_step", (y, h, d), f16), ("value_min", (y, h, k), f16),
                          ("value_step", (y, h, k), f16)])

    def row_layout(self, block_shape, dtype):
        return (self._rows(tuple(int(s) for s in block_shape)).nbytes,), torch.uint8

    def encode(self, kv: torch.Tensor) -> EncodedKV:
        shape = tuple(kv.shape[1:])
        layout = self._rows(shape)
        rows = layout.allocate(kv.shape[0], kv.device)
        v = layout.views(rows)
        x = kv.float() if kv.dtype != torch.float32 else kv.clone()  # our own copy: quantised in place
        keys, values = x[:, :, 0], x[:, :, 1]  # [B, Y, H, K, D]
        km, ks = affine(*torch.aminmax(keys, dim=-2), LEVELS, "int8 keys")  # [B, Y, H, D]
        vm, vs = affine(*torch.aminmax(values, dim=-1), LEVELS, "int8 values")  # [B, Y, H, K]
        v["q"][:, :, 0] = quantise_(keys, km.unsqueeze(-2), ks.unsqueeze(-2), LEVELS)
        v["q"][:, :, 1] = quantise_(values, vm.unsqueeze(-1), vs.unsqueeze(-1), LEVELS)
        v["key_min"].copy_(km)
        v["key_step"].copy_(ks)
        v["value_min"].copy_(vm)
        v["value_step"].copy_(vs)
        return EncodedKV(rows, shape, kv.dtype)

    def decode(self, encoded: EncodedKV, device: torch.device | str) -> torch.Tensor:
        rows = encoded.rows.to(device, non_blocking=True)
        v = self._rows(tuple(encoded.block_shape)).views(rows)
        x = v["q"].float()  # [n, Y, 2, H, K, D], decoded in place
        dequantise_(x[:, :, 0], v["key_min"].unsqueeze(-2), v["key_step"].unsqueeze(-2))
        dequantise_(x[:, :, 1], v["value_min"].unsqueeze(-1), v["value_step"].unsqueeze(-1))
        return x.to(encoded.dtype)
