"""Named configurations: MuKV as in the paper, mukv's variants, and the baselines.

Baselines store ReKV-style frame blocks (one uncompressed block per frame) and
differ only in how they choose blocks, so each comparison runs through the
same ingest, storage, assembly and decoding code.
"""

from __future__ import annotations

import mukv


def _frames_only(retriever: str, top_k: int, order: str = "level_score") -> dict:
    return {
        "levels": [{"name": "frame", "extractor": "frame", "frames": 1, "keep_ratio": 1.0, "alpha": 0.5,
                    "top_k": top_k}],
        "retrieval": {"retriever": retriever, "guide_level": None},
        "assembly": {"order": order},
    }


POLICIES: dict[str, dict] = {
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
    # one cosine over the last layer's mean keys of frames prefilled alone (called "rekv" before issue 19)
    "frame_topk": _frames_only("cosine", 64),
    "rekv": _frames_only("cosine", 64),
    "uniform": _frames_only("uniform", 64, "time"),
    "sliding_window": _frames_only("recent", 64, "time"),
    "full_context": _frames_only("all", 1_000_000, "time"),
}


@mukv.hookimpl
def mukv_register_policies(register):
    for name, overrides in POLICIES.items():
        register(name, overrides)
