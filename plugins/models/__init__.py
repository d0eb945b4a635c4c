"""Built-in model adapters and presets (registered through the ``mukv`` entry point)."""

from __future__ import annotations

from functools import partial

import mukv

from .llava_onevision import REAL_CONFIGS, LlavaOnevisionAdapter, LlavaOnevisionSettings, build_llava_onevision
from .mukv_tiny import load_mukv_tiny
from .qwen2_5_vl import REAL_CONFIGS as QWEN2_5_VL_CONFIGS
from .qwen2_5_vl import Qwen2_5_VLAdapter, build_qwen2_5_vl
from .qwen3_vl import REAL_CONFIGS as QWEN3_VL_CONFIGS
from .qwen3_vl import Qwen3VLAdapter, build_qwen3_vl


@mukv.hookimpl
def mukv_register_models(register):
    register("llava_onevision", LlavaOnevisionAdapter)
    for preset in REAL_CONFIGS:
        factory = partial(build_llava_onevision, preset)
        factory.Settings = LlavaOnevisionSettings  # {"name": preset, "parity": "authors"}
        register(preset, factory)
    register("mukv-tiny", load_mukv_tiny)
    register("qwen2_5_vl", Qwen2_5_VLAdapter)
    for preset in QWEN2_5_VL_CONFIGS:
        register(preset, partial(build_qwen2_5_vl, preset))
    register("qwen3_vl", Qwen3VLAdapter)
    for preset in QWEN3_VL_CONFIGS:
        register(preset, partial(build_qwen3_vl, preset))
