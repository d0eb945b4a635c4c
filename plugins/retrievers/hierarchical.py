"""Strictly hierarchical retrieval: segments first, then frames and patches inside them.

1. The guide level (segments) is searched over the whole stream for
   ``ceil(over_retrieval * k)`` candidates (at least ``rerank_n``); its final
   hits are the top ``k`` of them.
2. The candidates' frame ranges become the only place the finer levels are
   searched (``BlockIndex.search(..., within=ranges)``): a question over a week
   touches one index search of the segment level plus a few hundred frame and
   patch blocks, whatever the stream's length.
3. Optionally (``weights``), finer candidates are rescored with the segment
   context vector as in the paper's rerank.
4. If the chosen segments hold fewer finer blocks than a level's ``k``, the
   span widens to the next segment candidates (doubling), and as a last resort
   the level is searched over the whole stream for the remainder.
"""

from __future__ import annotations

import math

import torch

from mukv.blocks import Hits, Query
from mukv.config import MukvConfig
from mukv.interfaces import BlockIndex, Retriever

from .semi_hierarchical import rerank


class HierarchicalRetriever(Retriever):
    """Segments first, then the frames and patches inside the chosen segments' spans.

    Args:
        over_retrieval: guide candidates (whose spans are searched) as a multiple of its k.
        rerank_n: N, guide candidates averaged into the context vector; also the
            least number of guide candidates whose spans are searched.
        guide_level: the level searched first (``None``: the level with the most
            frames per block is not known here, so plain per-level search is used).
        weights: rerank weight per level (0: rank by similarity alone).
        max_widen: how many times the span may double when a level is short of blocks.
    """

    def __init__(self, over_retrieval: float = 2.0, rerank_n: int = 5, guide_level: str | None = "segment",
                 weights: dict[str, float] | None = None, max_widen: int = 4):
        self.over_retrieval = over_retrieval
        self.rerank_n = rerank_n
        self.guide_level = guide_level
        self.weights = weights or {}
        self.max_widen = max_widen

    @classmethod
    def from_config(cls, config: MukvConfig) -> "HierarchicalRetriever":
        r = config.retrieval
        return cls(r.over_retrieval, r.rerank_n, r.guide_level, {lv.name: lv.rerank_weight for lv in config.levels})

    def retrieve(self, query: Query, index: BlockIndex, top_k: dict[str, int]) -> list[Hits]:
        guide = self.guide_level
        if guide is None or index.count(guide) == 0:
            out = []
            for level, k in top_k.items():
                if k > 0:
                    ids, scores = index.search(level, query.vector, k)
                    out.append(Hits(level, ids, scores))
            return out
        kg = top_k.get(guide, 0)
        n_cand = max(math.ceil(kg * self.over_retrieval), self.rerank_n, 1)
        g_ids, g_scores = index.search(guide, query.vector, n_cand)
        context = index.vectors(guide, g_ids[: self.rerank_n]).float().mean(dim=0) if g_ids.numel() else None
        meta = index.metadata(guide, g_ids)
        spans = torch.stack([meta.frame_start, meta.frame_end], dim=1).long().cpu()  # [n_cand, 2], best first
        out = []
        for level, k in top_k.items():
            if k <= 0:
                continue
            if level == guide:
                out.append(Hits(level, g_ids[:k], g_scores[:k]))
                continue
            ids, scores = self._within(query, index, level, k, spans, guide, n_cand)
            w = self.weights.get(level, 0.0)
            if context is not None and w > 0 and ids.numel():
                scores = rerank(scores, index.vectors(level, ids), context, w)
                order = scores.argsort(descending=True, stable=True)
                ids, scores = ids[order], scores[order]
            out.append(Hits(level, ids[:k], scores[:k]))
        return out

    def _within(self, query: Query, index: BlockIndex, level: str, k: int, spans: torch.Tensor, guide: str,
                n_cand: int) -> tuple[torch.Tensor, torch.Tensor]:
        want = math.ceil(k * self.over_retrieval)
        ids, scores = index.search(level, query.vector, want, within=spans)
        widen = 0
        while ids.numel() < k and widen < self.max_widen and n_cand < index.count(guide):
            widen += 1
            n_cand *= 2
            g_ids, _ = index.search(guide, query.vector, n_cand)
            meta = index.metadata(guide, g_ids)
            spans = torch.stack([meta.frame_start, meta.frame_end], dim=1).long().cpu()
            ids, scores = index.search(level, query.vector, want, within=spans)
        if ids.numel() < k:  # the chosen segments do not cover enough blocks: fill from the whole level
            more_ids, more_scores = index.search(level, query.vector, k + ids.numel())
            seen = set(ids.tolist())
            keep = [i for i, b in enumerate(more_ids.tolist()) if b not in seen][: k - ids.numel()]
            if keep:
                sel = torch.tensor(keep, dtype=torch.long, device=more_ids.device)
                ids = torch.cat([ids, more_ids[sel].to(ids.device)])
                scores = torch.cat([scores, more_scores[sel].to(scores.device)])
        return ids, scores
