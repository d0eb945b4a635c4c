"""The hot tier: a fixed byte budget of fast memory (GPU on CUDA, RAM otherwise).

All KV of the tier lives in **one preallocated buffer** (the arena), cut into
equal slabs. A slab is lent to one level at a time and viewed as
``[m, Y, 2, H, K, D]`` blocks of that level (``m = slab_bytes // block_bytes``),
or as ``[m, S]`` stored rows of a KV codec when the tier keeps blocks encoded
(a level's first block sets its shape and dtype):
a block is a slot, i.e. a view into a slab, never a tensor of its own. A slab
whose last block leaves goes back to the arena, so levels share the budget as
the stream needs it. The arena is allocated once, so the tier's bytes are
flat however long the stream runs.

Bookkeeping per slot (block id, segment, frames, times, last use, committed)
is kept in fixed-size numpy arrays; vectors of hot blocks sit next to the KV
on the device for matmul search. Blocks not yet committed to disk are never
evicted. Which committed blocks leave first is the eviction policy's choice
(:class:`mukv.interfaces.EvictionPolicy`, chosen by name).

All methods take ``self.lock`` themselves; the offload writer calls
:meth:`mark_committed` from its thread.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mukv.interfaces import EvictionPolicy, HotBlocks

log = logging.getLogger(__name__)


@dataclass
class BlockInfo:
    """Metadata of a batch of blocks of one level (``[n]`` numpy arrays)."""

    ids: np.ndarray
    segment: np.ndarray
    frame_start: np.ndarray
    frame_end: np.ndarray
    t_start: np.ndarray
    t_end: np.ndarray

    def take(self, idx: np.ndarray) -> "BlockInfo":
        return BlockInfo(*(getattr(self, f)[idx] for f in ("ids", "segment", "frame_start", "frame_end", "t_start", "t_end")))


@dataclass
class _Level:
    name: str
    block_shape: tuple[int, ...]
    dtype: torch.dtype
    block_bytes: int
    per_slab: int  # m
    slab_of: np.ndarray  # [n_slabs] arena slab lent to position p, or -1
    used_in: np.ndarray  # [n_slabs] blocks held in position p
    free: np.ndarray  # [max_slots] bool: slot is in a lent slab and empty
    ids: np.ndarray  # [max_slots] block id, -1 if empty
    segment: np.ndarray
    frame_start: np.ndarray
    frame_end: np.ndarray
    t_start: np.ndarray
    t_end: np.ndarray
    last_used: np.ndarray
    stored_at: np.ndarray
    committed: np.ndarray  # bool
    vectors: torch.Tensor  # [max_slots, V] float32 on the device
    unit: torch.Tensor  # [max_slots, V] L2-normalised
    where: dict[int, int] = field(default_factory=dict)  # block id -> slot
    views: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> [m, *block_shape]
    n_free: int = 0

    @property
    def max_slots(self) -> int:
        return self.ids.shape[0]


class HotTier:
    """Blocks in fast memory, within ``budget_bytes``.

    Args:
        budget_bytes: bytes of the arena (KV only; the per-slot bookkeeping
            and vectors add a few percent, also fixed).
        slab_bytes: bytes of one slab (at least one block of every level).
        device: where the arena lives.
        dtype: KV dtype (of levels admitted without a dtype of their own).
        vector_dim: V.
        policy: the eviction policy.
        evict_fraction: when space is needed, free at least this fraction of
            the budget at once (so the policy runs rarely).
    """

    def __init__(self, budget_bytes: int, slab_bytes: int, device: torch.device, dtype: torch.dtype,
                 vector_dim: int, policy: EvictionPolicy, evict_fraction: float = 1 / 32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.vector_dim = vector_dim
        self.policy = policy
        self.evict_fraction = evict_fraction
        align = 4096
        self.slab_bytes = max(0, (int(slab_bytes) // align) * align)
        self.n_slabs = 0 if self.slab_bytes == 0 else int(budget_bytes) // self.slab_bytes
        self.budget_bytes = self.n_slabs * self.slab_bytes
        self.arena = torch.empty(self.budget_bytes, dtype=torch.uint8, device=self.device)
        self.free_slabs: list[int] = list(range(self.n_slabs - 1, -1, -1))
        self.levels: dict[str, _Level] = {}
        self.lock = threading.RLock()
        self.evicted = 0  # blocks evicted so far
        self.too_large: set[str] = set()  # levels whose blocks do not fit a slab

    # -- levels -----------------------------------------------------------------------
    def _level(self, name: str, block_shape: tuple[int, ...], dtype: torch.dtype | None = None) -> _Level | None:
        lv = self.levels.get(name)
        if lv is not None:
            return lv
        dtype = self.dtype if dtype is None else dtype
        elem = torch.empty((), dtype=dtype).element_size()
        block_bytes = int(np.prod(block_shape)) * elem
        per_slab = self.slab_bytes // block_bytes if block_bytes else 0
        if per_slab == 0:
            if name not in self.too_large and self.n_slabs:
                log.warning("hot tier: a %s block (%d bytes) is larger than a slab (%d bytes); %s blocks will be "
                            "read from disk. Raise hot_bytes or hot_slab_bytes.", name, block_bytes, self.slab_bytes,
                            name)
            self.too_large.add(name)
            return None
        slots = self.n_slabs * per_slab
        z = lambda dt, fill=0: np.full(slots, fill, dtype=dt)  # noqa: E731
        lv = _Level(
            name=name, block_shape=tuple(block_shape), dtype=dtype, block_bytes=block_bytes, per_slab=per_slab,
            slab_of=np.full(self.n_slabs, -1, dtype=np.int64), used_in=np.zeros(self.n_slabs, dtype=np.int64),
            free=np.zeros(slots, dtype=bool), ids=z(np.int64, -1), segment=z(np.int64), frame_start=z(np.int64),
            frame_end=z(np.int64), t_start=z(np.float64), t_end=z(np.float64), last_used=z(np.int64),
            stored_at=z(np.int64), committed=np.zeros(slots, dtype=bool),
            vectors=torch.zeros(slots, self.vector_dim, dtype=torch.float32, device=self.device),
            unit=torch.zeros(slots, self.vector_dim, dtype=torch.float32, device=self.device),
        )
        self.levels[name] = lv
        return lv

    def _view(self, lv: _Level, p: int) -> torch.Tensor:
        v = lv.views.get(p)
        if v is None:
            s = int(lv.slab_of[p])
            start = s * self.slab_bytes
            raw = self.arena[start : start + lv.per_slab * lv.block_bytes]
            v = raw.view(lv.dtype).view(lv.per_slab, *lv.block_shape)
            lv.views[p] = v
        return v

    def _lend_slab(self, lv: _Level) -> bool:
        if not self.free_slabs:
            return False
        p = int(np.flatnonzero(lv.slab_of < 0)[0])
        lv.slab_of[p] = self.free_slabs.pop()
        lv.free[p * lv.per_slab : (p + 1) * lv.per_slab] = True
        lv.n_free += lv.per_slab
        return True

    def _release(self, lv: _Level, slots: np.ndarray) -> None:
        """Empty ``slots`` (eviction or rollback); give back slabs left empty."""
        if slots.size == 0:
            return
        for bid in lv.ids[slots].tolist():
            lv.where.pop(int(bid), None)
        lv.ids[slots] = -1
        lv.committed[slots] = False
        lv.free[slots] = True
        lv.n_free += int(slots.size)
        pos = slots // lv.per_slab
        np.subtract.at(lv.used_in, pos, 1)
        for p in np.unique(pos).tolist():
            if lv.used_in[p] == 0:
                lv.free[p * lv.per_slab : (p + 1) * lv.per_slab] = False
                lv.n_free -= lv.per_slab
                self.free_slabs.append(int(lv.slab_of[p]))
                lv.slab_of[p] = -1
                lv.views.pop(p, None)

    # -- admission and eviction ---------------------------------------------------------
    def _room(self, lv: _Level) -> int:
        return lv.n_free + len(self.free_slabs) * lv.per_slab

    def _candidates(self) -> tuple[HotBlocks, list[tuple[_Level, np.ndarray]]]:
        names, parts, cols = [], [], {k: [] for k in ("ids", "segment", "nbytes", "last_used", "stored_at")}
        for lv in self.levels.values():
            slots = np.flatnonzero((lv.ids >= 0) & lv.committed)
            if slots.size == 0:
                continue
            names += [lv.name] * int(slots.size)
            parts.append((lv, slots))
            cols["ids"].append(lv.ids[slots])
            cols["segment"].append(lv.segment[slots])
            cols["nbytes"].append(np.full(slots.size, lv.block_bytes, dtype=np.int64))
            cols["last_used"].append(lv.last_used[slots])
            cols["stored_at"].append(lv.stored_at[slots])
        t = {k: torch.from_numpy(np.concatenate(v) if v else np.empty(0, dtype=np.int64)) for k, v in cols.items()}
        return HotBlocks(names, t["ids"], t["segment"], t["nbytes"], t["last_used"], t["stored_at"]), parts

    def make_room(self, name: str, n: int) -> int:
        """Evict committed blocks (policy order) until ``n`` blocks of level ``name`` fit.

        Returns how many fit now (``< n`` when the rest of the tier is not yet
        committed to disk, or the budget is smaller than the request).
        """
        with self.lock:
            lv = self.levels[name]
            if self._room(lv) >= n:
                return n
            need = max((n - self._room(lv)) * lv.block_bytes, int(self.budget_bytes * self.evict_fraction))
            cands, parts = self._candidates()
            if len(cands.ids) == 0:
                return self._room(lv)
            order = self.policy.victims(cands, need)
            order = torch.as_tensor(order, dtype=torch.int64).reshape(-1).numpy()
            # positions in the concatenated candidates -> (level, slot)
            bounds = np.cumsum([0] + [s.size for _, s in parts])
            freed = 0
            for i in range(0, order.size, 256):
                chunk = order[i : i + 256]
                part = np.searchsorted(bounds, chunk, side="right") - 1
                for pi in np.unique(part).tolist():
                    plv, slots = parts[pi]
                    sel = slots[chunk[part == pi] - bounds[pi]]
                    sel = sel[plv.ids[sel] >= 0]
                    self._release(plv, sel)
                    self.evicted += int(sel.size)
                    freed += int(sel.size) * plv.block_bytes
                if self._room(lv) >= n and freed >= need:
                    break
            return min(n, self._room(lv))

    def admit(self, name: str, kv: torch.Tensor, vectors: torch.Tensor, info: BlockInfo, clock: int,
              committed: bool) -> np.ndarray:
        """Copy blocks into free slots (evicting if needed). Returns a bool mask of the admitted ones.

        Args:
            kv: ``[n, Y, 2, H, K, D]`` on any device (or ``[n, S]`` uint8 rows of a codec: a level
                keeps the shape and, for rows, the dtype of its first admission; blocks of another
                shape or dtype are not admitted).
            vectors: ``[n, V]``.
        """
        n = kv.shape[0]
        with self.lock:
            lv = self._level(name, tuple(kv.shape[1:]), None if kv.dtype.is_floating_point else kv.dtype)
            admitted = np.zeros(n, dtype=bool)
            if lv is None or n == 0 or tuple(kv.shape[1:]) != lv.block_shape or \
                    kv.dtype.is_floating_point != lv.dtype.is_floating_point:
                return admitted
            fresh = np.array([int(i) not in lv.where for i in info.ids.tolist()], dtype=bool)
            want = int(fresh.sum())
            fit = self.make_room(name, want) if want else 0
            while self._room(lv) > lv.n_free and lv.n_free < fit:
                self._lend_slab(lv)
            take = np.flatnonzero(fresh)[:fit]
            slots = np.flatnonzero(lv.free)[: take.size]
            if take.size == 0:
                return admitted
            src = kv.to(self.device, lv.dtype, non_blocking=True)
            pos = slots // lv.per_slab
            rows = slots % lv.per_slab
            for p in np.unique(pos).tolist():
                m = np.flatnonzero(pos == p)
                _copy_rows(self._view(lv, p), rows[m], src, take[m])
            vec = vectors[torch.from_numpy(take).to(vectors.device)].to(self.device, torch.float32)
            st = torch.from_numpy(slots).to(self.device)
            lv.vectors[st] = vec
            lv.unit[st] = F.normalize(vec, dim=-1)
            sub = info.take(take)
            lv.ids[slots] = sub.ids
            lv.segment[slots] = sub.segment
            lv.frame_start[slots] = sub.frame_start
            lv.frame_end[slots] = sub.frame_end
            lv.t_start[slots] = sub.t_start
            lv.t_end[slots] = sub.t_end
            lv.last_used[slots] = clock
            lv.stored_at[slots] = clock
            lv.committed[slots] = committed
            lv.free[slots] = False
            lv.n_free -= int(slots.size)
            np.add.at(lv.used_in, pos, 1)
            for bid, s in zip(sub.ids.tolist(), slots.tolist()):
                lv.where[int(bid)] = int(s)
            admitted[take] = True
            return admitted

    def mark_committed(self, name: str, upto: int) -> None:
        """Blocks of ``name`` with id ``< upto`` are on disk: they may be evicted."""
        with self.lock:
            lv = self.levels.get(name)
            if lv is not None:
                lv.committed |= (lv.ids >= 0) & (lv.ids < upto)

    def rollback(self, name: str, first: int) -> None:
        """Drop blocks of ``name`` with id ``>= first`` (a failed write)."""
        with self.lock:
            lv = self.levels.get(name)
            if lv is not None:
                self._release(lv, np.flatnonzero(lv.ids >= first))

    # -- reading ------------------------------------------------------------------------
    def lookup(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Slot of each id, ``-1`` where not hot."""
        with self.lock:
            lv = self.levels.get(name)
            if lv is None:
                return np.full(len(ids), -1, dtype=np.int64)
            return np.array([lv.where.get(int(i), -1) for i in np.asarray(ids).tolist()], dtype=np.int64)

    def holds_all(self, name: str, n: int) -> bool:
        """Whether every block ``0 .. n - 1`` of ``name`` is in the tier (a search need not look on disk)."""
        with self.lock:
            lv = self.levels.get(name)
            if lv is None or n <= 0:
                return n <= 0
            return int(np.count_nonzero((lv.ids >= 0) & (lv.ids < n))) == n

    def read(self, name: str, slots: np.ndarray) -> torch.Tensor:
        """``[n, Y, 2, H, K, D]`` copies of the blocks in ``slots`` (on the tier's device)."""
        with self.lock:
            lv = self.levels[name]
            out = torch.empty((len(slots), *lv.block_shape), dtype=lv.dtype, device=self.device)
            self.read_into(name, slots, out, np.arange(len(slots)))
            return out

    def read_into(self, name: str, slots: np.ndarray, out: torch.Tensor, rows: np.ndarray) -> None:
        """Copy the blocks in ``slots`` into ``out[rows]`` (``out [m, Y, 2, H, K, D]``, any device), one copy each."""
        with self.lock:
            lv = self.levels[name]
            pos, at = slots // lv.per_slab, slots % lv.per_slab
            for p in np.unique(pos).tolist():
                m = np.flatnonzero(pos == p)
                _copy_rows(out, np.asarray(rows)[m], self._view(lv, p), at[m])

    def meta(self, name: str, slots: np.ndarray) -> dict[str, np.ndarray]:
        with self.lock:
            lv = self.levels[name]
            return {k: getattr(lv, k)[slots].copy() for k in ("frame_start", "frame_end", "t_start", "t_end", "segment")}

    def vectors(self, name: str, slots: np.ndarray) -> torch.Tensor:
        with self.lock:
            return self.levels[name].vectors[torch.from_numpy(slots).to(self.device)].clone()

    def touch(self, name: str, slots: np.ndarray, clock: int) -> None:
        """Record a retrieval of the blocks in ``slots``."""
        with self.lock:
            lv = self.levels.get(name)
            if lv is not None and len(slots):
                lv.last_used[slots] = clock

    def search(self, name: str, query_unit: torch.Tensor, k: int,
               within: np.ndarray | None = None) -> tuple[np.ndarray, torch.Tensor]:
        """Top-``k`` hot blocks of a level by cosine similarity: ``(ids [k'], vectors [k', V])``."""
        with self.lock:
            lv = self.levels.get(name)
            if lv is None or k <= 0:
                return np.empty(0, dtype=np.int64), torch.empty(0, self.vector_dim)
            ok = lv.ids >= 0
            if within is not None:
                w = np.asarray(within, dtype=np.int64).reshape(-1, 2)
                inside = ((lv.frame_start[:, None] >= w[None, :, 0]) & (lv.frame_end[:, None] <= w[None, :, 1])).any(1)
                ok &= inside
            cnt = int(ok.sum())
            if cnt == 0:
                return np.empty(0, dtype=np.int64), torch.empty(0, self.vector_dim)
            sims = lv.unit @ query_unit.to(self.device, torch.float32)
            sims = sims.masked_fill(~torch.from_numpy(ok).to(self.device), float("-inf"))
            top = sims.topk(min(k, cnt)).indices
            slots = top.cpu().numpy()
            return lv.ids[slots].copy(), lv.vectors[top].clone()

    # -- numbers ------------------------------------------------------------------------
    def used_bytes(self) -> int:
        with self.lock:
            return sum(int((lv.ids >= 0).sum()) * lv.block_bytes for lv in self.levels.values())

    def blocks(self) -> dict[str, int]:
        with self.lock:
            return {n: int((lv.ids >= 0).sum()) for n, lv in self.levels.items()}

    def reserved_bytes(self) -> int:
        """Arena plus bookkeeping: everything the tier holds, fixed after each level's first block."""
        total = self.arena.numel()
        for lv in self.levels.values():
            total += lv.vectors.numel() * 8 + lv.max_slots * (8 * 8 + 2)
        return total


def _copy_rows(dst: torch.Tensor, dst_rows: np.ndarray, src: torch.Tensor, src_rows: np.ndarray) -> None:
    """``dst[dst_rows] = src[src_rows]`` along dim 0 with one copy of each block (no gathered temporary):
    block by block for few or large blocks, else one gather and one scatter."""
    n = len(dst_rows)
    if n == 0:
        return
    if n <= 64 or src[0].numel() * src.element_size() >= (64 << 10):
        for d, s in zip(np.asarray(dst_rows).tolist(), np.asarray(src_rows).tolist()):
            dst[d].copy_(src[s], non_blocking=True)
        return
    gathered = src[torch.from_numpy(np.asarray(src_rows)).to(src.device)].to(dst.device, non_blocking=True)
    dst[torch.from_numpy(np.asarray(dst_rows)).to(dst.device)] = gathered
