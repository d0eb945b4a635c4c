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

The class is put together from parts, one file each: opening the store and
the stream (:mod:`.opening`), the writer thread's side of a commit
(:mod:`.persist`), crash recovery (:mod:`.recovery`) and reads (:mod:`.reads`).
This module keeps the caller's side: ids handed out, the open transaction,
the hot tier's admissions, numbers and closing.
"""

from __future__ import annotations

import atexit
import json
import re
import shutil
import threading
import weakref
from typing import Any

import numpy as np
import torch

from mukv.blocks import CompressedBlocks, KVLayout
from mukv.errors import RetrievalError, StoreError
from mukv.interfaces import KVCodec, StorageBackend
from mukv.kvcodec import codec_or_none
from mukv.state import validate_values

from .files import Files, WriterLock, check_level, check_stream_id, disk_error
from .hot import BlockInfo
from .lease import StreamLease
from .opening import Opening
from .options import TieredOptions
from .pagein import hot_form
from .persist import Job, Mark, Persist, Rollback
from .reads import Reads
from .recovery import Recovery

_open_backends: "weakref.WeakSet[TieredBackend]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # pragma: no cover - interpreter exit
    for b in list(_open_backends):
        try:
            b.close()
        except Exception:
            pass


#: names of files a stream keeps beside its state (thumbs/000123.jpg, pending.41.bin)
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}){0,3}$")


class TieredBackend(Opening, Persist, Recovery, Reads, StorageBackend):
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
    # (the store's opening and the stream's state: :class:`~.opening.Opening`)

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
            job = Job(level, first, host, vectors.cpu().numpy(), _np(blocks.kept), _np(blocks.token_index),
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
            self.writer.submit(Mark(values, dict(self._n), self._open_txn, blobs))
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
                self.writer.wait(self.writer.submit(Rollback(dict(self._base), aborted)))
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

    # (the writer thread's side of a commit: :class:`~.persist.Persist`)

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
                            self.writer.submit(Mark({}, dict(self._n), self._open_txn))
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

