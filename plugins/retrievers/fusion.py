"""Cross-level fusion: a block is ranked by its own score and by the finer blocks inside it.

MuKV stores the same moment at several granularities; each level's search ranks
its own blocks on its own. Here every level is searched for a pool of
``over_retrieval x k`` candidates, each candidate gets the reciprocal rank
``1 / (c + rank)`` of its own search, plus, from every other level, the best
reciprocal rank of that level's candidates lying inside its frames (patch rows
inside a frame, frames and rows inside a segment), and each level keeps its top-k
by that sum (reciprocal-rank fusion). A segment that holds several well-ranked
frames or rows rises; one that only its own vector ranks high falls.

Only vectors and metadata are touched (``BlockIndex.search`` and
``BlockIndex.metadata``), so any model and any backend serve it.
"""

from __future__ import annotations

import math

import torch

from mukv.blocks import Hits, Query
from mukv.config import MukvConfig
from mukv.interfaces import BlockIndex, Retriever


class FusionRetriever(Retriever):
    """Reciprocal-rank fusion of each block's own rank with those of the finer blocks inside it.

    Args:
        over_retrieval: candidates per level as a multiple of its top-k (the pool fused).
        c: the fusion constant (60, as usual for reciprocal-rank fusion).
    """

    def __init__(self, over_retrieval: float = 4.0, c: float = 60.0):
        self.over_retrieval = over_retrieval
        self.c = c

    @classmethod
    def from_config(cls, config: MukvConfig) -> "FusionRetriever":
        return cls(config.retrieval.over_retrieval)

    def retrieve(self, query: Query, index: BlockIndex, top_k: dict[str, int]) -> list[Hits]:
        pools = {}
        for level, k in top_k.items():
            if k <= 0 or index.count(level) == 0:
                continue
            ids, _ = index.search(level, query.vector, max(k, math.ceil(k * self.over_retrieval)))
            meta = index.metadata(level, ids)
            rr = 1.0 / (self.c + torch.arange(ids.numel(), dtype=torch.float32))
            pools[level] = (ids, meta.frame_start.long().cpu(), meta.frame_end.long().cpu(), rr)
        out = []
        for level, (ids, fs, fe, rr) in pools.items():
            fused = rr.clone()
            for other, (_, ofs, ofe, orr) in pools.items():
                if other == level:
                    continue
                inside = (ofs[None] >= fs[:, None]) & (ofe[None] <= fe[:, None])  # [n, m]
                fused += (inside.float() * orr[None]).amax(dim=1) if orr.numel() else 0.0
            order = fused.argsort(descending=True, stable=True)[: top_k[level]]
            out.append(Hits(level, ids[order.to(ids.device)], fused[order].to(ids.device)))
        return out
