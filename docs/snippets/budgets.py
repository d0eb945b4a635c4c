"""Memory per frame and KV tokens per answer of a configuration, computed up front."""

import torch

import mukv
from mukv.blocks import KVLayout
from mukv.interfaces import Compressor

T = 196  # visual tokens per frame (LLaVA-OneVision video mode, 14 x 14)
# KV shape of LLaVA-OneVision-0.5B: 24 layers, 2 KV heads of 64, bf16
LAYOUT = KVLayout(num_layers=24, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)


def budget(config: mukv.MukvConfig) -> dict:
    """Stored tokens and KiB per frame; KV tokens at answer time (prompt aside)."""
    per_frame = answer = 0
    for level in config.levels:
        block_len = level.tokens or level.frames * T
        blocks_per_window = (level.frames * T) // block_len
        kept = Compressor.kept_count(level, block_len)  # floor(L * keep_ratio)
        per_frame += blocks_per_window * kept / level.frames
        answer += level.top_k * kept
    kib = per_frame * LAYOUT.token_bytes() / 1024
    return {"tokens": per_frame, "kib": kib, "answer": answer}


PATCH = {"name": "patch", "extractor": "patch_raster", "tokens": 49, "alpha": 0.5}
FRAME = {"name": "frame", "extractor": "frame", "alpha": 0.7}
SEGMENT = {"name": "segment", "extractor": "segment", "frames": 4, "alpha": 0.8}
small = mukv.MukvConfig.from_policy("mukv").replace(levels=[
    {**PATCH, "keep_ratio": 0.1, "top_k": 10},
    {**FRAME, "keep_ratio": 0.05, "top_k": 16},
    {**SEGMENT, "keep_ratio": 0.4, "top_k": 8},
])
configs = {
    "mukv": mukv.MukvConfig.from_policy("mukv"),
    "rekv": mukv.MukvConfig.from_policy("rekv"),
    "small": small,
}
for name, config in configs.items():
    b = budget(config)
    week_gib = b["kib"] * 302_400 / 2**20  # a week at 0.5 fps
    print(f"{name:<6} {b['tokens']:6.1f} tokens/frame {b['kib']:7.1f} KiB/frame "
          f"{week_gib:5.0f} GiB/week {b['answer']:7,} KV tokens per answer")

# The same numbers, measured (the tiny model has 196 tokens per frame too).
with mukv.Session(model="tiny-llava-ov", config=small) as session:
    session.feed(torch.randint(0, 255, (64, 64, 64, 3), dtype=torch.uint8))
    stored = sum(v["tokens"] for v in session.stats()["levels"].values()) / 64
    answer = session.ask("what happened?", max_new_tokens=1)
    context = answer.kv_tokens - session.prefix.length
    print(f"measured: {stored:.1f} tokens/frame, {context:,} KV tokens per answer")
