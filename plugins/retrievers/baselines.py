"""Query-independent baselines, so every comparison runs through one code path.

* ``uniform``: k blocks evenly spaced over the stream (uniform frame sampling);
* ``recent``: the k most recent blocks (a sliding window);
* ``all``: every stored block (full context, while it fits).

Scores are 1.0 for every chosen block (these retrievers do not rank).
"""

from __future__ import annotations

import torch

from mukv.blocks import Hits, Query
from mukv.interfaces import BlockIndex, Retriever


def _hits(level: str, ids: torch.Tensor) -> Hits:
    return Hits(level, ids.long(), torch.ones(ids.numel()))


class UniformRetriever(Retriever):
    """k blocks evenly spaced over everything stored at each level."""

    def retrieve(self, query: Query, index: BlockIndex, top_k: dict[str, int]) -> list[Hits]:
        out = []
        for level, k in top_k.items():
            lo, hi = index.id_range(level)
            n = hi - lo
            if k <= 0 or n <= 0:
                continue
            ids = torch.linspace(lo, hi - 1, steps=min(k, n)).round().long().unique()
            out.append(_hits(level, ids))
        return out


class RecentRetriever(Retriever):
    """The k most recent blocks of each level (a sliding window over the stream)."""

    def retrieve(self, query: Query, index: BlockIndex, top_k: dict[str, int]) -> list[Hits]:
        out = []
        for level, k in top_k.items():
            lo, hi = index.id_range(level)
            if k <= 0 or hi <= lo:
                continue
            out.append(_hits(level, torch.arange(max(lo, hi - k), hi)))
        return out


class AllRetriever(Retriever):
    """Every stored block of each level with a non-zero budget (full context)."""

    def retrieve(self, query: Query, index: BlockIndex, top_k: dict[str, int]) -> list[Hits]:
        out = []
        for level, k in top_k.items():
            lo, hi = index.id_range(level)
            if k > 0 and hi > lo:
                out.append(_hits(level, torch.arange(lo, hi)))
        return out
