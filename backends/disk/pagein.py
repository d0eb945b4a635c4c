"""Page-in: the KV of one question's final selection, from the hot tier and from disk.

:func:`load_kv` is :meth:`TieredBackend.load_kv <mukv.backends.disk.tiered.TieredBackend.load_kv>`
without its lock: hot blocks are copied from the hot tier; the rest are read
from disk in one batch per array (grouped by shard, read concurrently) straight
into the output (KV stored as it is, on CPU) or into one staging buffer of
stored rows (pinned on CUDA), checked against the crc32 their index rows carry
(kept since the search found them), uploaded as stored bytes, decoded on the
session's device in one call per array (:meth:`KVCodec.decode
<mukv.interfaces.KVCodec.decode>`), and admitted into the hot tier. The backend
keeps the bookkeeping (ids, rows, counters); the bytes move here, in
:mod:`.zarr_kv` and in :mod:`.transfer`.

A level of a stream may span arrays of several codecs (its codec changed
between sessions): each array's blocks are read and decoded with that array's
codec. With ``hot_encoded``, the hot tier keeps rows of the codec new blocks
are written with, and decodes them on the device when a question needs them;
blocks of arrays of another codec are then not promoted.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from mukv.blocks import EncodedKV
from mukv.errors import StoreError

from .hot import BlockInfo
from .transfer import as_numpy_rows

if TYPE_CHECKING:  # pragma: no cover
    from .tiered import TieredBackend
    from .zarr_kv import KVPart


def hot_encoded(b: "TieredBackend") -> bool:
    """Whether ``b``'s hot tier keeps encoded rows (option ``hot_encoded`` with a codec other than "none")."""
    return bool(b.options.hot_encoded) and b.codec.name != "none"


def hot_form(b: "TieredBackend", enc: EncodedKV) -> torch.Tensor:
    """What the hot tier keeps of newly stored blocks: their rows (``hot_encoded``), else their KV as a
    question would page it in from disk (decoded, so a block answers the same whether hot or cold)."""
    if hot_encoded(b) or b.codec.name == "none":
        return enc.rows
    return b.codec.decode_blocks(enc, b.device)


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
        where = np.flatnonzero(hot)
        if hot_encoded(b):
            t0 = time.perf_counter()
            rows = b.hot.read(level, slots[hot])
            out[torch.from_numpy(where).to(b.device)] = b.codec.decode_blocks(
                EncodedKV(rows, shape, b.layout.dtype), b.device)
            b.pagein["seconds_decode"] += time.perf_counter() - t0
        else:
            b.hot.read_into(level, slots[hot], out, where)
        b.hot.touch(level, slots[hot], b._clock)
        b.pagein["blocks_hot"] += int(hot.sum())
    cold = np.flatnonzero(~hot)
    if cold.size:
        _page_in(b, level, ids, cold, out)
    return out


def _page_in(b: "TieredBackend", level: str, ids: np.ndarray, cold: np.ndarray, out: torch.Tensor) -> None:
    """Read blocks ``ids[cold]`` from disk into ``out[cold]``, check their crc32, decode, promote them."""
    t0 = time.perf_counter()
    uniq, first, inverse = np.unique(ids[cold], return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    b._ensure_on_disk(level, int(uniq[-1]) + 1)
    rows = b._cold_rows(level, uniq)
    at = cold[first]  # [u] the row of out that receives each distinct block
    promote: list[tuple[np.ndarray, torch.Tensor]] = []  # (block ids, what the hot tier keeps of them)
    for part, pos in b.archive.split(level, uniq):
        kept = _read_part(b, part, level, uniq[pos], at[pos], rows, out)
        if kept is not None:
            promote.append((uniq[pos], kept))
    rest = np.setdiff1d(cold, at, assume_unique=True)  # repeats of an id: copies of its first row
    if rest.size:
        src = at[inverse[np.searchsorted(cold, rest)]]
        out[torch.from_numpy(rest).to(b.device)] = out[torch.from_numpy(src).to(b.device)]
    b.pagein["blocks_disk"] += int(uniq.size)
    b.pagein["bytes_decoded"] += int(uniq.size) * int(np.prod(out.shape[1:])) * out.element_size()
    b.pagein["seconds_disk"] += time.perf_counter() - t0
    if b.options.promote and b.hot.budget_bytes:
        for block_ids, kept in promote:
            sel = [rows[int(i)] for i in block_ids.tolist()]
            info = BlockInfo(block_ids, np.array([r[1] for r in sel], np.int64),
                             np.array([r[2] for r in sel], np.int64), np.array([r[3] for r in sel], np.int64),
                             np.array([r[4] for r in sel]), np.array([r[5] for r in sel]))
            vec = torch.from_numpy(np.stack([r[0] for r in sel]))
            b.hot.admit(level, kept, vec, info, b._clock, committed=True)


def _read_part(b: "TieredBackend", part: "KVPart", level: str, block_ids: np.ndarray, at: np.ndarray,
               rows: dict[int, tuple], out: torch.Tensor) -> torch.Tensor | None:
    """Blocks ``block_ids`` (distinct) of one array into ``out[at]``: read (checked against their rows'
    crc32), uploaded and decoded in one batch. Returns what the hot tier should keep of them (``None``:
    nothing)."""
    raw = part.codec.name == "none"  # rows are the KV itself
    if raw and not b.mover.cuda:  # read straight into the output
        stage, dest, dest_rows = None, out, at
    else:
        stage = b.mover.staging((block_ids.size, *part.row_shape), part.row_dtype)
        dest, dest_rows = stage.tensor, np.arange(block_ids.size)
    try:
        t1 = time.perf_counter()
        crc = b.archive.read_into(level, block_ids, as_numpy_rows(dest), dest_rows, crc=b.options.verify_reads)
        b.pagein["seconds_read"] += time.perf_counter() - t1
        if crc is not None:
            bad = [int(i) for i, c in zip(block_ids.tolist(), crc.tolist()) if c != rows[int(i)][6]]
            if bad:
                raise StoreError(f"{b.files.uri()}: {level} blocks {bad} of stream {b.stream_id!r} "
                                 "fail their checksum (damaged on disk)")
    except BaseException:
        if stage is not None:
            stage.release()
        raise
    b.pagein["bytes_disk"] += int(block_ids.size) * part.row_bytes
    where = torch.from_numpy(at).to(b.device)
    if stage is None:
        order = np.argsort(at, kind="stable")  # the blocks as rows of out, a view where contiguous
        contiguous = at[order[-1]] - at[order[0]] + 1 == at.size and np.array_equal(order, np.arange(at.size))
        decoded = out[int(at[0]) : int(at[-1]) + 1] if contiguous else out[where]
        stored = decoded
    else:
        stored = b.mover.upload(stage)  # the stored bytes, on the device
        t2 = time.perf_counter()
        decoded = part.codec.decode_blocks(EncodedKV(stored, part.block_shape, b.layout.dtype), b.device)
        b.pagein["seconds_decode"] += time.perf_counter() - t2
        out[where] = decoded
    if not hot_encoded(b):
        return decoded
    same = part.codec is b.codec or part.codec.record() == b.codec.record()
    return stored if same else None
