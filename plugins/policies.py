"""Named configurations: MuKV as in the paper, mukv's variants, and the baselines.

Baselines store ReKV-style frame blocks (one uncompressed block per frame) and
differ only in how they choose blocks, so each comparison runs through the
same ingest, storage, assembly and decoding code.
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
    """Settings of the frame-block baselines ("rekv", "uniform", "sliding_window")."""

    top_k: int = Field(default=64, ge=0)
    """Frame blocks retrieved per question."""


class FrameBaseline:
    """A baseline policy over uncompressed frame blocks, with its frames per question as a
    setting: ``policy={"name": "rekv", "top_k": 32}``.

    Args:
        retriever: the retriever that chooses the frames.
        order: the assembly order of the retrieved frames.
    """

    Settings = FrameBaselineSettings

    def __init__(self, retriever: str, order: str = "level_score"):
        self.retriever, self.order = retriever, order

    def __call__(self, top_k: int = 64) -> dict:
        return _frames_only(self.retriever, top_k, self.order)


POLICIES: dict[str, dict | FrameBaseline] = {
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
    "rekv": FrameBaseline("cosine"),
    "uniform": FrameBaseline("uniform", "time"),
    "sliding_window": FrameBaseline("recent", "time"),
    "full_context": _frames_only("all", 1_000_000, "time"),
}


@mukv.hookimpl
def mukv_register_policies(register):
    for name, overrides in POLICIES.items():
        register(name, overrides)
