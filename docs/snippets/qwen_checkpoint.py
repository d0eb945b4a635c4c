"""Answer questions about a stream with a local Qwen2.5-VL or Qwen3-VL checkpoint."""

import os
import tempfile

import numpy as np

import mukv
from mukv.plugins.models.qwen2_5_vl import Qwen2_5_VLAdapter
from mukv.session import default_device

# A downloaded checkpoint directory: config.json, *.safetensors, tokenizer files and
# preprocessor_config.json (e.g. huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct).
checkpoint = os.environ.get("QWEN_CHECKPOINT")
if checkpoint is None:  # no weights here: save a tiny random Qwen2.5-VL as a stand-in
    from mukv.plugins.models.qwen2_5_vl import build_qwen2_5_vl

    checkpoint = tempfile.mkdtemp()
    tiny = build_qwen2_5_vl("tiny-qwen2.5-vl")
    tiny.model.save_pretrained(checkpoint)
    tiny.tokenizer.save_pretrained(checkpoint)

frames = np.random.default_rng(0).integers(0, 255, (8, 360, 640, 3), dtype=np.uint8)  # any size: resized

# 1. By path: config.json's model_type ("qwen2_5_vl" or "qwen3_vl") picks the adapter
#    (bf16 on a GPU). Re-rotating retrieved blocks onto one M-RoPE timeline is a
#    per-session choice; without it, blocks keep their prefill positions (the paper's way).
config = {"assembly": {"order": "time", "rerotate": True}}
with mukv.Session(model=checkpoint, config=config) as s:
    s.feed(frames)  # 0.5 fps unless timestamps are given
    print(s.ask("what color was the car?").text)

# 2. The adapter itself, to set its options. Qwen2.5-VL's temporal positions encode
#    time: tell it the time between frames (here a 1 fps stream).
model = Qwen2_5_VLAdapter.from_pretrained(checkpoint, device=default_device(), seconds_per_frame=1.0)
with mukv.Session(model=model, config={**config, "stream": {"fps": 1.0}}) as s:
    s.feed(frames)
    answer = s.ask("what color was the car?")
    print(answer.text, answer.levels(), answer.kv_tokens)
