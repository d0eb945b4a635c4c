"""Direct reads of the shards mukv writes: a block's bytes go by ``preadv`` into the caller's buffer.

A local array mukv wrote (uncompressed chunks in a zarr v3 sharded array,
index at the end) is read without zarr: the final selection's blocks are
grouped by shard, each shard's index is read once, and the blocks' bytes go
by ``preadv`` straight into rows of the caller's preallocated buffer, shards
read concurrently by a pool of threads (``preadv`` and ``zlib.crc32`` release
the GIL), each through one file descriptor, so a shard that a writer replaces
meanwhile is read whole from one version. :class:`ShardGeometry` says where a
block lives; :func:`read_shard` reads one shard's blocks.
"""

from __future__ import annotations

import os
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mukv.errors import StoreError

#: one pool of reader threads per size, shared by every archive of the process
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
#: the most buffers one ``preadv`` takes (POSIX IOV_MAX is at least 1024 on Linux)
_IOV_MAX = 1024
#: an index entry of a chunk that was never written (zarr: the chunk is all fill value)
_EMPTY = np.uint64(2**64 - 1)


def reader_pool(threads: int) -> ThreadPoolExecutor:
    """The process's pool of ``threads`` KV reader threads (created once)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="mukv-kv-read")
        return pool


def _crc32c(data: bytes) -> int:
    import google_crc32c  # zarr's own dependency for the shard index checksum

    return int(google_crc32c.value(data))


@dataclass(frozen=True)
class ShardGeometry:
    """Where block ``i`` of a level lives in an array mukv wrote.

    Shard ``i // per_shard`` (the file ``key`` names), inner chunk
    ``(i % per_shard) // per_chunk`` of it, row ``i % per_chunk`` of that chunk.
    Chunks are stored uncompressed, so a block is ``block_bytes`` contiguous
    bytes at ``chunk offset + row * block_bytes``. Each shard ends with its index:
    ``[per_shard // per_chunk, 2]`` little-endian uint64 (offset, bytes) per chunk,
    then its crc32c (zarr v3 sharding codec, ``index_location = "end"``).
    """

    per_shard: int
    per_chunk: int
    block_bytes: int
    fill_value: int
    index_crc: bool
    key: Any  # shard index -> the shard's key under the array (zarr's chunk key encoding)

    @property
    def chunks_per_shard(self) -> int:
        return self.per_shard // self.per_chunk

    @property
    def index_bytes(self) -> int:
        return self.chunks_per_shard * 16 + (4 if self.index_crc else 0)

    @classmethod
    def of(cls, arr: Any) -> "ShardGeometry | None":
        """The geometry of a zarr array, or ``None`` if its blocks cannot be read directly (compressed
        chunks, another index layout, a big-endian host)."""
        try:
            from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

            codecs = arr.metadata.codecs
            if sys.byteorder != "little" or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
                return None
            sc = codecs[0]

            def little(c: Any) -> bool:  # stored as raw little-endian bytes, which this host reads as is
                return isinstance(c, BytesCodec) and getattr(c.endian, "value", c.endian) in (None, "little")

            if len(sc.codecs) != 1 or not little(sc.codecs[0]):
                return None
            ic = list(sc.index_codecs)
            if not ic or not little(ic[0]) or any(not isinstance(c, Crc32cCodec) for c in ic[1:]) or len(ic) > 2:
                return None
            if getattr(sc.index_location, "value", sc.index_location) != "end":
                return None
            shard, chunk, shape = tuple(arr.shards), tuple(sc.chunk_shape), tuple(arr.shape)
            if shard[1:] != shape[1:] or chunk[1:] != shape[1:] or shard[0] % chunk[0]:
                return None
            block_bytes = int(np.prod(shape[1:])) * arr.dtype.itemsize
            meta = arr.metadata
            return cls(int(shard[0]), int(chunk[0]), block_bytes, int(meta.fill_value), len(ic) == 2,
                       lambda s, _m=meta, _d=len(shape) - 1: _m.encode_chunk_key((int(s),) + (0,) * _d))
        except (ImportError, AttributeError, TypeError, ValueError):
            return None


class ShardFailure(Exception):
    """A shard that cannot be read: its blocks and why."""

    def __init__(self, ids: np.ndarray, cause: BaseException):
        super().__init__(str(cause))
        self.ids = ids
        self.cause = cause


#: bytes one ``preadv`` reads at most (adjacent blocks beyond it go to another reader thread)
_PIECE_BYTES = 8 << 20


def open_shard(path: Path, g: ShardGeometry) -> tuple[int | None, tuple[np.ndarray, int] | None]:
    """Open a shard and read its index: ``(fd, (index [chunks, 2] uint64, file bytes))``; ``(None, None)``
    when the shard was never written (zarr: all fill value)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None, None
    try:
        size = os.fstat(fd).st_size
        if size < g.index_bytes:
            raise StoreError(f"shard {path.name} holds {size} bytes, less than its index (truncated)")
        raw = os.pread(fd, g.index_bytes, size - g.index_bytes)
        body = raw[: g.chunks_per_shard * 16]
        if len(raw) != g.index_bytes or (g.index_crc and _crc32c(body) != int.from_bytes(raw[-4:], "little")):
            raise StoreError("the shard's index fails its checksum (a damaged or truncated shard)")
        return fd, (np.frombuffer(body, dtype="<u8").reshape(-1, 2), size)
    except BaseException:
        os.close(fd)
        raise


def plan_reads(g: ShardGeometry, index: tuple[np.ndarray, int], ids: np.ndarray,
          positions: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(file offset, positions)`` of the reads of one shard's ``ids``: runs of blocks adjacent in the file
    (at most ``_PIECE_BYTES``), sorted by offset; offset ``-1`` for blocks of chunks never written."""
    table, size = index
    entry = table[(ids % g.per_shard) // g.per_chunk]  # [n, 2] (offset, bytes) of each block's chunk
    empty = (entry[:, 0] == _EMPTY) & (entry[:, 1] == _EMPTY)
    pieces: list[tuple[int, np.ndarray]] = [(-1, positions[empty])] if empty.any() else []
    full = ~empty
    if not full.any():
        return pieces
    chunk_bytes = g.per_chunk * g.block_bytes
    offset, nbytes = entry[full, 0].astype(np.int64), entry[full, 1].astype(np.int64)
    if (nbytes != chunk_bytes).any() or (entry[full, 0] >= np.uint64(2**62)).any():
        raise StoreError(f"the shard's index lists chunks of {sorted(set(nbytes.tolist()))} bytes; uncompressed "
                         f"chunks hold {chunk_bytes} (a damaged shard)")
    if (offset + nbytes > size).any():
        raise StoreError(f"the shard's index points beyond its {size} bytes (a truncated shard)")
    start = offset + (ids[full] % g.per_chunk) * g.block_bytes
    order = np.argsort(start, kind="stable")
    start, pos = start[order], positions[full][order]
    most = max(1, min(_IOV_MAX, _PIECE_BYTES // g.block_bytes))
    a = 0
    for j in range(1, start.size + 1):
        if j == start.size or start[j] != start[j - 1] + g.block_bytes or j - a >= most:
            pieces.append((int(start[a]), pos[a:j]))
            a = j
    return pieces


def _read_piece(fd: int, offset: int, flat: np.ndarray, rows: np.ndarray, block_bytes: int,
                crc: bool) -> list[int] | None:
    """``preadv`` blocks adjacent in the file at ``offset`` into rows ``rows`` of ``flat [m, block_bytes]``
    (uint8); the crc32 of each block if ``crc``."""
    views = [memoryview(flat[r]) for r in rows.tolist()]
    want = block_bytes * len(views)
    done = os.preadv(fd, views, offset)
    while done < want:  # a short read: go on from where it stopped
        k, inside = divmod(done, block_bytes)
        got = os.preadv(fd, [views[k][inside:], *views[k + 1 :]], offset + done)
        if got == 0:
            raise StoreError("the shard ends inside a block (a truncated shard)")
        done += got
    return [zlib.crc32(v) for v in views] if crc else None


def read_shard(path: Path, g: ShardGeometry, ids: np.ndarray, out: np.ndarray, rows: np.ndarray,
                crc: bool) -> np.ndarray:
    """Read blocks ``ids`` of one shard into ``out[rows]`` (one reader thread, one file descriptor, so one
    version of a shard that a writer may replace meanwhile): its index, then each run of adjacent blocks
    in one ``preadv``. Returns ``[n]`` crc32 per id (zeros unless ``crc``)."""
    flat = out.reshape(out.shape[0], -1).view(np.uint8)  # [m, block_bytes]
    crcs = np.zeros(ids.size, dtype=np.int64)
    fd, index = open_shard(path, g)
    try:
        pieces = [(-1, np.arange(ids.size))] if fd is None else plan_reads(g, index, ids, np.arange(ids.size))
        for offset, sel in pieces:
            if offset < 0:  # no bytes stored (zarr skips chunks of fill value only): the fill value
                out[rows[sel]] = g.fill_value
                got = [zlib.crc32(flat[r]) for r in rows[sel].tolist()] if crc else None
            else:
                got = _read_piece(fd, offset, flat, rows[sel], g.block_bytes, crc)
            if crc:
                crcs[sel] = got
    finally:
        if fd is not None:
            os.close(fd)
    return crcs


