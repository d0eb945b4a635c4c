"""Built-in model adapters and presets (registered through the ``mukv`` entry point)."""

from __future__ import annotations

from functools import partial

import mukv

from .llava_onevision import REAL_CONFIGS, LlavaOnevisionAdapter, build_llava_onevision
from .mukv_tiny import load_mukv_tiny


@mukv.hookimpl
def mukv_register_models(register):
    register("llava_onevision", LlavaOnevisionAdapter)
    for preset in REAL_CONFIGS:
        register(preset, partial(build_llava_onevision, preset))
    register("mukv-tiny", load_mukv_tiny)
