"""key_norm's setting: {"name": "key_norm", "invert": true} keeps the tokens of lowest key norm."""

import torch

import mukv
from mukv.bench import Benchmark

frames = Benchmark.generate(seed=0, minutes=1, questions=0).stream.frames(0, 8)
model = mukv.Session(model="tiny-llava-ov").model

kept = {}
for invert in (False, True):
    config = {"scoring": {"scorer": {"name": "key_norm", "invert": invert}}}
    with mukv.Session(model=model, config=config) as session:
        session.feed(frames)
        kept[invert] = session.backend.token_index("frame", torch.arange(8))
        print(f"invert={invert}: stored as", session.config.scoring.scorer)

shared = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(kept[False], kept[True]))
print(f"tokens kept by both, over 8 frames: {shared} of {kept[False].numel()}")
