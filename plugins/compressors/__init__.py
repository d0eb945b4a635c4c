"""Built-in compressors."""

from __future__ import annotations

import mukv

from .topk import TopKCompressor


@mukv.hookimpl
def mukv_register_compressors(register):
    register("topk", TopKCompressor)
