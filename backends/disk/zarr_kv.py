"""KV bytes on disk: one sharded zarr array per stream and level.

``kv/<stream>/<level>.zarr`` has shape ``[N, Y, 2, H, K, D]``: row ``i`` is
block ``i`` of that level. A chunk holds as many blocks as fit in about
``chunk_bytes`` (one segment block of a real model, a few dozen patch blocks:
zarr's cost is per chunk, and reading a block reads its chunk); a shard holds
many chunks (about ``shard_bytes``), so a week-long stream keeps a few
thousand files, not millions. zarr has no bfloat16:
bf16 KV is stored as its ``uint16`` bit pattern with the attribute
``mukv_dtype = "bfloat16"`` (other dtypes are stored as themselves).

zarr's local store writes every object through a temp file and a rename, and
an object-store PUT is atomic, so a shard on disk is always some complete
version: a crash can lose an unfinished write, never damage blocks written
before it. Rows beyond what the index has committed are cut off when a writer
reopens the stream (:meth:`KVArchive.truncate`).

Page-in reads the shards of a local store directly (:class:`ShardGeometry`):
the final selection's blocks are grouped by shard, each shard's index is read
once, and the blocks' bytes go by ``preadv`` straight into rows of the
caller's preallocated buffer, shards read concurrently by a pool of threads
(``preadv`` and ``zlib.crc32`` release the GIL), each through one file
descriptor, so a shard that a writer replaces meanwhile is read whole from
one version. Arrays of another
layout (compressed chunks) and object stores are read through zarr.
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
import torch

from mukv.errors import StoreError

from .files import Files, disk_error

_NUMPY = {
    torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
    torch.bfloat16: np.uint16,  # bit pattern; see module docstring
}
_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.float64: "float64", torch.bfloat16: "bfloat16"}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype KV of ``dtype`` is stored as."""
    try:
        return np.dtype(_NUMPY[dtype])
    except KeyError:
        raise StoreError(f"KV dtype {dtype} cannot be stored; supported: {sorted(_NAMES.values())}") from None


def dtype_name(dtype: torch.dtype) -> str:
    numpy_dtype(dtype)
    return _NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    for k, v in _NAMES.items():
        if v == name:
            return k
    raise StoreError(f"unknown KV dtype {name!r} in store")


def to_numpy(kv: torch.Tensor) -> np.ndarray:
    """A CPU tensor of KV as the numpy array that is stored (no copy when possible)."""
    if kv.dtype == torch.bfloat16:
        kv = kv.view(torch.int16)
        return kv.numpy().view(np.uint16)
    return kv.numpy()


def from_numpy(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`to_numpy` (shares memory)."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if dtype == torch.bfloat16:
        return t.view(torch.int16).view(torch.bfloat16) if t.dtype == torch.uint16 else t.view(torch.bfloat16)
    return t


def describe_ids(ids: Any, most: int = 8) -> str:
    """Block ids in words: ``0-7, 12, 20-23`` (the first ``most`` runs, then how many more)."""
    ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
    if ids.size == 0:
        return "none"
    runs = np.split(ids, np.flatnonzero(np.diff(ids) != 1) + 1)
    words = [f"{r[0]}" if r.size == 1 else f"{r[0]}-{r[-1]}" for r in runs[:most]]
    if len(runs) > most:
        words.append(f"... ({int(sum(r.size for r in runs[most:]))} more)")
    return ", ".join(words)


def block_crc(rows: np.ndarray) -> np.ndarray:
    """``[n]`` crc32 of each block's bytes (rows of ``[n, ...]``), as int64."""
    flat = np.ascontiguousarray(rows).reshape(rows.shape[0], -1)
    return np.array([zlib.crc32(r) for r in flat.view(np.uint8)], dtype=np.int64)


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


class _ShardFailure(Exception):
    """A shard that cannot be read: its blocks and why."""

    def __init__(self, ids: np.ndarray, cause: BaseException):
        super().__init__(str(cause))
        self.ids = ids
        self.cause = cause


#: bytes one ``preadv`` reads at most (adjacent blocks beyond it go to another reader thread)
_PIECE_BYTES = 8 << 20


def _open_shard(path: Path, g: ShardGeometry) -> tuple[int | None, tuple[np.ndarray, int] | None]:
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


def _plan(g: ShardGeometry, index: tuple[np.ndarray, int], ids: np.ndarray,
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


def _read_shard(path: Path, g: ShardGeometry, ids: np.ndarray, out: np.ndarray, rows: np.ndarray,
                crc: bool) -> np.ndarray:
    """Read blocks ``ids`` of one shard into ``out[rows]`` (one reader thread, one file descriptor, so one
    version of a shard that a writer may replace meanwhile): its index, then each run of adjacent blocks
    in one ``preadv``. Returns ``[n]`` crc32 per id (zeros unless ``crc``)."""
    flat = out.reshape(out.shape[0], -1).view(np.uint8)  # [m, block_bytes]
    crcs = np.zeros(ids.size, dtype=np.int64)
    fd, index = _open_shard(path, g)
    try:
        pieces = [(-1, np.arange(ids.size))] if fd is None else _plan(g, index, ids, np.arange(ids.size))
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


class KVArchive:
    """The zarr arrays of one stream.

    Args:
        files: the store root.
        stream_id: a validated stream id.
        dtype: KV dtype.
        shard_bytes: target bytes per shard.
        read_only: open arrays read-only (a reader beside a writer).
    """

    def __init__(self, files: Files, stream_id: str, dtype: torch.dtype, shard_bytes: int = 64 << 20,
                 read_only: bool = False, chunk_bytes: int = 256 << 10, read_threads: int = 8):
        import zarr  # heavy; only when a disk store is opened
        import zarr.storage

        self._zarr = zarr
        self.files = files
        self.stream_id = stream_id
        self.dtype = dtype
        self.np_dtype = numpy_dtype(dtype)
        self.shard_bytes = shard_bytes
        self.chunk_bytes = chunk_bytes
        self.read_only = read_only
        self.read_threads = read_threads
        #: read shards of local stores directly (False: always through zarr)
        self.direct = True
        self._geometry: dict[str, ShardGeometry | None] = {}
        if files.remote:
            self.store = zarr.storage.ObjectStore(files.object_store)
        else:
            self.store = zarr.storage.LocalStore(str(files.local))
        self._arrays: dict[str, Any] = {}

    #: Folder of the store root that holds the arrays, one subfolder per stream.
    folder = "kv"

    def rel(self, level: str) -> str:
        """Path of a level's array under the store root."""
        return f"{self.folder}/{self.stream_id}/{level}.zarr"

    def levels(self) -> list[str]:
        """Levels with an array on disk."""
        return [n[:-5] for n in self.files.listing(f"{self.folder}/{self.stream_id}") if n.endswith(".zarr")]

    def array(self, level: str, block_shape: tuple[int, ...] | None = None, create: bool = False):
        """The level's array (opened once); created with ``block_shape`` if missing and ``create``."""
        arr = self._arrays.get(level)
        if arr is not None:
            return arr
        zarr = self._zarr
        try:
            arr = zarr.open_array(store=self.store, path=self.rel(level), mode="r" if self.read_only else "r+")
        except Exception as exc:  # zarr raises FileNotFoundError or its own *NotFoundError
            if isinstance(exc, (FileNotFoundError, KeyError)) or type(exc).__name__.endswith("NotFoundError"):
                arr = None
            else:
                raise StoreError(f"{self.files.uri(self.rel(level))}: cannot open KV array ({exc})") from None
        if arr is None:
            if not create or block_shape is None or self.read_only:
                return None
            block_bytes = int(np.prod(block_shape)) * self.np_dtype.itemsize
            per_chunk = max(1, min(self.chunk_bytes, self.shard_bytes) // max(1, block_bytes))
            per_shard = per_chunk * max(1, self.shard_bytes // (per_chunk * max(1, block_bytes)))
            try:
                arr = zarr.create_array(
                    store=self.store, name=self.rel(level), shape=(0, *block_shape),
                    chunks=(per_chunk, *block_shape), shards=(per_shard, *block_shape), dtype=self.np_dtype,
                    fill_value=0, compressors=None,
                    attributes={"mukv_dtype": dtype_name(self.dtype), "blocks_per_chunk": per_chunk,
                                "blocks_per_shard": per_shard},
                )
            except OSError as exc:
                raise disk_error(exc, f"creating {self.rel(level)}") from None
        else:
            stored = arr.attrs.get("mukv_dtype")
            if stored != dtype_name(self.dtype):
                raise StoreError(f"{self.rel(level)}: stores {stored} KV; this session uses {dtype_name(self.dtype)}")
            if block_shape is not None and tuple(arr.shape[1:]) != tuple(block_shape):
                raise StoreError(
                    f"{self.rel(level)}: blocks of shape {tuple(arr.shape[1:])} stored; got {tuple(block_shape)}")
        self._arrays[level] = arr
        return arr

    def forget(self) -> None:
        """Drop the opened arrays, so the next use reads their metadata (length) again (readers)."""
        self._arrays.clear()
        self._geometry.clear()

    def length(self, level: str) -> int:
        arr = self.array(level)
        return 0 if arr is None else int(arr.shape[0])

    def write(self, level: str, first: int, rows: np.ndarray) -> None:
        """Write blocks ``first .. first + n`` (``rows [n, Y, 2, H, K, D]`` in the stored dtype)."""
        arr = self.array(level, tuple(rows.shape[1:]), create=True)
        end = first + rows.shape[0]
        try:
            if arr.shape[0] < end:
                arr.resize((end, *arr.shape[1:]))
            arr[first:end] = rows
        except OSError as exc:
            raise disk_error(exc, f"writing KV of {level} blocks {first}..{end - 1}") from None

    def read(self, level: str, ids: np.ndarray) -> np.ndarray:
        """``[n, Y, 2, H, K, D]`` stored rows of ``ids`` (any order, repeats allowed), one batched read."""
        arr = self._existing(level)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        uniq, inverse = np.unique(ids, return_inverse=True)
        data = np.empty((uniq.size, *arr.shape[1:]), dtype=self.np_dtype)
        self.read_into(level, uniq, data)
        return data if np.array_equal(uniq, ids) else data[inverse.reshape(-1)]

    def read_into(self, level: str, ids: np.ndarray, out: np.ndarray, rows: np.ndarray | None = None,
                  crc: bool = False) -> np.ndarray | None:
        """Read blocks ``ids`` straight into rows of a preallocated buffer (page-in).

        Local stores written by mukv are read shard by shard from a pool of
        threads, ``preadv`` into ``out`` with no copy in between; other arrays
        and object stores through zarr.

        Args:
            level: the level.
            ids: ``[n]`` distinct block ids, any order.
            out: ``[m, Y, 2, H, K, D]`` C-contiguous buffer of the stored dtype
                (bf16 KV as its ``uint16`` view, see :func:`to_numpy`).
            rows: ``[n]`` the row of ``out`` that receives each id (``None``: ``0 .. n - 1``).
            crc: also return the crc32 of each block's bytes (computed by the reader threads).

        Returns:
            ``[n]`` int64 crc32 per id if ``crc``, else ``None``.

        Raises:
            StoreError: ids beyond the stored blocks, or blocks that cannot be read (named, with why).
        """
        arr = self._existing(level)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        rows = np.arange(ids.size, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size != ids.size or not out.flags.c_contiguous or out.dtype != self.np_dtype \
                or tuple(out.shape[1:]) != tuple(arr.shape[1:]):
            raise ValueError(f"read_into: {ids.size} ids into rows {rows.size} of a buffer {out.dtype}{out.shape}; "
                             f"blocks are {self.np_dtype}{tuple(arr.shape[1:])}")
        if ids.size == 0:
            return np.empty(0, dtype=np.int64) if crc else None
        if int(ids.min()) < 0 or int(ids.max()) >= arr.shape[0]:
            raise StoreError(f"{self.files.uri(self.rel(level))}: {level} blocks {describe_ids(ids)} asked for, "
                             f"{arr.shape[0]} have KV on disk")
        geometry = self.geometry(level, arr) if self.direct else None
        if geometry is not None:
            return self._read_direct(level, geometry, ids, out, rows, crc)
        return self._read_zarr(level, arr, ids, out, rows, crc)

    def _existing(self, level: str):
        arr = self.array(level)
        if arr is None:
            raise StoreError(f"{self.rel(level)}: no KV stored for level {level!r}")
        return arr

    def geometry(self, level: str, arr: Any = None) -> ShardGeometry | None:
        """The level's :class:`ShardGeometry` if its shards can be read directly (local stores)."""
        if self.files.remote:
            return None
        if level not in self._geometry:
            arr = self.array(level) if arr is None else arr
            self._geometry[level] = None if arr is None else ShardGeometry.of(arr)
        return self._geometry[level]

    def locate(self, level: str, ids: np.ndarray) -> list[tuple[Path, int, int]] | None:
        """Where the bytes of blocks ``ids`` are: ``(shard file, offset, bytes)`` per run of blocks adjacent
        in a file (what :meth:`read_into` reads), or ``None`` for arrays read through zarr. Blocks of chunks
        never written (all fill value) have no bytes and are left out."""
        g = self.geometry(level)
        if g is None:
            return None
        root = self.files.local / self.rel(level)
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        out = []
        for s in np.unique(ids // g.per_shard).tolist():
            path = root / g.key(s)
            fd, index = _open_shard(path, g)
            if fd is None:
                continue
            os.close(fd)
            sel = ids[ids // g.per_shard == s]
            out += [(path, offset, pos.size * g.block_bytes)
                    for offset, pos in _plan(g, index, sel, np.arange(sel.size)) if offset >= 0]
        return out

    def _fail(self, level: str, bad: np.ndarray, asked: np.ndarray, cause: BaseException) -> StoreError:
        if isinstance(cause, StoreError):
            what = str(cause)
        elif isinstance(cause, OSError):
            what = str(disk_error(cause, "reading KV"))
        else:
            what = f"{type(cause).__name__}: {cause}"
        bad = np.unique(bad)
        also = "" if bad.size == np.unique(asked).size else f" (of {describe_ids(asked)} asked for)"
        return StoreError(f"{self.files.uri(self.rel(level))}: cannot read KV of {level} blocks {describe_ids(bad)}"
                          f"{also} ({what}); run `mukv inspect --verify` to see what is damaged")

    # -- direct reads of mukv's shards ----------------------------------------------------------
    def _read_direct(self, level: str, g: ShardGeometry, ids: np.ndarray, out: np.ndarray, rows: np.ndarray,
                     crc: bool) -> np.ndarray | None:
        """Group ``ids`` by shard and read the shards concurrently on the reader pool (:func:`_read_shard`)."""
        pool = reader_pool(self.read_threads)
        root = self.files.local / self.rel(level)
        order = np.argsort(ids, kind="stable")
        shard = ids[order] // g.per_shard
        cut = (np.flatnonzero(np.diff(shard)) + 1).tolist()
        groups = [order[a:b] for a, b in zip([0, *cut], [*cut, order.size])]
        reads = [(grp, pool.submit(_read_shard, root / g.key(int(ids[grp[0]] // g.per_shard)), g, ids[grp], out,
                                   rows[grp], crc)) for grp in groups]
        crcs = np.zeros(ids.size, dtype=np.int64)
        failures: list[_ShardFailure] = []
        for grp, fut in reads:  # wait for every shard, so that nothing writes into out after we return
            try:
                got = fut.result()
            except Exception as exc:  # noqa: BLE001 - named with its blocks below
                failures.append(_ShardFailure(ids[grp], exc))
                continue
            crcs[grp] = got
        if failures:
            raise self._fail(level, np.concatenate([f.ids for f in failures]), ids, failures[0].cause)
        return crcs if crc else None

    # -- reads through zarr (object stores, other layouts) ------------------------------------
    def _read_zarr(self, level: str, arr: Any, ids: np.ndarray, out: np.ndarray, rows: np.ndarray,
                   crc: bool) -> np.ndarray | None:
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        # one slice per run of consecutive ids (zarr's orthogonal indexing is ~10x slower per block)
        cut = np.flatnonzero(np.diff(sorted_ids) != 1) + 1
        bounds = list(zip([0, *cut.tolist()], [*cut.tolist(), ids.size]))
        try:
            parts = self._read_runs(arr, [(int(sorted_ids[a]), int(sorted_ids[b - 1]) + 1) for a, b in bounds])
        except StoreError:
            raise
        except Exception as exc:  # an I/O error, or a damaged shard (zarr: checksum / decode errors)
            raise self._fail(level, self._unreadable(arr, np.unique(ids)), ids, exc) from None
        for (a, b), data in zip(bounds, parts):
            out[rows[order[a:b]]] = data
        if not crc:
            return None
        flat = out.reshape(out.shape[0], -1).view(np.uint8)
        return np.array([zlib.crc32(flat[r]) for r in rows.tolist()], dtype=np.int64)

    @staticmethod
    def _unreadable(arr, ids: np.ndarray, most: int = 64) -> np.ndarray:
        """Which of ``ids`` cannot be read, block by block (all of them past ``most`` ids)."""
        if ids.size > most:
            return ids
        bad = []
        for i in ids.tolist():
            try:
                np.asarray(arr[i : i + 1])
            except Exception:  # noqa: BLE001
                bad.append(i)
        return np.asarray(bad or ids, dtype=np.int64)

    @staticmethod
    def _read_runs(arr, runs: list[tuple[int, int]]) -> list[np.ndarray]:
        """Read slices concurrently through zarr's async API (sequentially if it is not there)."""
        aarr = getattr(arr, "_async_array", None)
        if aarr is not None and len(runs) > 1:
            try:
                import asyncio

                from zarr.core.sync import sync

                async def gather():
                    return await asyncio.gather(*(aarr.getitem(slice(a, b)) for a, b in runs))

                return [np.asarray(x) for x in sync(gather())]
            except (ImportError, AttributeError, TypeError):
                pass
        return [np.asarray(arr[a:b]) for a, b in runs]

    def truncate(self, level: str, n: int) -> None:
        """Drop rows from ``n`` on (crash recovery: rows never committed to the index)."""
        arr = self.array(level)
        if arr is not None and arr.shape[0] > n:
            arr.resize((n, *arr.shape[1:]))
        self._geometry.pop(level, None)

    def nbytes_stored(self) -> int:
        """Bytes of the stream's KV files (local stores; 0 for object stores)."""
        if self.files.remote:
            return 0
        root = self.files.local / self.folder / self.stream_id
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0

    def remove_partials(self) -> int:
        """Delete temp files a killed writer left behind (local stores). Returns how many."""
        if self.files.remote:
            return 0
        root = self.files.local / self.folder / self.stream_id
        n = 0
        if root.exists():
            for p in root.rglob("*.partial"):
                try:
                    p.unlink()
                    n += 1
                except OSError:
                    pass
        return n
