"""Cross-level fusion (retriever ``fusion``, policy ``mukv_fusion``)."""

from __future__ import annotations

import torch

import mukv
from mukv.interfaces import BlockMeta
from mukv.plugins.retrievers.fusion import FusionRetriever


class _Index:
    """Blocks of two levels with given search orders and frame ranges."""

    def __init__(self):
        # segments 0..2 cover frames [0,4), [4,8), [8,12); frames 0..11 one each
        self.ranges = {"segment": [(4 * i, 4 * i + 4) for i in range(3)], "frame": [(i, i + 1) for i in range(12)]}
        self.order = {"segment": [0, 1, 2], "frame": [5, 6, 1, 9, 0, 2, 3, 4, 7, 8, 10, 11]}

    def count(self, level):
        return len(self.ranges[level])

    def search(self, level, query, k, within=None):
        ids = torch.tensor(self.order[level][:k])
        return ids, torch.linspace(1, 0, ids.numel())

    def metadata(self, level, ids):
        r = torch.tensor([self.ranges[level][i] for i in ids.tolist()])
        return BlockMeta(r[:, 0], r[:, 1], r[:, 0].double(), r[:, 1].double())


def test_a_segment_holding_the_best_frames_rises():
    q = mukv.blocks.Query("q", torch.zeros(4), 0.0, 12)
    hits = {h.level: h for h in FusionRetriever(over_retrieval=3.0).retrieve(q, _Index(), {"segment": 1, "frame": 2})}
    assert hits["segment"].ids.tolist() == [1]  # second by its own score, but frames 5 and 6 (the best) lie in it
    assert hits["frame"].ids.tolist() == [5, 6]  # frames gain nothing from the coarser level
    assert hits["segment"].scores[0] > 1 / 60


def test_fusion_policy_runs_end_to_end(tiny_model, frames):
    with mukv.Session(model=tiny_model, policy="mukv_fusion") as s:
        s.feed(frames(12))
        ans = s.ask("what color?", max_new_tokens=2)
        assert ans.levels() == {"patch": 20, "frame": 12, "segment": 3}
