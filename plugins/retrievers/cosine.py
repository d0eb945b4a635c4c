"""Flat per-level cosine retrieval (ReKV's retrieval, and the base of MuKV's)."""

from __future__ import annotations


from mukv.blocks import Hits, Query
from mukv.interfaces import BlockIndex, Retriever


class CosineRetriever(Retriever):
    """Top-k blocks per level by cosine similarity between block and query vectors."""

    def retrieve(self, query: Query, index: BlockIndex, top_k: dict[str, int]) -> list[Hits]:
        out = []
        for level, k in top_k.items():
            if k <= 0:
                continue
            ids, scores = index.search(level, query.vector, k)
            out.append(Hits(level, ids, scores))
        return out
