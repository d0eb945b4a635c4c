"""Page-in: the KV of one question's final selection, from the hot tier and from disk.

:func:`load_kv` is :meth:`TieredBackend.load_kv <mukv.backends.disk.tiered.TieredBackend.load_kv>`
without its lock: hot blocks are copied from the hot tier; the rest are read
from disk in one batch (grouped by shard, read concurrently) straight into the
output (through one pinned staging buffer on CUDA), checked against the crc32
their index rows carry (kept since the search found them), and admitted into
the hot tier. The backend keeps the bookkeeping (ids, rows, counters); the
bytes move here, in :mod:`.zarr_kv` and in :mod:`.transfer`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from mukv.errors import StoreError

from .hot import BlockInfo
from .transfer import as_numpy_rows

if TYPE_CHECKING:  # pragma: no cover
    from .tiered import TieredBackend


def load_kv(b: "TieredBackend", level: str, ids: np.ndarray) -> torch.Tensor:
    """``[n, Y, 2, H, K, D]`` KV of blocks ``ids`` (validated, any order, repeats allowed) on ``b``'s
    device, in their order. The caller holds ``b``'s lock."""
    shape = b._block_shape(level)
    out = torch.empty((ids.size, *shape), dtype=b.layout.dtype, device=b.device)
    if ids.size == 0:
        return out
    b._clock += 1
    b.pagein["questions"] += 1
    slots = b.hot.lookup(level, ids)
    hot = slots >= 0
    if hot.any():
        b.hot.read_into(level, slots[hot], out, np.flatnonzero(hot))
        b.hot.touch(level, slots[hot], b._clock)
        b.pagein["blocks_hot"] += int(hot.sum())
    cold = np.flatnonzero(~hot)
    if cold.size:
        _page_in(b, level, ids, cold, out)
    return out


def _page_in(b: "TieredBackend", level: str, ids: np.ndarray, cold: np.ndarray, out: torch.Tensor) -> None:
    """Read blocks ``ids[cold]`` from disk into ``out[cold]``, check their crc32, promote them."""
    t0 = time.perf_counter()
    uniq, first, inverse = np.unique(ids[cold], return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    b._ensure_on_disk(level, int(uniq[-1]) + 1)
    rows = b._cold_rows(level, uniq)
    at = cold[first]  # [u] the row of out that receives each distinct block
    if b.mover.cuda:
        stage = b.mover.staging((uniq.size, *out.shape[1:]), b.layout.dtype)
        dest, dest_rows = stage.tensor, np.arange(uniq.size)
    else:
        stage, dest, dest_rows = None, out, at
    try:
        t1 = time.perf_counter()
        crc = b.archive.read_into(level, uniq, as_numpy_rows(dest), dest_rows, crc=b.options.verify_reads)
        t_read = time.perf_counter() - t1
        if crc is not None:
            bad = [int(i) for i, c in zip(uniq.tolist(), crc.tolist()) if c != rows[int(i)][6]]
            if bad:
                raise StoreError(f"{b.files.uri()}: {level} blocks {bad} of stream {b.stream_id!r} "
                                 "fail their checksum (damaged on disk)")
    except BaseException:
        if stage is not None:
            stage.release()
        raise
    if stage is not None:  # one upload of the distinct blocks, then a copy per requested row on the device
        blocks = b.mover.upload(stage)
        out[torch.from_numpy(cold).to(b.device)] = blocks[torch.from_numpy(inverse).to(b.device)]
    else:
        rest = np.setdiff1d(cold, at, assume_unique=True)  # repeats of an id: copies of its first row
        if rest.size:
            pos = np.searchsorted(cold, rest)
            out[torch.from_numpy(rest)] = out[torch.from_numpy(at[inverse[pos]])]
        order = np.argsort(at, kind="stable")  # the distinct blocks as rows of out, a view where contiguous
        if at[order[-1]] - at[order[0]] + 1 == at.size:
            uniq, first, at = uniq[order], first[order], at[order]
            blocks = out[int(at[0]) : int(at[-1]) + 1]
        else:
            blocks = out[torch.from_numpy(at)]
    nbytes = int(uniq.size) * int(np.prod(out.shape[1:])) * out.element_size()
    b.pagein["blocks_disk"] += int(uniq.size)
    b.pagein["bytes_disk"] += nbytes
    b.pagein["seconds_disk"] += time.perf_counter() - t0
    b.pagein["seconds_read"] += t_read
    if b.options.promote and b.hot.budget_bytes:
        sel = [rows[int(i)] for i in uniq.tolist()]
        info = BlockInfo(uniq, np.array([r[1] for r in sel], np.int64), np.array([r[2] for r in sel], np.int64),
                         np.array([r[3] for r in sel], np.int64), np.array([r[4] for r in sel]),
                         np.array([r[5] for r in sel]))
        vec = torch.from_numpy(np.stack([r[0] for r in sel]))
        b.hot.admit(level, blocks, vec, info, b._clock, committed=True)
