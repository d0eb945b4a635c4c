"""MuKV by hand: four frames through every step of ingest, then one question."""

import torch

import mukv
from mukv.bench import Benchmark
from mukv.blocks import PrefilledBlocks

session = mukv.Session(model="tiny-llava-ov")
model, prefix = session.model, session.prefix
stream = Benchmark.generate(seed=0, minutes=1, questions=0).stream
frames = torch.from_numpy(stream.frames(0, 4))  # uint8 [4, 64, 64, 3]

embeds = model.encode_frames(frames)  # [4, T=196, E]: raster order in each frame
print("visual tokens:", tuple(embeds.shape))

for lp in session.levels:  # patch, frame, segment
    n_frames = lp.level.frames
    window = embeds[:n_frames].reshape(-1, embeds.shape[-1])  # the level's 1st window
    blocks_embeds = window[lp.split]  # [n_blocks, L, E]: the extractor's cut
    # each block on its own, after the system prompt; last-layer attention sums
    kv, attention, positions = model.prefill_blocks(prefix, blocks_embeds)
    n = len(lp.split)
    blocks = PrefilledBlocks(
        level=lp.level, kv=kv, attention=attention, token_index=lp.split,
        frame_start=torch.zeros(n, dtype=torch.long),
        frame_end=torch.full((n,), n_frames), positions=positions.expand(n, -1),
        grid=model.grid,
    )
    scores = lp.scorer.score(blocks)  # alpha * attention + (1 - alpha) * frequency
    kept = lp.compressor.select(blocks, scores)  # top floor(L * r), in time order
    print(f"{lp.level.name:<8} blocks {tuple(blocks_embeds.shape[:2])}"
          f"  KV {tuple(kv.shape)}  scores {tuple(scores.shape)}"
          f"  kept {tuple(kept.shape)}")

# For a whole stream this is one call; then a question retrieves at every level.
session.feed(frames)
answer = session.ask("what color was the circle?", max_new_tokens=2)
print("retrieved:", answer.levels(), "| KV tokens at answer time:", answer.kv_tokens)
session.close()
