"""Named configurations: MuKV as in the paper, mukv's variants, and the baselines.

``rekv`` is ReKV as its public code runs it (sliding-window encoding, per-layer
retrieval). The other baselines store frame blocks, each prefilled on its own,
and differ only in how they choose blocks (``frame_topk``: one cosine over the
last layer, called ``rekv`` before mukv 0.2), so each comparison runs through
the same ingest, storage, assembly and decoding code. A stored stream keeps the
configuration it was written with, whatever its policy is called since.
"""

from __future__ import annotations

from pydantic import Field

import mukv
from mukv.specs import PluginSettings


def _frames_only(retriever: str, top_k: int, order: str = "level_score") -> dict:
    return {
        "levels": [{"name": "frame", "extractor": "frame", "frames": 1, "keep_ratio": 1.0, "alpha": 0.5,
                    "top_k": top_k}],
        "retrieval": {"retriever": retriever, "guide_level": None},
        "assembly": {"order": order},
    }


class FrameBaselineSettings(PluginSettings):
    """Settings of the frame-block baselines ("rekv", "frame_topk", "uniform", "sliding_window")."""

    top_k: int = Field(default=64, ge=0)
    """Frame blocks retrieved per question."""


class FrameBaseline:
    """A baseline policy over uncompressed frame blocks, with its frames per question as a
    setting: ``policy={"name": "frame_topk", "top_k": 32}``.

    Args:
        retriever: the retriever that chooses the frames.
        order: the assembly order of the retrieved frames.
    """

    Settings = FrameBaselineSettings

    def __init__(self, retriever: str, order: str = "level_score"):
        self.retriever, self.order = retriever, order

    def __call__(self, top_k: int = 64) -> dict:
        return _frames_only(self.retriever, top_k, self.order)


class ReKVBaseline:
    """ReKV as its public code runs it, with the blocks each layer reads as a setting:
    ``policy={"name": "rekv", "top_k": 32}``."""

    Settings = FrameBaselineSettings

    def __call__(self, top_k: int = 64) -> dict:
        return {
            "levels": [{"name": "frame", "extractor": "frame", "frames": 1, "keep_ratio": 1.0, "alpha": 0.5,
                        "top_k": top_k, "local_window": 76, "layer_keys": True}],
            "retrieval": {"retriever": "layerwise", "guide_level": None, "chunk_blocks": 1, "recent_blocks": 0,
                          "layer_probe": "memory"},
            "assembly": {"order": "time", "rerotate": True},
        }


POLICIES: dict[str, dict | FrameBaseline | ReKVBaseline] = {
    "mukv": {},
    "mukv_spatial": {"levels": [
        {"name": "patch", "extractor": "patch_spatial", "frames": 1, "tokens": 49, "keep_ratio": 0.1, "alpha": 0.5,
         "top_k": 20, "rerank_weight": 0.3},
        {"name": "frame", "extractor": "frame", "frames": 1, "keep_ratio": 0.1, "alpha": 0.7, "top_k": 32,
         "rerank_weight": 0.3},
        {"name": "segment", "extractor": "segment", "frames": 4, "keep_ratio": 0.8, "alpha": 0.8, "top_k": 12},
    ]},
    "mukv_time": {"assembly": {"order": "time"}},
    "mukv_timeline": {"assembly": {"order": "time", "rerotate": True}},
    # segments first over the whole stream, then frames and patches only inside the chosen segments
    "mukv_hierarchical": {"retrieval": {"retriever": "hierarchical"}},
    # each level's pool of 4 x top-k fused with the ranks of the finer blocks inside each block
    "mukv_fusion": {"retrieval": {"retriever": "fusion", "over_retrieval": 4.0}},
    # MuKV's retrieval with near-duplicate blocks passed over (a long static scene fills no top-k)
    "mukv_diverse": {"retrieval": {"diversity": 0.99}},
    # ReKV as its public code runs: frames encoded with sliding-window attention (n_local = 15,000 tokens,
    # about 76 frames of 196 tokens), one-frame blocks, each layer its own 64 blocks by its own question-key
    # inner product, in time order, keys re-rotated for the positions they take
    "rekv": ReKVBaseline(),
    # frames prefilled alone, 64 by one cosine over the last layer (mukv's "rekv" before issue 19)
    "frame_topk": FrameBaseline("cosine"),
    "uniform": FrameBaseline("uniform", "time"),
    "sliding_window": FrameBaseline("recent", "time"),
    "full_context": _frames_only("all", 1_000_000, "time"),
}


@mukv.hookimpl
def mukv_register_policies(register):
    for name, overrides in POLICIES.items():
        register(name, overrides)
