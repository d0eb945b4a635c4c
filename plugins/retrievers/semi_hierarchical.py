"""MuKV's retrieval: parallel per-level search, then a segment-guided rerank."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mukv.blocks import Hits, Query
from mukv.config import MukvConfig
from mukv.interfaces import BlockIndex, Retriever

from .diversity import diverse_order


def rerank(scores: torch.Tensor, vectors: torch.Tensor, context: torch.Tensor, weight: float) -> torch.Tensor:
    """s' = (1 - w) * s + w * cos(v, c).

    Args:
        scores: ``[n]`` first-stage similarity scores.
        vectors: ``[n, V]`` the candidates' vectors.
        context: ``[V]`` context vector.
        weight: w in [0, 1].
    """
    cos = F.cosine_similarity(vectors.float(), context.float()[None], dim=-1)
    return (1.0 - weight) * scores + weight * cos


class SemiHierarchicalRetriever(Retriever):
    """Semi-hierarchical retrieval, as in the paper.

    1. Every level is searched in parallel for ``ceil(over_retrieval * k)``
       candidates by cosine similarity to the query.
    2. The context vector c is the mean of the vectors of the guide level's top
       ``rerank_n`` candidates.
    3. A candidate of another level with ``rerank_weight`` w > 0 is rescored
       ``(1 - w) * s + w * cos(v, c)``; the guide level keeps its order.
    4. The final top-k of each level is taken; with ``diversity``, a candidate whose vector
       is more similar than that to one already taken is passed over (near-duplicate blocks of
       a static scene), from a pool of ``diversity_pool`` x k candidates, and passed-over ones
       fill the top-k only when too few others remain.

    Only vectors are touched here; KV is paged in afterwards for the final
    selection alone.

    Args:
        over_retrieval: candidates per level as a multiple of k.
        rerank_n: N, guide candidates averaged into c.
        guide_level: name of the guide level (``None``: no rerank).
        weights: rerank weight per level name.
        diversity: cosine similarity above which a candidate counts as a near-duplicate of one
            already taken (``None``: no suppression, the paper's retrieval).
        diversity_pool: candidates per level with ``diversity``, as a multiple of k.
    """

    def __init__(self, over_retrieval: float = 2.0, rerank_n: int = 5, guide_level: str | None = "segment",
                 weights: dict[str, float] | None = None, diversity: float | None = None,
                 diversity_pool: float = 8.0):
        self.over_retrieval = over_retrieval
        self.rerank_n = rerank_n
        self.guide_level = guide_level
        self.weights = weights or {}
        self.diversity = diversity
        self.diversity_pool = diversity_pool

    @classmethod
    def from_config(cls, config: MukvConfig) -> "SemiHierarchicalRetriever":
        r = config.retrieval
        return cls(r.over_retrieval, r.rerank_n, r.guide_level, {lv.name: lv.rerank_weight for lv in config.levels},
                   r.diversity, r.diversity_pool)

    def retrieve(self, query: Query, index: BlockIndex, top_k: dict[str, int]) -> list[Hits]:
        candidates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        pool = max(self.over_retrieval, self.diversity_pool) if self.diversity is not None else self.over_retrieval
        for level, k in top_k.items():
            if k > 0:
                candidates[level] = index.search(level, query.vector, math.ceil(k * pool))
        context = None
        guide = self.guide_level
        if guide is not None and index.count(guide) > 0:
            ids, _ = candidates.get(guide) or index.search(guide, query.vector, self.rerank_n)
            top = ids[: self.rerank_n]
            if top.numel():
                context = index.vectors(guide, top).float().mean(dim=0)
        out = []
        for level, (ids, scores) in candidates.items():
            k = top_k[level]
            w = self.weights.get(level, 0.0)
            reranked = context is not None and level != guide and w > 0 and ids.numel()
            diverse = self.diversity is not None and ids.numel() > k
            vectors = index.vectors(level, ids) if reranked or diverse else None  # read once for both
            if reranked:
                scores = rerank(scores, vectors, context, w)
                order = scores.argsort(descending=True)
                ids, scores, vectors = ids[order], scores[order], vectors[order.to(vectors.device)]
            if diverse:
                pos = diverse_order(vectors, k, self.diversity).to(ids.device)
                ids, scores = ids[pos], scores[pos]
            out.append(Hits(level, ids[:k], scores[:k]))
        return out
