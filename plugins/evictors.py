"""Hot-tier eviction policies: which blocks leave fast memory first.

* ``lru_segment`` (default): whole segments, least recently retrieved first
  (a segment's recency is that of its most recently retrieved or stored
  block), ties broken by age; a segment's patch, frame and segment blocks
  leave together, so what stays hot is a set of complete moments of the stream.
* ``lru_block``: single blocks, least recently retrieved first.
* ``fifo``: oldest stored first, ignoring retrievals (a baseline).
"""

from __future__ import annotations

import torch

import mukv
from mukv.interfaces import EvictionPolicy, HotBlocks


def _cut(order: torch.Tensor, nbytes: torch.Tensor, need_bytes: int, group: torch.Tensor | None = None) -> torch.Tensor:
    """Prefix of ``order`` freeing ``need_bytes`` (extended to the end of the last group)."""
    if order.numel() == 0:
        return order
    cum = nbytes[order].cumsum(0)
    n = int(torch.searchsorted(cum, torch.tensor(max(1, need_bytes), dtype=cum.dtype)).item()) + 1
    n = min(n, order.numel())
    if group is not None and n < order.numel():
        g = group[order]
        last = g[n - 1]
        while n < order.numel() and g[n] == last:
            n += 1
    return order[:n]


class LRUSegmentEviction(EvictionPolicy):
    """Least recently retrieved segment first; all blocks of a segment go together."""

    def victims(self, candidates: HotBlocks, need_bytes: int) -> torch.Tensor:
        if candidates.ids.numel() == 0:
            return torch.empty(0, dtype=torch.int64)
        seg, inv = torch.unique(candidates.segment, return_inverse=True)
        last = torch.full((seg.numel(),), torch.iinfo(torch.int64).min, dtype=torch.int64)
        last = last.scatter_reduce(0, inv, candidates.last_used.long(), "amax")
        first = torch.full((seg.numel(),), torch.iinfo(torch.int64).max, dtype=torch.int64)
        first = first.scatter_reduce(0, inv, candidates.stored_at.long(), "amin")
        # segment rank: by last use, then by age, then by segment index (stable sorts, last key first)
        rank = torch.argsort(seg, stable=True)
        rank = rank[torch.argsort(first[rank], stable=True)]
        rank = rank[torch.argsort(last[rank], stable=True)]
        pos_of_seg = torch.empty_like(rank)
        pos_of_seg[rank] = torch.arange(rank.numel())
        block_rank = pos_of_seg[inv]
        order = torch.argsort(block_rank, stable=True)
        return _cut(order, candidates.nbytes, need_bytes, block_rank)


class LRUBlockEviction(EvictionPolicy):
    """Least recently retrieved block first (ties: oldest first)."""

    def victims(self, candidates: HotBlocks, need_bytes: int) -> torch.Tensor:
        order = torch.argsort(candidates.stored_at, stable=True)
        order = order[torch.argsort(candidates.last_used[order], stable=True)]
        return _cut(order, candidates.nbytes, need_bytes)


class FIFOEviction(EvictionPolicy):
    """Oldest stored block first."""

    def victims(self, candidates: HotBlocks, need_bytes: int) -> torch.Tensor:
        return _cut(torch.argsort(candidates.stored_at, stable=True), candidates.nbytes, need_bytes)


@mukv.hookimpl
def mukv_register_evictors(register):
    register("lru_segment", LRUSegmentEviction)
    register("lru_block", LRUBlockEviction)
    register("fifo", FIFOEviction)
