"""Questions over a time window: ``Session.ask(question, since=..., until=...)``.

A window ``[since, until]`` (stream seconds) is turned, per level, into the run of block ids whose
time span lies inside it (block ids are in stream-time order, so a search over the level's metadata
finds both ends in a few batched reads), and retrievers see the store through a :class:`WindowedIndex`:
every search is restricted to those blocks through the index's frame-range filter, and
:meth:`~mukv.interfaces.BlockIndex.id_range` tells query-independent retrievers (uniform sampling, a
sliding window) which ids the window holds.
"""

from __future__ import annotations

import torch

from .interfaces import BlockIndex, BlockMeta

#: ids probed per round of the search for a window's ends
PROBES = 32


def _first(index: BlockIndex, level: str, n: int, key) -> int:
    """Smallest id in ``[0, n)`` whose metadata satisfies the monotone predicate ``key`` (``n`` if none)."""
    lo, hi = 0, n  # answer in [lo, hi]
    while hi - lo > 0:
        if hi - lo <= PROBES:
            ids = torch.arange(lo, hi)
        else:
            ids = torch.linspace(lo, hi - 1, PROBES).round().long().unique()
        ok = key(index.metadata(level, ids)).cpu()
        hit = torch.nonzero(ok).flatten()
        if hi - lo <= PROBES:
            return int(ids[hit[0]]) if hit.numel() else hi
        if hit.numel() == 0:
            lo = int(ids[-1]) + 1
        else:
            j = int(hit[0])
            hi = int(ids[j])
            lo = int(ids[j - 1]) + 1 if j > 0 else lo
    return lo


def level_window(index: BlockIndex, level: str, since: float | None, until: float | None) -> tuple[int, int]:
    """``[lo, hi)``: the ids of ``level``'s blocks whose whole time span lies in ``[since, until]``."""
    n = index.count(level)
    if n == 0:
        return 0, 0
    lo = 0 if since is None else _first(index, level, n, lambda m: m.t_start >= since)
    hi = n if until is None else _first(index, level, n, lambda m: m.t_end > until)
    return lo, max(lo, hi)


class WindowedIndex(BlockIndex):
    """A store seen through a time window (see the module docstring).

    Args:
        index: the store's search side.
        windows: per level, ``(lo, hi)`` block ids inside the window.
    """

    def __init__(self, index: BlockIndex, windows: dict[str, tuple[int, int]]):
        self.index = index
        self.windows = windows
        self._frames: dict[str, torch.Tensor | None] = {}

    def _range(self, level: str) -> tuple[int, int]:
        return self.windows.get(level, (0, 0))

    def id_range(self, level: str) -> tuple[int, int]:
        return self._range(level)

    def count(self, level: str) -> int:
        lo, hi = self._range(level)
        return hi - lo

    def _frame_range(self, level: str) -> torch.Tensor | None:
        """``[1, 2]`` frames ``[start, end)`` the window's blocks of ``level`` span (None if empty)."""
        if level not in self._frames:
            lo, hi = self._range(level)
            if hi <= lo:
                self._frames[level] = None
            else:
                m = self.index.metadata(level, torch.tensor([lo, hi - 1]))
                self._frames[level] = torch.tensor([[int(m.frame_start[0]), int(m.frame_end[1])]], dtype=torch.int64)
        return self._frames[level]

    def search(self, level: str, query: torch.Tensor, k: int, within: torch.Tensor | None = None):
        frames = self._frame_range(level)
        if frames is None:
            dev = query.device
            return torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, device=dev)
        if within is None:
            win = frames
        else:
            w = within.detach().to("cpu", torch.int64).reshape(-1, 2)
            win = torch.stack([w[:, 0].clamp_min(frames[0, 0]), w[:, 1].clamp_max(frames[0, 1])], dim=1)
            win = win[win[:, 1] > win[:, 0]]
            if win.numel() == 0:
                dev = query.device
                return torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, device=dev)
        return self.index.search(level, query, k, win.to(within.device if within is not None else "cpu"))

    def vectors(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        return self.index.vectors(level, ids)

    def metadata(self, level: str, ids: torch.Tensor) -> BlockMeta:
        return self.index.metadata(level, ids)
