"""The ``lancedb`` storage backend: a hot tier in fast memory over a disk tier.

    s = mukv.Session(model=..., backend="lancedb", path="/data/cam1.mukv",
                     stream_id="cam1", backend_options={"hot_bytes": 2 << 30})

* **Hot tier** (:mod:`.hot`): a preallocated budget of GPU memory (CUDA) or
  RAM holding recent and recently retrieved blocks; the eviction policy is a
  plugin (default: least recently retrieved segment first).
* **Disk tier**: KV in sharded zarr arrays (:mod:`.zarr_kv`), vectors and
  metadata in a lancedb table (:mod:`.lance_index`), on a local folder or an
  ``s3://`` URI.
* **Offload** (:mod:`.writer`): a background thread commits each batch:
  KV first, then its index rows, then the stream's state file. ``feed`` never
  waits for disk unless the writer falls ``max_pending_bytes`` behind.
* **Page-in**: ``load_kv`` (called once per question with the final
  selection) reads the missing blocks of a level in one batch, grouped by
  shard and read concurrently straight into the output, checks their crc32
  against the index rows the search already returned, and admits them into
  the hot tier.
* **Search**: hot blocks by a matmul over the hot tier's vectors, blocks on
  disk through lancedb (exact, or IVF_PQ once the table is large); the union
  is re-scored exactly and merged.

A block counts as stored once its stream state (written after its KV and
rows) counts it. On opening a stream for writing, whatever a killed writer
left beyond that is removed; a reader opened beside a writer sees the state
as of its opening (:meth:`TieredBackend.refresh` to catch up).
"""

from __future__ import annotations

import atexit
import json
import re
import shutil
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mukv.blocks import CompressedBlocks, KVLayout
from mukv.errors import RetrievalError, StoreError
from mukv.interfaces import EvictionPolicy, KVCodec, StorageBackend
from mukv.kvcodec import codec_or_none
from mukv.malloc import pin_mmap_threshold
from mukv.state import validate_values

from .files import FORMAT, FORMAT_VERSION, Files, WriterLock, check_level, check_stream_id, disk_error
from .state_file import read_state, validate_manifest
from .hot import BlockInfo, HotTier
from .lease import LeaseHeld, StreamLease
from .options import TieredOptions
from .pagein import hot_form
from .reads import Reads
from .recovery import Recovery
from .transfer import HostCopy, Mover, as_numpy_rows
from .writer import OffloadWriter

MANIFEST = "mukv.json"
_open_backends: "weakref.WeakSet[TieredBackend]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # pragma: no cover - interpreter exit
    for b in list(_open_backends):
        try:
            b.close()
        except Exception:
            pass


@dataclass
class _Job:
    """A batch of blocks waiting for the offload writer."""

    level: str
    first: int
    host: HostCopy  # [B, Y, 2, H, K, D] KV on the host
    vectors: np.ndarray  # [B, V] float32
    kept: np.ndarray  # [B, K]
    token_index: np.ndarray  # [B, K]
    positions: np.ndarray  # [B, K]
    info: BlockInfo
    txn: int  # the transaction whose rows these are
    layer_keys: np.ndarray | None = None  # [B, Y, V] float16, levels stored with per-layer keys


@dataclass
class _Mark:
    """The end of a transaction: its state values, files and block counts, persisted (state file last)
    once everything submitted before it is written."""

    values: dict[str, Any]
    counts: dict[str, int]
    txn: int
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Rollback:
    """An aborted transaction: drop its rows and KV beyond ``counts`` (those of the last commit)."""

    counts: dict[str, int]
    txn: int


#: names of files a stream keeps beside its state (thumbs/000123.jpg, pending.41.bin)
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}){0,3}$")


def layout_dict(layout: KVLayout) -> dict[str, Any]:
    from .zarr_kv import dtype_name

    return {"num_layers": layout.num_layers, "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
            "dtype": dtype_name(layout.dtype), "model_id": layout.model_id}


class TieredBackend(Recovery, Reads, StorageBackend):
    """Blocks in a bounded hot tier and on disk (zarr KV + lancedb index); see the module docstring.

    Args:
        layout: the model's KV layout (must match the store's).
        path: store folder or ``s3://bucket/prefix``.
        device: the session's device (where the hot tier and loaded KV live).
        stream_id: the stream of the store ([A-Za-z0-9_.-], see
            :func:`~mukv.backends.disk.files.check_stream_id`).
        codec: the KV codec new blocks are written with (the session's ``kv_codec``; default
            "none"). Arrays written with other codecs are read with their own.
        **options: :class:`~mukv.backends.disk.options.TieredOptions` fields.

    Raises:
        StoreError: not a mukv store, another model's store, a hostile stream
            id, a damaged store, or (``read_only=False``) a stream another
            process writes.
        ConfigError: an unknown or invalid option.
    """

    name = "lancedb"
    persistent = True
    accepts_codec = True

    def __init__(self, layout: KVLayout, path: str | None = None, device: torch.device | str = "cpu",
                 stream_id: str = "default", codec: KVCodec | None = None, **options: Any):
        self._closed = True
        self.manifest = None
        self.codec = codec_or_none(codec)
        self.options = o = TieredOptions.parse(options)
        if path is None:
            raise StoreError("the lancedb backend keeps blocks on disk: pass path= (a folder or an s3:// URI)")
        self.stream_id = check_stream_id(stream_id)
        self.layout = layout
        self.device = torch.device(device)
        self._lock = threading.RLock()
        self.files = Files(str(path), o.storage_options, o.fsync)
        self._lockfile: WriterLock | None = None
        self._lease: StreamLease | None = None
        self.read_only = self._open_store(o.read_only)
        try:
            self._init_tiers()
        except BaseException:
            self._release_lock()
            raise
        self._closed = False
        _open_backends.add(self)

    # ------------------------------------------------------------------ opening
    def _open_store(self, read_only: bool | None) -> bool:
        files = self.files
        if not files.remote and files.local.exists() and not files.local.is_dir():
            raise StoreError(f"{files.local}: not a mukv store (a file, not a folder)")
        manifest = files.read_json(MANIFEST)
        if manifest is None and files.exists_nonempty_root():
            manifest = self._await_manifest()  # another session may be creating this store right now
            if manifest is None:
                raise StoreError(f"{files.uri()}: not a mukv store (no {MANIFEST}; refusing to write into a "
                                 "folder that holds other files)")
        if manifest is None:
            if read_only:
                raise StoreError(f"{files.uri()}: no mukv store to open read-only")
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "layout": layout_dict(self.layout),
                        "created": time.time()}
            files.write_json(MANIFEST, manifest)
            self.manifest = validate_manifest(manifest, files.uri(MANIFEST), FORMAT)
        else:
            self._check_manifest(manifest)
        if read_only:
            return True
        if files.remote:  # object stores: a lease in the stream's state file, taken by a conditional write
            o = self.options
            lease = StreamLease(files, self._state_rel(), o.lease_ttl, o.lease_owner, o.clock_skew)
            if lease.try_acquire():
                self._lease = lease
                return False
            try:
                lease.acquire()  # a second look; raises naming the holder
                self._lease = lease
                return False
            except LeaseHeld as held:
                if read_only is False:
                    raise
                warnings.warn(f"{held}; opened read-only", stacklevel=4)
                return True
        lock = WriterLock(files.local / "streams" / f"{self.stream_id}.lock")
        if lock.acquire():
            self._lockfile = lock
            return False
        if read_only is False:
            raise StoreError(f"{files.uri()}: stream {self.stream_id!r} is being written by another process "
                             f"(pid {lock.holder()}); open it read-only or wait")
        warnings.warn(f"stream {self.stream_id!r} of {files.uri()} is being written by another process "
                      f"(pid {lock.holder()}); opened read-only", stacklevel=4)
        return True

    def _await_manifest(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The manifest of a store that another session is creating (the root holds only mukv's own
        names and the manifest's temp file); ``None`` at once for a folder of other files."""
        own = {MANIFEST, "streams", "kv", "index", "layerkeys"}
        deadline = time.monotonic() + timeout
        while True:
            names = self.files.listing()
            temp = [n for n in names if n.startswith(f".{MANIFEST}.") and n.endswith(".tmp")]
            if not all(n in own or n in temp for n in names) or not (temp or MANIFEST in names):
                return None  # other files, or a store whose manifest is gone (a creator writes it first)
            manifest = self.files.read_json(MANIFEST)
            if manifest is not None or time.monotonic() > deadline:
                return manifest
            time.sleep(0.02)

    def _check_manifest(self, m: dict[str, Any]) -> None:
        where = self.files.uri()
        self.manifest = validate_manifest(m, self.files.uri(MANIFEST), FORMAT)
        stored, mine = self.manifest.layout.model_dump(), layout_dict(self.layout)
        diffs = [k for k in ("num_layers", "num_kv_heads", "head_dim", "dtype") if stored.get(k) != mine[k]]
        if stored.get("model_id") and mine["model_id"] and stored["model_id"] != mine["model_id"]:
            diffs.append("model_id")
        if diffs:
            show = lambda d: ", ".join(f"{k}={d.get(k)!r}" for k in diffs)  # noqa: E731
            raise StoreError(f"{where}: written by another model ({show(stored)}); this session's model has "
                             f"{show(mine)}")

    def _init_tiers(self) -> None:
        from mukv.config import MukvConfig
        from mukv.specs import build

        from .lance_index import BlockTable
        from .layer_keys import LayerKeyArchive, LayerKeyMirror
        from .zarr_kv import KVArchive

        o = self.options
        self._load_state()
        evictor = build("evictors", o.eviction, MukvConfig.build(), EvictionPolicy, "backend_options.eviction")
        self.archive = KVArchive(self.files, self.stream_id, self.layout.dtype, o.shard_bytes, self.read_only,
                                 read_threads=o.read_threads, codec=self.codec)
        self.table = BlockTable(self.files, self.layout.vector_dim, self.read_only,
                                vector_index_rows=None if o.cold_index == "exact" else o.cold_index_rows,
                                cache_bytes=o.lance_cache_bytes, call_timeout=o.lance_call_timeout,
                                exact_rows=o.cold_exact_rows)
        self.keys = LayerKeyArchive(self.files, self.stream_id, torch.float16, o.shard_bytes, self.read_only,
                                    read_threads=o.read_threads)
        self.lk = LayerKeyMirror(self.layout.num_layers, self.layout.vector_dim)
        self.recovered: dict[str, Any] = {}
        if not self.read_only:
            self._recover()
        self._unwritten: dict[str, bytes] = {}  # committed stream files the writer has not written yet
        self._files_lock = threading.Lock()  # guards _unwritten (the writer thread never takes self._lock)
        self.lk.load(self.keys, self._persisted)
        self._n = dict(self._persisted)  # ids handed out
        self._committed = dict(self._persisted)  # KV + rows on disk
        self._base = dict(self._persisted)  # counts as of the last commit (what a rollback returns to)
        self._open_txn = self._txn + 1  # number of the transaction being built (its rows carry it)
        self._unadmitted: dict[str, int] = {}  # level -> 1 + highest id that is neither hot nor committed
        if o.hot_bytes is None:
            hot_bytes = (1 << 30) if self.device.type == "cuda" else (256 << 20)
        else:
            hot_bytes = o.hot_bytes
        slab = o.hot_slab_bytes or max(4096, hot_bytes // 16)
        self.hot = HotTier(hot_bytes, min(slab, hot_bytes) if hot_bytes else 0, self.device, self.layout.dtype,
                           self.layout.vector_dim, evictor)
        self.mover = Mover(self.device, o.pinned_free_bytes)
        if o.malloc_mmap_threshold is not None:
            pin_mmap_threshold(o.malloc_mmap_threshold)  # bounds the RSS of a long ingest (see the option)
        self._rows: OrderedDict[tuple[str, int], tuple] = OrderedDict()
        self._clock = 0
        self._seg_frames: int | None = o.segment_frames
        self.pagein = {"questions": 0, "blocks_hot": 0, "blocks_disk": 0, "bytes_disk": 0, "seconds_disk": 0.0,
                       "seconds_read": 0.0, "bytes_decoded": 0, "seconds_decode": 0.0}
        self._failure: str | None = None
        self.writer = None if self.read_only else OffloadWriter(
            self._commit, o.max_pending_bytes, o.commit_interval, on_idle=self._maintain,
            name=f"mukv-offload-{self.stream_id}")

    def _state_rel(self) -> str:
        return f"streams/{self.stream_id}.json"

    def _load_state(self) -> None:
        """Read and validate the stream's state file (every field; :class:`StoreError` if invalid)."""
        found = read_state(self.files, self.stream_id, self.manifest.layout.model_dump() if self.manifest else None)
        self._has_state = found is not None
        if found is None:
            self._txn = 0
            self._persisted: dict[str, int] = {}
            self._values: dict[str, Any] = {}
            self._level_info: dict[str, dict[str, Any]] = {}
        else:
            state, _ = found
            self._txn = state.txn
            self._persisted = dict(state.counts)
            self._values = dict(state.values)
            self._level_info = {lv: info.model_dump() for lv, info in state.levels.items()}
        self._pvalues: dict[str, Any] = dict(self._values)  # values in the state file (writer thread)

    @classmethod
    def peek_state(cls, path: str, stream_id: str, key: str, **options: Any) -> Any:
        check_stream_id(stream_id)
        try:
            files = Files(str(path), storage_options=options.get("storage_options"))
        except StoreError:
            return None
        if not files.remote and not files.local.is_dir():
            return None
        raw = files.read_json(MANIFEST)
        if raw is None:
            return None
        manifest = validate_manifest(raw, files.uri(MANIFEST), FORMAT)
        found = read_state(files, stream_id, manifest.layout.model_dump())
        return None if found is None else found[0].values.get(key)

    @classmethod
    def list_streams(cls, path: str, **options: Any) -> list[str]:
        """Ids of the streams a store holds (those with a state file)."""
        from .streams import stream_ids

        return stream_ids(Files(str(path), storage_options=options.get("storage_options")))

    def refresh(self) -> bool:
        """Reader: catch up with what the writer has committed since opening (or the last refresh).
        Returns whether anything changed."""
        with self._lock:
            if not self.read_only:
                return False
            old = self._txn, dict(self._persisted)
            self._load_state()
            self._n = dict(self._persisted)
            self._committed = dict(self._persisted)
            self._base = dict(self._persisted)
            if (self._txn, self._persisted) == old:
                return False
            self.archive.forget()  # the arrays grew: read their lengths again
            self.keys.forget()
            self.lk = type(self.lk)(self.layout.num_layers, self.layout.vector_dim)
            self.lk.load(self.keys, self._persisted)
            return True

    # ------------------------------------------------------------------ writing
    def _check_writable(self) -> None:
        if self._closed:
            raise StoreError("this store is closed")
        if self.read_only:
            raise StoreError(f"{self.files.uri()}: stream {self.stream_id!r} is open read-only")
        self._check_writer()

    def _check_writer(self) -> None:
        if self._failure is not None:
            raise StoreError(self._failure)
        if self._lease is not None and self._lease.lost is not None:
            self._failure = f"{self._lease.lost}; reopen the stream (read-only while another server writes it)"
            raise StoreError(self._failure)
        w = self.writer
        if w is not None and w.error is not None:
            # what the state file counts is what a reopen finds; reads go on over that alone
            done = dict(self._persisted)
            lost = {lv: (done.get(lv, 0), n) for lv, n in self._n.items() if n > done.get(lv, 0)}
            for lv, (c, _) in lost.items():
                self.hot.rollback(lv, c)
                self.lk.truncate(lv, c)
            self._n = {lv: min(n, done.get(lv, 0)) for lv, n in self._n.items()}
            self._base = dict(self._n)
            with self.hot.lock:
                self._committed = {lv: min(c, done.get(lv, 0)) for lv, c in self._committed.items()}
            self._unadmitted = {lv: min(u, done.get(lv, 0)) for lv, u in self._unadmitted.items()}
            self._values = dict(self._pvalues)
            dropped = ", ".join(f"{lv} blocks {c}..{n - 1}" for lv, (c, n) in lost.items()) or "none"
            msg = _describe(w.error)
            self._failure = (f"{self.files.uri()}: writing stream {self.stream_id!r} failed: {msg}. Not stored: "
                             f"{dropped}. Everything committed before is intact; reopen the store to continue.")
            raise StoreError(self._failure)

    def _segment_frames(self) -> int:
        if self._seg_frames is None:
            try:
                levels = self._values["session"]["config"]["levels"]
                self._seg_frames = max(int(lv.get("frames", 1)) for lv in levels)
            except (KeyError, TypeError, ValueError):
                self._seg_frames = 4
        return self._seg_frames

    def add(self, blocks: CompressedBlocks) -> torch.Tensor:
        with self._lock:
            self._check_writable()
            level = check_level(blocks.level)
            kv = blocks.kv
            b = kv.shape[0]
            lay = self.layout
            if kv.ndim != 6 or tuple(kv.shape[1:4]) != (lay.num_layers, 2, lay.num_kv_heads) or kv.shape[5] != lay.head_dim:
                raise StoreError(f"block KV shape {tuple(kv.shape[1:])} does not match the store's layout "
                                 f"({lay.num_layers}, 2, {lay.num_kv_heads}, K, {lay.head_dim})")
            k = int(kv.shape[4])
            info = self._level_info.get(level)
            if info is not None and int(info["tokens"]) != k:
                raise StoreError(f"level {level!r} stores {info['tokens']} tokens per block; got {k}")
            if b == 0:
                return torch.empty(0, dtype=torch.int64)
            kv_s = kv.to(lay.dtype)
            # the stored rows; NaN/inf refused (nothing stored) unless checked by the batch and unconverted
            enc = self.codec.encode_blocks(kv_s, known_finite=blocks.finite and kv_s is kv)
            nbytes = enc.nbytes
            if not self.files.remote:
                try:
                    free = shutil.disk_usage(self.files.local).free
                except OSError:
                    free = None
                if free is not None and free < nbytes + self.options.min_free_bytes:
                    raise StoreError(f"disk full: {free} bytes free at {self.files.local}, a batch of {b} {level} "
                                     f"blocks needs {nbytes} (+ min_free_bytes {self.options.min_free_bytes}); "
                                     "nothing of it was stored")
            fs = blocks.frame_start.detach().cpu().to(torch.int64).numpy()
            fe = blocks.frame_end.detach().cpu().to(torch.int64).numpy()
            if fs.shape != (b,) or fe.shape != (b,):
                raise StoreError(f"{b} {level} blocks need frame_start and frame_end of shape [{b}]; got "
                                 f"{tuple(fs.shape)} and {tuple(fe.shape)}")
            if (fe < fs).any():  # the frame-range filters of the index rely on it (lance_index.where)
                j = int(np.argmax(fe < fs))
                raise StoreError(f"{level} block {j} of the batch ends (frame {int(fe[j])}) before it starts "
                                 f"(frame {int(fs[j])})")
            first = self._n.get(level, 0)
            lk_rows = self.lk.check(level, first, blocks.layer_keys, b)
            ids = np.arange(first, first + b, dtype=np.int64)
            binfo = BlockInfo(ids, fs // self._segment_frames(), fs, fe,
                              blocks.t_start.detach().cpu().to(torch.float64).numpy(),
                              blocks.t_end.detach().cpu().to(torch.float64).numpy())
            vectors = blocks.vectors.detach().to(torch.float32)
            host = self.mover.to_host(enc.rows, enc.rows.dtype)  # non-blocking on CUDA
            if info is None:
                self._level_info[level] = {"tokens": k, "block_shape": [int(s) for s in kv.shape[1:]]}
            try:
                self._admit_new(level, hot_form(self, enc), vectors, binfo)  # may wait for the writer
            except StoreError:
                self.hot.rollback(level, first)
                self._check_writer()
                raise
            job = _Job(level, first, host, vectors.cpu().numpy(), _np(blocks.kept), _np(blocks.token_index),
                       _np(blocks.positions), binfo, self._open_txn, lk_rows)
            try:
                self.writer.submit(job, nbytes)
            except StoreError:
                self.hot.rollback(level, first)
                self._check_writer()
                raise
            if lk_rows is not None:
                self.lk.append(level, first, lk_rows)
            self._n[level] = first + b
            return torch.from_numpy(ids)

    def _admit_new(self, level: str, kv: torch.Tensor, vectors: torch.Tensor, info: BlockInfo) -> None:
        if self.hot.budget_bytes == 0:
            self._unadmitted[level] = int(info.ids[-1]) + 1
            return
        admitted = self.hot.admit(level, kv, vectors, info, self._clock, committed=False)
        if not admitted.all() and self.writer.pending:
            # the tier is full of blocks not yet on disk: commit them, then evict
            self.writer.wait()
            rest = np.flatnonzero(~admitted)
            sub = torch.from_numpy(rest).to(kv.device)
            admitted[rest] = self.hot.admit(level, kv[sub], vectors[sub.to(vectors.device)], info.take(rest),
                                            self._clock, committed=False)
        if not admitted.all():
            self._unadmitted[level] = int(info.ids[~admitted].max()) + 1

    def set_state(self, key: str, value: Any) -> None:
        self.commit({key: value})

    def get_state(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def commit(self, state: dict[str, Any], files: dict[str, bytes] | None = None) -> None:
        """End the transaction: the blocks added since the last commit, ``state`` and ``files`` are
        written by the offload writer in that order, the stream's state file last (the commit point).

        Returns once the writer has the transaction (it becomes durable in the background, at once on
        :meth:`flush`). The values are checked before anything is queued: a value that is not JSON, or a
        stream state that :func:`mukv.state.validate_values` refuses, is a :class:`StoreError` and the
        transaction stays open (roll it back)."""
        with self._lock:
            self._check_writable()
            try:
                values = json.loads(json.dumps(state, allow_nan=False))
            except (TypeError, ValueError) as exc:
                raise StoreError(f"stream state is not JSON-serialisable: {exc}") from None
            merged = {**self._values, **values}
            validate_values(merged, f"{self.files.uri(self._state_rel())} (commit)")
            blobs: dict[str, bytes] = {}
            for name, data in (files or {}).items():
                if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or ".." in name:
                    raise StoreError(f"invalid stream file name {name!r}")
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    raise StoreError(f"stream file {name!r}: expected bytes, got {type(data).__name__}")
                blobs[name] = bytes(data)
            with self._files_lock:
                for name, data in blobs.items():  # readable at once, before the writer has written them
                    self._unwritten[name] = data
            self.writer.submit(_Mark(values, dict(self._n), self._open_txn, blobs))
            self._values = merged
            self._base = dict(self._n)
            self._txn = self._open_txn
            self._open_txn += 1

    def rollback(self) -> None:
        """Abort the transaction: the blocks added since the last commit leave the hot tier at once, their
        ids are handed out again, and the writer removes whatever of them it already wrote (waited for)."""
        with self._lock:
            if self._closed or self.read_only:
                return
            changed = {lv: n for lv, n in self._n.items() if n != self._base.get(lv, 0)}
            for lv in changed:
                self.hot.rollback(lv, self._base.get(lv, 0))
                self.lk.truncate(lv, self._base.get(lv, 0))
            self._n = {lv: self._base.get(lv, 0) for lv in self._n}
            self._unadmitted = {lv: min(u, self._base.get(lv, 0)) for lv, u in self._unadmitted.items()}
            aborted = self._open_txn
            self._open_txn += 1  # the aborted number is never reused
            if not changed:
                return
            try:
                self._check_writer()
                self.writer.wait(self.writer.submit(_Rollback(dict(self._base), aborted)))
            except BaseException as exc:
                # the writer failed (the store must be reopened, whose recovery removes the rows) or the
                # wait was interrupted: no later transaction may build on this one
                self._failure = self._failure or (
                    f"{self.files.uri()}: stream {self.stream_id!r}: a failed feed could not be rolled back "
                    f"({_describe(exc) if not isinstance(exc, KeyboardInterrupt) else 'interrupted'}); everything "
                    "committed before is intact: reopen the stream to continue")
                raise

    def read_file(self, name: str) -> bytes | None:
        """A file committed with :meth:`commit` (``None`` if it does not exist)."""
        if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or ".." in name:
            raise StoreError(f"invalid stream file name {name!r}")
        with self._files_lock:
            if name in self._unwritten:
                data = self._unwritten[name]
                return data or None
        return self.files.read(f"{self._stream_dir()}/{name}")

    def flush(self) -> None:
        """Make every committed transaction durable now (blocks added outside a transaction are
        committed first, as one transaction without state changes)."""
        with self._lock:
            if self._closed or self.read_only:
                return
            self._check_writer()
            if self._n != self._base:
                self.commit({})
            try:
                self.writer.wait()
            except StoreError:
                self._check_writer()
                raise

    # ------------------------------------------------------------------ the writer thread
    def _commit(self, items: list[Any]) -> None:
        """Write a group in submission order. Per run of items between rollbacks: KV (zarr), then index
        rows (lancedb, one commit), then the transactions' files, then the state file (the commit point),
        then the files the transactions deleted. A rollback drops its transaction's jobs that were not
        written yet and removes the rows and KV of those that were."""
        aborted = {it.txn for it in items if isinstance(it, _Rollback)}
        run: list[Any] = []
        for it in items:
            if isinstance(it, _Job) and it.txn in aborted:
                it.host.release()  # never written
                continue
            if isinstance(it, _Rollback):
                self._commit_run(run)
                run = []
                self._undo(it)
            else:
                run.append(it)
        self._commit_run(run)

    def _commit_run(self, items: list[Any]) -> None:
        import pyarrow as pa

        jobs = [it for it in items if isinstance(it, _Job)]
        marks = [it for it in items if isinstance(it, _Mark)]
        if self._lease is not None:  # a writer whose lease ran out or was taken writes nothing more
            self._lease.confirm()
        if jobs:
            runs: list[list[_Job]] = []
            for job in jobs:
                rows = as_numpy_rows(job.host.wait())
                job.rows, job.crc = rows, _crc(rows)  # type: ignore[attr-defined]
                last = runs[-1][-1] if runs else None
                if last is not None and last.level == job.level and last.first + len(last.info.ids) == job.first:
                    runs[-1].append(job)
                else:
                    runs.append([job])
            for run in runs:
                data = run[0].rows if len(run) == 1 else np.concatenate([j.rows for j in run])  # type: ignore[attr-defined]
                self.archive.write(run[0].level, run[0].first, data, self._block_shape(run[0].level))
            for job in jobs:  # per-layer keys with their blocks' KV, before the rows that count them
                if job.layer_keys is not None:
                    self.keys.write(job.level, job.first, job.layer_keys)
            self.table.table(create=True)
            with_txn = self.table.has_column("txn")
            self.table.add(pa.concat_tables([self._arrow_rows(j, with_txn) for j in jobs]))
            ends: dict[str, int] = {}
            for job in jobs:
                ends[job.level] = max(ends.get(job.level, 0), job.first + len(job.info.ids))
                job.host.release()
                job.rows = None  # type: ignore[attr-defined]
            with self.hot.lock:
                for level, end in ends.items():
                    self._committed[level] = max(self._committed.get(level, 0), end)
                    self.hot.mark_committed(level, end)
        if marks:
            for m in marks:
                for name, data in m.files.items():
                    if data:
                        self.files.write(f"{self._stream_dir()}/{name}", data)
                self._pvalues.update(m.values)
            last = marks[-1]
            state = {
                "format_version": FORMAT_VERSION, "stream_id": self.stream_id, "txn": last.txn,
                "counts": last.counts, "values": self._persisted_values(), "levels": dict(self._level_info),
                "updated": time.time(),
            }
            if self._lease is not None:
                self._lease.write_state(state)  # fenced: fails if another writer took the stream over
            else:
                self.files.write_json(self._state_rel(), state)
            self._persisted = dict(last.counts)
            for m in marks:
                for name, data in m.files.items():
                    if not data:
                        self.files.delete(f"{self._stream_dir()}/{name}")
            with self._files_lock:
                for m in marks:
                    for name, data in m.files.items():
                        if self._unwritten.get(name) is data:
                            del self._unwritten[name]

    def _undo(self, rb: _Rollback) -> None:
        """Remove what the writer already wrote of an aborted transaction (its rows and KV beyond
        ``rb.counts``; nothing of a committed transaction lies there)."""
        self.table.delete_uncounted(self.stream_id, rb.counts)
        for archive in (self.archive, self.keys):  # KV, and per-layer keys
            for level in archive.levels():
                n = rb.counts.get(level, 0)
                if archive.length(level) > n:
                    archive.truncate(level, n)
        with self.hot.lock:
            for level in list(self._committed):
                self._committed[level] = min(self._committed[level], rb.counts.get(level, 0))

    def _persisted_values(self) -> dict[str, Any]:
        return dict(self._pvalues)

    def _arrow_rows(self, job: _Job, with_txn: bool = True):
        import pyarrow as pa

        from .lance_index import schema

        b = len(job.info.ids)
        k = job.kept.shape[1]

        def lists(a: np.ndarray, typ):
            offsets = pa.array(np.arange(0, b * k + 1, k, dtype=np.int32))
            return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(a).reshape(-1).astype(typ)))

        v = self.layout.vector_dim
        cols = {
            "stream_id": pa.array([self.stream_id] * b, pa.string()),
            "level": pa.array([job.level] * b, pa.string()),
            "block_id": pa.array(job.info.ids), "segment_id": pa.array(job.info.segment),
            "frame_start": pa.array(job.info.frame_start), "frame_end": pa.array(job.info.frame_end),
            "t_start": pa.array(job.info.t_start), "t_end": pa.array(job.info.t_end),
            "tokens": pa.array(np.full(b, k, dtype=np.int32)),
            "kept": lists(job.kept, np.int32), "token_index": lists(job.token_index, np.int32),
            "positions": lists(job.positions, np.int64),
            "kv_path": pa.array([self.archive.part_of(job.level, job.first).rel] * b, pa.string()),
            "kv_row": pa.array(job.info.ids), "crc32": pa.array(job.crc),  # type: ignore[attr-defined]
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(job.vectors.reshape(-1).astype(np.float32)), v),
        }
        sch = schema(v)
        if with_txn:
            cols["txn"] = pa.array(np.full(b, job.txn, dtype=np.int64))
        else:  # a table made before transactions were numbered
            sch = sch.remove(sch.get_field_index("txn"))
        return pa.table(cols, schema=sch)

    def _maintain(self) -> None:
        try:
            self.table.maintain()
        except Exception as exc:  # index upkeep is an optimisation: never lose a write over it
            warnings.warn(f"lancedb index upkeep failed (searches stay exact): {exc}", stacklevel=1)

    # ------------------------------------------------------------------ reading
    def count(self, level: str) -> int:
        return self._n.get(level, 0)

    def _block_shape(self, level: str) -> tuple[int, ...]:
        info = self._level_info[level]
        return tuple(int(s) for s in info["block_shape"])

    def _ids(self, level: str, ids: Any) -> np.ndarray:
        n = self.count(level)
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).cpu().numpy()
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise RetrievalError(f"level {level!r}: block ids out of range (stored: {n})")
        return ids

    def _ensure_on_disk(self, level: str, upto: int) -> None:
        """Blocks below ``upto`` that are not hot must be committed before they can be read."""
        if self.writer is not None and self._committed.get(level, 0) < upto:
            self._check_writer()
            self.writer.wait()
            self._check_writer()

    # ------------------------------------------------------------------ numbers, checks, closing
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for level, n in self._n.items():
            k = int(self._level_info.get(level, {}).get("tokens", 0))
            shape = self._level_info.get(level, {}).get("block_shape")
            # bytes as stored: each array's rows (its codec), the write codec's for blocks not on disk yet
            nbytes = self.archive.stored_bytes(level, n, tuple(shape) if shape else None) if n else 0
            out[level] = {"blocks": n, "tokens": n * k, "bytes": nbytes}
        return out

    def tier_stats(self) -> dict[str, Any]:
        """Hot tier (budget, bytes held, blocks, evictions), disk, page-in and writer counters;
        ``pinned_bytes``: page-locked host bytes of the staging pool that every store of the process
        on this device shares (0 on CPU)."""
        return {
            "hot": {"budget_bytes": self.hot.budget_bytes, "reserved_bytes": self.hot.reserved_bytes(),
                    "used_bytes": self.hot.used_bytes(), "blocks": self.hot.blocks(), "evicted": self.hot.evicted},
            "disk": {"committed": dict(self._committed), "kv_bytes": self.archive.nbytes_stored()},
            "pagein": dict(self.pagein),
            "writer": {"pending": self.writer.pending if self.writer else 0,
                       "groups": self.writer.groups if self.writer else 0},
            "pinned_bytes": self.mover.pool.held_bytes if self.mover.pool is not None else 0,
            "read_only": self.read_only,
            "recovered": dict(self.recovered),
        }

    def verify(self, check_kv: bool = True) -> dict[str, Any]:
        """Check every committed block of this stream: one index row per id ``0..n-1`` and KV matching
        its crc32 (the per-stream part of :func:`~mukv.backends.disk.verify.verify_store`; never raises
        for damage, it reports it).

        Returns:
            ``{"ok": bool, "levels": {level: {"blocks": n, "missing": [...], "corrupt": [...],
            "unreadable": [...]}}, "problems": [line, ...]}`` (ids listed, at most 100 each); ``ok`` is
            False only for damage, not for leftovers of a killed writer.
        """
        from .verify import VerifyReport, check_backend

        with self._lock:
            if self.writer is not None and self.writer.error is None:
                self.flush()
            rep = VerifyReport(self.files.uri())
            check_backend(self, rep, check_kv=check_kv)
            levels = {lv: {"blocks": e["blocks"], "missing": e["missing"][:100], "corrupt": e["corrupt"][:100],
                           "unreadable": e["unreadable"][:100]}
                      for lv, e in sorted(rep.streams.get(self.stream_id, {}).items())}
            return {"ok": rep.ok, "levels": levels, "problems": [p.line() for p in rep.problems]}

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("this store is closed")

    def _release_lock(self) -> None:
        if self._lockfile is not None:
            self._lockfile.release()
            self._lockfile = None
        if self._lease is not None:
            self._lease.release()

    @property
    def lease(self) -> "StreamLease | None":
        """The writer's lease on a stream of an object store (``None``: local store, or read-only)."""
        return self._lease

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _open_backends.discard(self)
            try:
                if self.writer is not None:
                    if self.writer.error is None and self._failure is None and self._n != self._base:
                        try:  # blocks added outside a transaction (direct use of the backend): commit them
                            self.writer.submit(_Mark({}, dict(self._n), self._open_txn))
                        except StoreError:
                            pass
                    self.writer.close()
            finally:
                self._release_lock()
                self._rows.clear()
                self.mover.close()
            if self.writer is not None and self.writer.error is not None and self._failure is None:
                self._check_writer()  # a write that failed while closing: say what was not stored


def _describe(err: BaseException) -> str:
    """A writer error in words; a full disk is called so, whichever library reported it."""
    if isinstance(err, StoreError):
        return str(err)
    if isinstance(err, OSError):
        return str(disk_error(err, "writing blocks"))
    text = f"{type(err).__name__}: {err}"
    if "no space left" in text.lower() or "quota exceeded" in text.lower():
        return f"disk full while writing blocks ({text})"
    return text


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.int64).numpy()


def _crc(rows: np.ndarray) -> np.ndarray:
    from .zarr_kv import block_crc

    return block_crc(rows)
