"""Opening a store and a stream (a part of :class:`~.tiered.TieredBackend`).

The manifest is read or created (and checked against the model's KV layout), the stream's writer
lock or lease taken, its state file read and validated, and the tiers built over it: the KV and
per-layer key archives, the index table, the hot tier, the host staging pool and the offload writer.
A reader catches up with a writer's later commits by :meth:`Opening.refresh`.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import OrderedDict
from typing import Any

import torch

from mukv.blocks import KVLayout
from mukv.errors import StoreError
from mukv.interfaces import EvictionPolicy
from mukv.malloc import pin_mmap_threshold

from .files import FORMAT, FORMAT_VERSION, Files, WriterLock, check_stream_id
from .hot import HotTier
from .lease import LeaseHeld, StreamLease
from .state_file import read_state, validate_manifest
from .transfer import Mover
from .writer import OffloadWriter

MANIFEST = "mukv.json"


def layout_dict(layout: KVLayout) -> dict[str, Any]:
    from .zarr_kv import dtype_name

    return {"num_layers": layout.num_layers, "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
            "dtype": dtype_name(layout.dtype), "model_id": layout.model_id}


class Opening:
    """Opening steps of :class:`~.tiered.TieredBackend` (a mixin: it sets up the backend's files,
    tiers and state)."""

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
