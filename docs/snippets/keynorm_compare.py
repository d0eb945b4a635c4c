"""key_norm (examples/mukv-keynorm) against the default scorer: what is kept?"""

import torch

import mukv
from mukv.bench import Benchmark

entry = mukv.get_registry().entries["scorers"]["key_norm"]
print(entry.name, "registered by", entry.plugin, "from", entry.package)

frames = Benchmark.generate(seed=0, minutes=1, questions=0).stream.frames(0, 8)
model = mukv.Session(model="tiny-llava-ov").model

kept = {}
for scorer in ("dual", "key_norm"):
    with mukv.Session(model=model, config={"scoring": {"scorer": scorer}}) as session:
        session.feed(frames)
        # [8 frames, K]: kept tokens' indices in each frame's 14 x 14 grid
        kept[scorer] = session.backend.token_index("frame", torch.arange(8))

differ = (kept["dual"] != kept["key_norm"]).any(dim=1)
print(f"tokens kept per frame: {kept['dual'].shape[1]} of {model.tokens_per_frame}")
print(f"frames where key_norm keeps other tokens: {int(differ.sum())} of 8")
