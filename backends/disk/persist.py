"""The offload writer's side of a commit (a part of :class:`~.tiered.TieredBackend`).

The caller's thread keeps the bookkeeping (ids handed out, the open transaction, the hot tier) in
:mod:`.tiered` and queues a :class:`Job` per batch of blocks, a :class:`Mark` at the end of a
transaction and a :class:`Rollback` for an aborted one. The writer thread turns a group of them
into bytes here, in order: KV (zarr), then index rows (lancedb, one commit), then the transactions'
files, then the stream's state file (the commit point). Nothing here runs on the caller's thread.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .files import FORMAT_VERSION
from .hot import BlockInfo
from .transfer import HostCopy, as_numpy_rows


@dataclass
class Job:
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
class Mark:
    """The end of a transaction: its state values, files and block counts, persisted (state file last)
    once everything submitted before it is written."""

    values: dict[str, Any]
    counts: dict[str, int]
    txn: int
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Rollback:
    """An aborted transaction: drop its rows and KV beyond ``counts`` (those of the last commit)."""

    counts: dict[str, int]
    txn: int


class Persist:
    """Writer-thread steps of :class:`~.tiered.TieredBackend` (a mixin: it writes through the
    backend's archives, index table and files, and never takes the backend's lock)."""

    def _commit(self, items: list[Any]) -> None:
        """Write a group in submission order. Per run of items between rollbacks: KV (zarr), then index
        rows (lancedb, one commit), then the transactions' files, then the state file (the commit point),
        then the files the transactions deleted. A rollback drops its transaction's jobs that were not
        written yet and removes the rows and KV of those that were."""
        aborted = {it.txn for it in items if isinstance(it, Rollback)}
        run: list[Any] = []
        for it in items:
            if isinstance(it, Job) and it.txn in aborted:
                it.host.release()  # never written
                continue
            if isinstance(it, Rollback):
                self._commit_run(run)
                run = []
                self._undo(it)
            else:
                run.append(it)
        self._commit_run(run)

    def _commit_run(self, items: list[Any]) -> None:
        import pyarrow as pa

        jobs = [it for it in items if isinstance(it, Job)]
        marks = [it for it in items if isinstance(it, Mark)]
        if self._lease is not None:  # a writer whose lease ran out or was taken writes nothing more
            self._lease.confirm()
        if jobs:
            runs: list[list[Job]] = []
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

    def _undo(self, rb: Rollback) -> None:
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

    def _arrow_rows(self, job: Job, with_txn: bool = True):
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


def _crc(rows: np.ndarray) -> np.ndarray:
    from .zarr_kv import block_crc

    return block_crc(rows)
