"""KV bytes on disk: sharded zarr arrays per stream and level, one per KV codec the level was written with.

``kv/<stream>/<level>.zarr`` holds blocks from 0 on: row ``i`` is block ``i``
of that level. A chunk holds as many blocks as fit in about ``chunk_bytes``
(one segment block of a real model, a few dozen patch blocks: zarr's cost is
per chunk, and reading a block reads its chunk); a shard holds many chunks
(about ``shard_bytes``), so a week-long stream keeps a few thousand files,
not millions.

**Codecs.** What a row holds is the business of the KV codec
(:class:`~mukv.interfaces.KVCodec`) the array was written with, recorded in
the array's attributes:

* "none" (and every array written before codecs existed): shape
  ``[N, Y, 2, H, K, D]`` of the KV dtype; zarr has no bfloat16, so bf16 KV is
  stored as its ``uint16`` bit pattern, with the attribute ``mukv_dtype =
  "bfloat16"`` (other dtypes as themselves);
* any other codec: shape ``[N, S]`` uint8, with ``mukv_codec`` (the codec's
  name, layout version and settings), ``mukv_block_shape`` (``[Y, 2, H, K, D]``),
  ``mukv_kv_dtype``, and ``mukv_dtype = "<dtype>+<codec>"`` (so that a mukv from
  before codecs refuses the array instead of misreading it).

The codec is recorded **per array**, and a level may have several: when a
session writes with another codec than the level's last array (the
``kv_codec`` setting changed between sessions), a new array
``<level>@<first>.zarr`` starts at the next block id. Each array is read with
its own codec (:class:`KVPart`), so a stream keeps opening whatever the
session's setting is, and stores written before codecs open unchanged.

zarr's local store writes every object through a temp file and a rename, and
an object-store PUT is atomic, so a shard on disk is always some complete
version: a crash can lose an unfinished write, never damage blocks written
before it. Rows beyond what the index has committed are cut off when a writer
reopens the stream (:meth:`KVArchive.truncate`; arrays starting beyond them are
deleted).

Page-in reads the shards of a local store directly (:mod:`.shards`); arrays
of another layout (compressed chunks) and object stores are read through zarr.
"""

from __future__ import annotations

import os
import re
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mukv.errors import ConfigError, StoreError
from mukv.interfaces import KVCodec
from mukv.kvcodec import codec_from_record, none_codec

from .files import Files, disk_error, tree_bytes
from .shards import ShardFailure, ShardGeometry, open_shard, plan_reads, read_shard, reader_pool

__all__ = ["KVArchive", "ShardGeometry", "block_crc", "describe_ids", "dtype_from_name", "dtype_name", "from_numpy",
           "numpy_dtype", "to_numpy"]

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


#: a level's array: ``<level>.zarr`` holds blocks from 0 on, ``<level>@<first>.zarr`` from ``first`` on
_PART_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]{0,63})(?:@([1-9][0-9]{0,17}))?\.zarr$")


def row_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype a codec's rows of ``dtype`` are stored as (uint8 bytes, or KV of a float dtype)."""
    return np.dtype(np.uint8) if dtype == torch.uint8 else numpy_dtype(dtype)


@dataclass
class KVPart:
    """One zarr array of a level: blocks ``first .. first + length - 1``, all written with one codec.

    Attributes:
        level: the level.
        first: the id of its row 0.
        rel: its path under the store root.
        array: the zarr array ``[n, *row_shape]``.
        codec: the codec that reads its rows (built from the array's record).
        block_shape: ``(Y, 2, H, K, D)`` of a decoded block.
        row_shape: shape of one stored row (the block shape for "none", ``(S,)`` for a byte codec).
        row_dtype: torch dtype of the rows (the KV dtype for "none", ``uint8`` otherwise).
    """

    level: str
    first: int
    rel: str
    array: Any
    codec: KVCodec
    block_shape: tuple[int, ...]
    row_shape: tuple[int, ...]
    row_dtype: torch.dtype
    geometry: ShardGeometry | None = None
    geometry_known: bool = False

    @property
    def length(self) -> int:
        return int(self.array.shape[0])

    @property
    def end(self) -> int:
        return self.first + self.length

    @property
    def np_dtype(self) -> np.dtype:
        return row_numpy_dtype(self.row_dtype)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * self.np_dtype.itemsize


def _open_part(archive: "KVArchive", level: str, first: int, rel: str) -> KVPart | None:
    """The part at ``rel`` (``None`` if there is no array); its attributes are checked against the session."""
    zarr, where = archive._zarr, archive.files.uri(rel)
    try:
        arr = zarr.open_array(store=archive.store, path=rel, mode="r" if archive.read_only else "r+")
    except Exception as exc:  # zarr raises FileNotFoundError or its own *NotFoundError
        if isinstance(exc, (FileNotFoundError, KeyError)) or type(exc).__name__.endswith("NotFoundError"):
            return None
        raise StoreError(f"{where}: cannot open KV array ({exc})") from None
    attrs, mine = arr.attrs, dtype_name(archive.dtype)
    record = attrs.get("mukv_codec")
    if record is None:  # KV as it is: every array written before codecs, and "none" arrays since
        if attrs.get("mukv_dtype") != mine:
            raise StoreError(f"{where}: stores {attrs.get('mukv_dtype')} KV; this session uses {mine}")
        shape = tuple(int(s) for s in arr.shape[1:])
        return KVPart(level, first, rel, arr, none_codec(), shape, shape, archive.dtype)
    codec = codec_from_record(record, where)
    if attrs.get("mukv_kv_dtype") != mine:
        raise StoreError(f"{where}: stores {attrs.get('mukv_kv_dtype')} KV; this session uses {mine}")
    block = attrs.get("mukv_block_shape")
    if not isinstance(block, list) or len(block) != 5 or not all(isinstance(s, int) and s > 0 for s in block):
        raise StoreError(f"{where}: invalid block shape {block!r} in its attributes")
    try:
        row_shape, row_dtype = codec.row_layout(tuple(block), archive.dtype)
    except ConfigError as exc:
        raise StoreError(f"{where}: its codec cannot store blocks of shape {tuple(block)} ({exc})") from None
    if tuple(arr.shape[1:]) != tuple(row_shape) or arr.dtype != row_numpy_dtype(row_dtype):
        raise StoreError(f"{where}: rows of {arr.dtype}{tuple(arr.shape[1:])} stored; codec {codec.name!r} "
                         f"writes {row_numpy_dtype(row_dtype)}{tuple(row_shape)} for blocks {tuple(block)}")
    return KVPart(level, first, rel, arr, codec, tuple(block), tuple(row_shape), row_dtype)


def _create_part(archive: "KVArchive", level: str, first: int, block_shape: tuple[int, ...],
                 replace: bool) -> KVPart:
    """A new empty part for blocks from ``first`` on, written with the archive's codec."""
    codec, rel = archive.codec, archive.rel(level, first)
    row_shape, row_dtype = codec.row_layout(tuple(block_shape), archive.dtype)
    np_dtype = row_numpy_dtype(row_dtype)
    row_bytes = int(np.prod(row_shape)) * np_dtype.itemsize
    per_chunk = max(1, min(archive.chunk_bytes, archive.shard_bytes) // max(1, row_bytes))
    per_shard = per_chunk * max(1, archive.shard_bytes // (per_chunk * max(1, row_bytes)))
    attrs: dict[str, Any] = {"mukv_dtype": dtype_name(archive.dtype), "blocks_per_chunk": per_chunk,
                             "blocks_per_shard": per_shard}
    if codec.name != "none":
        # "<dtype>+<codec>": a mukv from before codecs refuses the array instead of misreading its bytes
        attrs.update({"mukv_dtype": f"{dtype_name(archive.dtype)}+{codec.name}",
                      "mukv_kv_dtype": dtype_name(archive.dtype), "mukv_codec": codec.record(),
                      "mukv_block_shape": [int(s) for s in block_shape]})
    try:
        arr = archive._zarr.create_array(
            store=archive.store, name=rel, shape=(0, *row_shape), chunks=(per_chunk, *row_shape),
            shards=(per_shard, *row_shape), dtype=np_dtype, fill_value=0, compressors=None, attributes=attrs,
            overwrite=replace)
    except OSError as exc:
        raise disk_error(exc, f"creating {rel}") from None
    return KVPart(level, first, rel, arr, codec, tuple(block_shape), tuple(row_shape), row_dtype)


class KVArchive:
    """The zarr arrays of one stream: per level, one or more parts (see the module docstring).

    Args:
        files: the store root.
        stream_id: a validated stream id.
        dtype: KV dtype.
        shard_bytes: target bytes per shard.
        read_only: open arrays read-only (a reader beside a writer).
        chunk_bytes: target bytes per chunk.
        read_threads: reader threads of page-in.
        codec: the codec new blocks are written with (default "none"); a level whose last part
            has another codec gets a new part.
    """

    def __init__(self, files: Files, stream_id: str, dtype: torch.dtype, shard_bytes: int = 64 << 20,
                 read_only: bool = False, chunk_bytes: int = 256 << 10, read_threads: int = 8,
                 codec: KVCodec | None = None):
        import zarr  # heavy; only when a disk store is opened
        import zarr.storage

        self._zarr = zarr
        self.files = files
        self.stream_id = stream_id
        self.dtype = dtype
        self.np_dtype = numpy_dtype(dtype)
        self.codec = codec if codec is not None else none_codec()
        self.shard_bytes = shard_bytes
        self.chunk_bytes = chunk_bytes
        self.read_only = read_only
        self.read_threads = read_threads
        #: read shards of local stores directly (False: always through zarr)
        self.direct = True
        if files.remote:
            self.store = zarr.storage.ObjectStore(files.object_store)
        else:
            self.store = zarr.storage.LocalStore(str(files.local))
        self._parts: dict[str, list[KVPart]] = {}
        self._lock = threading.RLock()  # the writer thread adds parts while questions read them

    #: Folder of the store root that holds the arrays, one subfolder per stream.
    folder = "kv"

    # -- parts ------------------------------------------------------------------------------------
    def rel(self, level: str, first: int = 0) -> str:
        """Path of a level's part starting at block ``first`` (0: the level's first array)."""
        base = f"{self.folder}/{self.stream_id}/{level}"
        return f"{base}.zarr" if first == 0 else f"{base}@{first}.zarr"

    def _listing(self) -> dict[str, list[tuple[int, str]]]:
        out: dict[str, list[tuple[int, str]]] = {}
        for name in self.files.listing(f"{self.folder}/{self.stream_id}"):
            m = _PART_NAME.fullmatch(name)
            if m:
                first = int(m.group(2) or 0)
                out.setdefault(m.group(1), []).append((first, self.rel(m.group(1), first)))
        return out

    def levels(self) -> list[str]:
        """Levels with an array on disk."""
        return sorted(self._listing())

    def parts(self, level: str) -> list[KVPart]:
        """The level's parts, by first block (opened once; :meth:`forget` to look again).

        Raises:
            StoreError: an array that this session cannot read (another dtype, an unknown codec, attributes
                that do not match its rows).
        """
        with self._lock:
            got = self._parts.get(level)
            if got is None:
                found = sorted(self._listing().get(level, []))
                got = [p for p in (_open_part(self, level, first, rel) for first, rel in found) if p is not None]
                self._parts[level] = got
            return list(got)

    def part_of(self, level: str, block: int) -> KVPart | None:
        """The part holding block ``block`` (``None`` if none does)."""
        for p in reversed(self.parts(level)):
            if p.first <= block < p.end:
                return p
        return None

    def array(self, level: str):
        """The zarr array of the level's first part (``None`` if the level has none)."""
        parts = self.parts(level)
        return parts[0].array if parts else None

    def forget(self) -> None:
        """Drop the opened arrays, so the next use reads their metadata (length, new parts) again (readers)."""
        with self._lock:
            self._parts.clear()

    def length(self, level: str) -> int:
        """One past the last block with KV on disk (the end of the level's last part)."""
        parts = self.parts(level)
        return max((p.end for p in parts), default=0)

    def stored_bytes(self, level: str, n: int, block_shape: tuple[int, ...] | None = None) -> int:
        """Bytes that blocks ``0 .. n - 1`` of ``level`` take as stored: each part's rows, and for blocks not
        on disk yet (``block_shape`` given) the rows of the write codec."""
        total, covered = 0, 0
        for p in self.parts(level):
            k = max(0, min(p.end, n) - p.first)
            total += k * p.row_bytes
            covered = max(covered, p.first + k)
        if n > covered and block_shape is not None:
            shape, dtype = self.codec.row_layout(tuple(block_shape), self.dtype)
            total += (n - covered) * int(np.prod(shape)) * row_numpy_dtype(dtype).itemsize
        return total

    # -- writing ----------------------------------------------------------------------------------
    def write(self, level: str, first: int, rows: np.ndarray, block_shape: tuple[int, ...] | None = None) -> None:
        """Write blocks ``first .. first + n`` (``rows [n, *row_shape]``, the write codec's rows as numpy:
        the KV itself for "none", bf16 as its uint16 bits). A level whose last part has another codec
        gets a new part from ``first`` on.

        Args:
            block_shape: ``(Y, 2, H, K, D)`` of the decoded blocks (needed to start a part of a byte codec;
                for "none" it is the rows' shape).
        """
        with self._lock:
            parts = self.parts(level)
            last = parts[-1] if parts else None
            if last is None or (last.length == 0 and last.first != first) or \
                    (last.codec is not self.codec and last.codec.record() != self.codec.record()):
                if last is not None and last.length and last.end != first:
                    raise StoreError(f"{self.files.uri(self.rel(level))}: KV of {level} blocks {first}.. would "
                                     f"leave a gap after block {last.end - 1}")
                shape = tuple(block_shape) if block_shape is not None else tuple(rows.shape[1:])
                replace = last is not None and last.length == 0 and last.first == first
                if last is not None and last.length == 0 and not replace:
                    self._delete(last)
                    parts = parts[:-1]
                part = _create_part(self, level, first, shape, replace)
                self._parts[level] = [p for p in parts if p.rel != part.rel] + [part]
            else:
                part = last
            start, end = first - part.first, first - part.first + rows.shape[0]
            if start < 0 or start > part.length:
                raise StoreError(f"{self.files.uri(part.rel)}: KV of {level} blocks {first}.. would leave a gap "
                                 f"after block {part.end - 1}")
            if tuple(rows.shape[1:]) != part.row_shape or rows.dtype != part.np_dtype:
                raise StoreError(f"{self.files.uri(part.rel)}: rows of {rows.dtype}{tuple(rows.shape[1:])} given; "
                                 f"the part stores {part.np_dtype}{part.row_shape}")
            arr = part.array
            try:
                if arr.shape[0] < end:
                    arr.resize((end, *arr.shape[1:]))
                arr[start:end] = rows
            except OSError as exc:
                raise disk_error(exc, f"writing KV of {level} blocks {first}..{first + rows.shape[0] - 1}") from None

    def truncate(self, level: str, n: int) -> None:
        """Drop blocks from ``n`` on (crash recovery: rows never committed to the index): later parts are
        deleted, the part holding ``n`` is cut."""
        with self._lock:
            for p in self.parts(level):
                if p.first >= n and p.first > 0:
                    self._delete(p)
                elif p.end > n:
                    p.array.resize((n - p.first, *p.array.shape[1:]))
            self._parts.pop(level, None)

    def _delete(self, part: KVPart) -> None:
        from zarr.core.sync import sync

        try:
            sync(self.store.delete_dir(part.rel))
        except OSError as exc:
            raise disk_error(exc, f"deleting {part.rel}") from None
        with self._lock:
            if part.level in self._parts:
                self._parts[part.level] = [p for p in self._parts[part.level] if p.rel != part.rel]

    # -- reading ----------------------------------------------------------------------------------
    def split(self, level: str, ids: np.ndarray) -> list[tuple[KVPart, np.ndarray]]:
        """``ids`` grouped by the part that holds them: ``(part, positions in ids)``, parts in block order.

        Raises:
            StoreError: ids that no part holds (naming them).
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        parts = [p for p in self.parts(level) if p.length]
        if not parts:
            if ids.size:
                raise StoreError(f"{self.rel(level)}: no KV stored for level {level!r}")
            return []
        firsts = np.array([p.first for p in parts], dtype=np.int64)
        which = np.searchsorted(firsts, ids, side="right") - 1
        ends = np.array([p.end for p in parts], dtype=np.int64)
        bad = (which < 0) | (ids >= ends[np.clip(which, 0, None)])
        if bad.any():
            raise StoreError(f"{self.files.uri(self.rel(level))}: {level} blocks {describe_ids(ids)} asked for, "
                             f"{self.length(level)} have KV on disk")
        return [(parts[j], np.flatnonzero(which == j)) for j in np.unique(which).tolist()]

    def read(self, level: str, ids: np.ndarray) -> np.ndarray:
        """``[n, *row_shape]`` stored rows of ``ids`` (any order, repeats allowed), one batched read; the
        ids must lie in parts of one row layout."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        parts = [p for p in self.parts(level) if p.length]
        if not parts:
            raise StoreError(f"{self.rel(level)}: no KV stored for level {level!r}")
        uniq, inverse = np.unique(ids, return_inverse=True)
        groups = self.split(level, uniq)
        like = groups[0][0] if groups else parts[0]
        data = np.empty((uniq.size, *like.row_shape), dtype=like.np_dtype)
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
            ids: ``[n]`` distinct block ids, any order, in parts of one row layout (:meth:`split` groups
                them by part).
            out: ``[m, *row_shape]`` C-contiguous buffer of the parts' stored dtype (bf16 KV as its
                ``uint16`` view, see :func:`to_numpy`; a byte codec's rows as uint8).
            rows: ``[n]`` the row of ``out`` that receives each id (``None``: ``0 .. n - 1``).
            crc: also return the crc32 of each block's bytes (computed by the reader threads).

        Returns:
            ``[n]`` int64 crc32 per id if ``crc``, else ``None``.

        Raises:
            StoreError: ids beyond the stored blocks, or blocks that cannot be read (named, with why).
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        rows = np.arange(ids.size, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        groups = self.split(level, ids)
        layout = {(p.row_shape, p.np_dtype) for p, _ in groups}
        if rows.size != ids.size or not out.flags.c_contiguous or len(layout) > 1 or \
                any(tuple(out.shape[1:]) != s or out.dtype != d for s, d in layout):
            raise ValueError(f"read_into: {ids.size} ids into rows {rows.size} of a buffer {out.dtype}{out.shape}; "
                             f"blocks are {', '.join(f'{d}{s}' for s, d in layout)}")
        if ids.size == 0:
            return np.empty(0, dtype=np.int64) if crc else None
        crcs = np.zeros(ids.size, dtype=np.int64)
        for part, pos in groups:
            got = self._read_part(part, ids[pos], out, rows[pos], crc)
            if crc:
                crcs[pos] = got
        return crcs if crc else None

    def geometry(self, level: str, part: KVPart | None = None) -> ShardGeometry | None:
        """The :class:`ShardGeometry` of a part (default: the level's first) if its shards can be read
        directly (local stores)."""
        if part is None:
            parts = self.parts(level)
            if not parts:
                return None
            part = parts[0]
        if self.files.remote:
            return None
        if not part.geometry_known:
            part.geometry, part.geometry_known = ShardGeometry.of(part.array), True
        return part.geometry

    def locate(self, level: str, ids: np.ndarray) -> list[tuple[Path, int, int]] | None:
        """Where the bytes of blocks ``ids`` are: ``(shard file, offset, bytes)`` per run of blocks adjacent
        in a file (what :meth:`read_into` reads), or ``None`` if some are read through zarr. Blocks of chunks
        never written (all fill value) have no bytes and are left out."""
        out = []
        for part, pos in self.split(level, np.unique(np.asarray(ids, dtype=np.int64))):
            g = self.geometry(level, part)
            if g is None:
                return None
            root = self.files.local / part.rel
            local = np.unique(np.asarray(ids, dtype=np.int64))[pos] - part.first
            for s in np.unique(local // g.per_shard).tolist():
                path = root / g.key(s)
                fd, index = open_shard(path, g)
                if fd is None:
                    continue
                os.close(fd)
                sel = local[local // g.per_shard == s]
                out += [(path, offset, p.size * g.block_bytes)
                        for offset, p in plan_reads(g, index, sel, np.arange(sel.size)) if offset >= 0]
        return out

    def _read_part(self, part: KVPart, ids: np.ndarray, out: np.ndarray, rows: np.ndarray,
                   crc: bool) -> np.ndarray | None:
        local = ids - part.first
        g = self.geometry(part.level, part) if self.direct else None
        try:
            if g is not None:
                return _read_direct(reader_pool(self.read_threads), self.files.local / part.rel, g, local, out,
                                    rows, crc)
            return _read_zarr(part.array, local, out, rows, crc)
        except ShardFailure as exc:
            raise self._fail(part, exc.ids + part.first, ids, exc.cause) from None

    def _fail(self, part: KVPart, bad: np.ndarray, asked: np.ndarray, cause: BaseException) -> StoreError:
        if isinstance(cause, StoreError):
            what = str(cause)
        elif isinstance(cause, OSError):
            what = str(disk_error(cause, "reading KV"))
        else:
            what = f"{type(cause).__name__}: {cause}"
        bad = np.unique(bad)
        also = "" if bad.size == np.unique(asked).size else f" (of {describe_ids(asked)} asked for)"
        return StoreError(f"{self.files.uri(part.rel)}: cannot read KV of {part.level} blocks {describe_ids(bad)}"
                          f"{also} ({what}); run `mukv inspect --verify` to see what is damaged")

    # -- files ------------------------------------------------------------------------------------
    def nbytes_stored(self) -> int:
        """Bytes of the stream's KV files (local stores; 0 for object stores)."""
        if self.files.remote:
            return 0
        return tree_bytes(self.files.local / self.folder / self.stream_id)

    def remove_partials(self) -> int:
        """Delete temp files a killed writer left behind (local stores). Returns how many."""
        if self.files.remote:
            return 0
        root = self.files.local / self.folder / self.stream_id
        n = 0
        for folder, _dirs, names in os.walk(root):
            for name in names:
                if name.endswith(".partial"):
                    try:
                        os.unlink(os.path.join(folder, name))
                        n += 1
                    except OSError:
                        pass
        return n


# ------------------------------------------------------------------------------ reading one part
def _read_direct(pool: Any, root: Path, g: ShardGeometry, ids: np.ndarray, out: np.ndarray, rows: np.ndarray,
                 crc: bool) -> np.ndarray | None:
    """Group ``ids`` (of one part) by shard and read the shards concurrently on the reader pool
    (:func:`~.shards.read_shard`). Raises :class:`ShardFailure` naming every block that failed."""
    order = np.argsort(ids, kind="stable")
    shard = ids[order] // g.per_shard
    cut = (np.flatnonzero(np.diff(shard)) + 1).tolist()
    groups = [order[a:b] for a, b in zip([0, *cut], [*cut, order.size])]
    reads = [(grp, pool.submit(read_shard, root / g.key(int(ids[grp[0]] // g.per_shard)), g, ids[grp], out,
                               rows[grp], crc)) for grp in groups]
    crcs = np.zeros(ids.size, dtype=np.int64)
    failures: list[ShardFailure] = []
    for grp, fut in reads:  # wait for every shard, so that nothing writes into out after we return
        try:
            got = fut.result()
        except Exception as exc:  # noqa: BLE001 - named with its blocks below
            failures.append(ShardFailure(ids[grp], exc))
            continue
        crcs[grp] = got
    if failures:
        raise ShardFailure(np.concatenate([f.ids for f in failures]), failures[0].cause)
    return crcs if crc else None


def _read_zarr(arr: Any, ids: np.ndarray, out: np.ndarray, rows: np.ndarray, crc: bool) -> np.ndarray | None:
    """Read ``ids`` of one part through zarr (object stores, other layouts), one slice per run of ids."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    # one slice per run of consecutive ids (zarr's orthogonal indexing is ~10x slower per block)
    cut = np.flatnonzero(np.diff(sorted_ids) != 1) + 1
    bounds = list(zip([0, *cut.tolist()], [*cut.tolist(), ids.size]))
    try:
        parts = _read_runs(arr, [(int(sorted_ids[a]), int(sorted_ids[b - 1]) + 1) for a, b in bounds])
    except StoreError:
        raise
    except Exception as exc:  # an I/O error, or a damaged shard (zarr: checksum / decode errors)
        raise ShardFailure(_unreadable(arr, np.unique(ids)), exc) from None
    for (a, b), data in zip(bounds, parts):
        out[rows[order[a:b]]] = data
    if not crc:
        return None
    flat = out.reshape(out.shape[0], -1).view(np.uint8)
    return np.array([zlib.crc32(flat[r]) for r in rows.tolist()], dtype=np.int64)


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
