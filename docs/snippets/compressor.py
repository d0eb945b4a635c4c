"""A compressor: which tokens of a block to keep, given their scores."""

import torch

import mukv
from mukv.blocks import PrefilledBlocks
from mukv.interfaces import Compressor


class BalancedCompressor(Compressor):
    """Top-K by score, spread over the frames of a multi-frame block (a segment):
    each frame offers its best ceil(K / frames) tokens, and the best K of those
    are kept, so no frame of a segment is dropped entirely."""

    def select(self, blocks: PrefilledBlocks, scores: torch.Tensor) -> torch.Tensor:
        k = self.kept_count(blocks.level, blocks.block_len)  # floor(L * keep_ratio)
        frames = blocks.level.frames
        if frames == 1 or blocks.block_len % frames:  # one frame: plain top-K
            return scores.topk(k, dim=1).indices.sort(dim=1).values
        b, per_frame = scores.shape[0], blocks.block_len // frames
        per = -(-k // frames)  # ceil(K / frames) candidates per frame
        top = scores.view(b, frames, per_frame).topk(per, dim=2)  # [B, F, per]
        offsets = torch.arange(frames, device=scores.device)[:, None] * per_frame
        candidates = (top.indices + offsets).reshape(b, -1)  # indices in the block
        best = top.values.reshape(b, -1).topk(k, dim=1).indices  # the best K of them
        return candidates.gather(1, best).sort(dim=1).values  # [B, K], time order


@mukv.hookimpl
def mukv_register_compressors(register):
    register("balanced", BalancedCompressor)


if __name__ == "__main__":
    import sys

    mukv.register_plugin(sys.modules[__name__], name="balanced")
    frames = torch.randint(0, 255, (8, 64, 64, 3), dtype=torch.uint8)
    model = mukv.Session(model="tiny-llava-ov").model
    segment = {"name": "segment", "extractor": "segment", "frames": 4,
               "keep_ratio": 0.1, "top_k": 2}
    for name in ("topk", "balanced"):
        config = {"compression": {"compressor": name}, "levels": [segment]}
        with mukv.Session(model=model, config=config) as session:
            session.feed(frames)
            # kept tokens of segment 0: 78 indices into its 4 x 196 tokens
            kept = session.backend.token_index("segment", torch.tensor([0]))[0]
            per_frame = torch.bincount(kept // 196, minlength=4).tolist()
            print(f"{name:<9} tokens kept from each frame of segment 0: {per_frame}")
    mukv.unregister_plugin(sys.modules[__name__])
