"""Built-in KV codecs (registered through the ``mukv`` entry point).

* ``none``: the model's dtype as is (lossless; mukv's format before codecs);
* ``int8``: KIVI-style, keys per channel and values per token, uint8 with float16 scales;
* ``int4``: groups along the head dimension, two values per byte, float16 scales;
* ``kivi4``: 4-bit KIVI-style, per channel over long blocks' tokens, per token in short ones, float16 scales;
* ``fp8``: float8 e4m3 with a float32 scale per block row (only where torch has the dtype).

Each row's byte layout is in its class docstring; :mod:`._rows` holds what they share.
"""

from __future__ import annotations

import torch

import mukv

from .int4 import Int4Codec
from .int8 import Int8Codec
from .kivi4 import Kivi4Codec
from .none import NoneCodec

__all__ = ["NoneCodec", "Int8Codec", "Int4Codec", "Kivi4Codec"]

if hasattr(torch, "float8_e4m3fn"):
    from .fp8 import Fp8Codec

    __all__.append("Fp8Codec")


@mukv.hookimpl
def mukv_register_codecs(register):
    register("none", NoneCodec)
    register("int8", Int8Codec)
    register("int4", Int4Codec)
    register("kivi4", Kivi4Codec)
    if hasattr(torch, "float8_e4m3fn"):
        register("fp8", Fp8Codec)
