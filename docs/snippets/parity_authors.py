"""The MuKV authors' prompt text and frame resizing (parity="authors") beside mukv's default."""

import numpy as np
import torch

import mukv

frames = np.random.default_rng(0).integers(0, 255, (4, 120, 160, 3), dtype=np.uint8)
for parity in ("mukv", "authors"):
    with mukv.Session(model={"name": "tiny-llava-ov", "parity": parity}) as session:
        model = session.model
        print(f"parity={parity}: prompts={model.settings.prompts}, resize={model.settings.resize}")
        print("  system prompt:", repr(model.default_system_prompt))
        print("  answer prompt:", repr(model.answer_template.format(question="what color?")))
        pixels = model.preprocess(torch.from_numpy(frames))  # [n, 3, S, S], normalised
        print(f"  pixels {tuple(pixels.shape)}, mean {pixels.float().mean():.4f}")
        # this preset's word-level tokenizer drops whitespace, so both prompts are 11 tokens here;
        # Qwen2's byte-level tokenizer (the real checkpoints') gives them different lengths
        print("  prefix tokens:", model.prefix().length)
