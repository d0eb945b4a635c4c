"""The "none" codec: KV stored in the model's dtype, as it is (mukv's format before codecs)."""

from __future__ import annotations

import torch

from mukv.blocks import EncodedKV
from mukv.interfaces import KVCodec


class NoneCodec(KVCodec):
    """KV stored as it is: a row is the block itself, ``[Y, 2, H, K, D]`` of the model's dtype
    (bfloat16, float16 or float32), bit for bit. Lossless. Disk arrays written with it are the
    arrays of stores written before codecs existed (bfloat16 kept as its uint16 bit pattern)."""

    def encode(self, kv: torch.Tensor) -> EncodedKV:
        return EncodedKV(kv.contiguous(), tuple(kv.shape[1:]), kv.dtype)

    def decode(self, encoded: EncodedKV, device: torch.device | str) -> torch.Tensor:
        return encoded.rows.to(device=device, dtype=encoded.dtype)

    def row_layout(self, block_shape, dtype):
        return tuple(int(s) for s in block_shape), dtype
