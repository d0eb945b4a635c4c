"""Crash recovery of a stream opened for writing (a part of :class:`~.tiered.TieredBackend`).

What a killed writer left beyond the committed state is removed (index rows of transactions the
state has not committed, KV and per-layer key rows beyond the counts, temp files, stream files the
state does not reference); what would mean the state lost count of committed data is refused.
"""

from __future__ import annotations

from typing import Any

from mukv.errors import StoreError

from .files import check_stream_id
from .state_file import read_state


class Recovery:
    """Recovery steps of :class:`~.tiered.TieredBackend` (a mixin: it uses the backend's files,
    archives, index table and state)."""

    def _recover(self) -> None:
        """Remove what a killed writer left beyond the committed state; refuse on real damage.

        Left over (removed): index rows of transactions the state has not committed, KV rows beyond the
        counts, temp files, stream files the state does not reference. Damage (a :class:`StoreError`,
        nothing removed): rows of a committed transaction, or rows whose frames the state's cursors say
        were covered, beyond the counts (the state lost count of committed data: ``mukv repair``
        decides what to do, when asked), KV or rows missing below the counts.
        """
        counts = self._persisted
        partials = self.archive.remove_partials() + self.keys.remove_partials()
        try:
            beyond = self._rows_beyond(counts)
        except StoreError:
            # a version of the table that references files that are gone (a copy taken while being
            # written): go back to the newest readable version holding every committed row of every stream
            restored = self._restore_index_version()
            if restored is None:
                raise
            self.recovered["index_version"] = {"latest": restored[0], "restored": restored[1]}
            beyond = self._rows_beyond(counts)
        self._refuse_committed_beyond(beyond)
        rows = self.table.delete_uncounted(self.stream_id, counts) if beyond is not None and beyond.num_rows else 0
        cut: dict[str, int] = {}
        for level in sorted(set(self.archive.levels()) | set(counts)):
            n = counts.get(level, 0)
            length = self.archive.length(level)
            if length < n:
                raise StoreError(f"{self.files.uri()}: stream {self.stream_id!r} is damaged: {n} {level} blocks are "
                                 f"committed but only {length} have KV on disk")
            if length > n:
                self.archive.truncate(level, n)
                cut[level] = length - n
            if n:
                have = self.table.count(self.stream_id, level)
                if have != n:
                    raise StoreError(f"{self.files.uri()}: stream {self.stream_id!r} is damaged: {n} {level} blocks "
                                     f"are committed but the index holds {have} rows for them")
        for level in self.keys.levels():  # per-layer keys beyond the committed blocks
            if self.keys.length(level) > counts.get(level, 0):
                self.keys.truncate(level, counts.get(level, 0))
        leftover = [f"{a.folder}/{self.stream_id}" for a in (self.archive, self.keys)
                    if self.files.listing(f"{a.folder}/{self.stream_id}")]
        if not self._has_state and leftover:
            # no state file: every array of this stream is a leftover (a writer killed before its first
            # commit, a copy taken before the state file was written); a truncated array keeps its folder,
            # which would stay a stream without a state file if this writer never commits
            from .streams import remove_tree

            for rel in leftover:
                remove_tree(self.files, rel)
            self.archive.forget()
            self.keys.forget()
        files = self._remove_unreferenced_files()
        self.recovered = {**self.recovered, "temp_files": partials, "index_rows": rows, "kv_rows": cut,
                          "stream_files": files}

    def _rows_beyond(self, counts: dict[str, int]):
        cols = ["level", "block_id", "frame_start", "frame_end"] + (["txn"] if self.table.has_column("txn") else [])
        return self.table.beyond(self.stream_id, counts, cols)

    def _refuse_committed_beyond(self, beyond) -> None:
        """Rows beyond the counts that were committed (by their transaction number, or because the state's
        cursors say their frames were covered) mean the state disagrees with the data: refuse."""
        if beyond is None or beyond.num_rows == 0:
            return
        cursors = (self._values.get("cursors") or {}) if isinstance(self._values.get("cursors"), dict) else {}
        levels = beyond.column("level").to_pylist()
        ids = beyond.column("block_id").to_pylist()
        ends = beyond.column("frame_end").to_pylist()
        txns = beyond.column("txn").to_pylist() if "txn" in beyond.column_names else [None] * len(ids)
        bad: dict[str, list[int]] = {}
        for lv, bid, end, txn in zip(levels, ids, ends, txns):
            committed_txn = txn is not None and txn <= self._txn
            covered = lv in cursors and end <= int(cursors[lv])
            if committed_txn or covered:
                bad.setdefault(lv, []).append(int(bid))
        if bad:
            what = "; ".join(f"{lv}: state counts {self._persisted.get(lv, 0)}, committed rows up to id {max(b)}"
                             for lv, b in sorted(bad.items()))
            raise StoreError(
                f"{self.files.uri()}: stream {self.stream_id!r}: its state disagrees with its data ({what}); "
                "refusing to open it for writing, nothing was changed. `mukv repair "
                f"{self.files.uri()} --stream-id {self.stream_id}` shows what it would do")

    def _stream_dir(self) -> str:
        return f"streams/{self.stream_id}"

    def _referenced_files(self, values: dict[str, Any]) -> set[str]:
        pending = values.get("pending")
        return {pending["file"]} if isinstance(pending, dict) and isinstance(pending.get("file"), str) else set()

    def _remove_unreferenced_files(self) -> int:
        """Stream files a killed writer left: pending-frame files the state does not name, thumbnails of
        frames the state has not committed. Returns how many were removed."""
        removed = 0
        keep = self._referenced_files(self._values)
        seen = int(self._values.get("frames_seen", 0) or 0)
        for name in self.files.listing(self._stream_dir()):
            if name.startswith("pending.") and name not in keep:
                self.files.delete(f"{self._stream_dir()}/{name}")
                removed += 1
        thumbs = f"{self._stream_dir()}/thumbs"
        for name in self.files.listing(thumbs):
            stem = name.split(".", 1)[0]
            if not stem.isdigit() or int(stem) >= seen:
                self.files.delete(f"{thumbs}/{name}")
                removed += 1
        return removed

    def _restore_index_version(self) -> tuple[int, int] | None:
        """:meth:`BlockTable.restore_readable` with every stream's committed counts, unless another
        process writes a stream of this store (a restore would race its commits)."""
        from .verify import writer_active

        counts: dict[str, dict[str, int]] = {}
        for name in self.files.listing("streams"):
            if not name.endswith(".json") or name.startswith("."):
                continue
            sid = check_stream_id(name[: -len(".json")])
            if sid != self.stream_id and writer_active(self.files, sid):
                return None
            try:
                found = read_state(self.files, sid)
            except StoreError:
                return None  # a stream whose committed counts are unknown: no version can be proven to hold them
            counts[sid] = dict(found[0].counts) if found else {}
        return self.table.restore_readable(counts)
