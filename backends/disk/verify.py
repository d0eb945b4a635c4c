"""An end-to-end check of a disk store: what is damaged, and what is only left over.

    from mukv.backends.disk import verify_store

    report = verify_store("/data/cam1.mukv")       # every stream; or stream_id="cam1"
    print(report.summary())
    if not report.ok:
        for p in report.problems: ...

It reads and never writes: no file is created or changed, no lock is taken, no
model is needed (the KV layout comes from the store's manifest). It checks

1. the manifest (``mukv.json``): present, JSON, a mukv store of a format this
   mukv reads, a valid KV layout;
2. each stream's state file (``streams/<id>.json``): JSON, a valid stream id,
   counts and per-level block shapes consistent with the layout;
3. the lancedb table: it opens, its vectors have the layout's dimension, and
   every row can be read; if a data file of the table is gone, the table is
   read again fragment by fragment to say which blocks lost their rows;
4. every committed block (ids ``0 .. count - 1`` of each level): exactly one
   index row, KV on disk in exactly one of the level's arrays (one per KV codec
   the level was written with, each readable by its recorded codec, of the
   state's block shape), KV bytes as stored matching the row's crc32, and the
   first and last block of every shard decoding to finite values; a shard that
   cannot be read is read again chunk by chunk to narrow down the blocks;
5. the pending frames file a stream's state names (encoded frames a level has not consumed yet):
   present, of the recorded size and matching its CRC-32 (``pending_frames``: reopened, the stream
   would go on without them, so the levels waiting for them would skip those frames);
6. leftovers: index rows and KV beyond the committed counts, KV of levels or
   streams without a state, temp files. A killed writer leaves them, the next
   writer of the stream removes them, and no reader ever sees them: they are
   reported but do not make a store damaged.

A stream being written meanwhile (its writer lock is held) is noted: blocks
beyond its committed counts may be in flight there, not left over.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mukv.errors import StoreError

from .files import FORMAT, FORMAT_VERSION, Files, check_stream_id
from .state_file import read_state, stored_pending_problem
from .verify_meaning import check_meaning
from .zarr_kv import block_crc, describe_ids, dtype_from_name

MANIFEST = "mukv.json"
#: index columns the meaning checks read (beside stream_id, level, block_id, crc32)
META_COLUMNS = ["frame_start", "frame_end", "t_start", "t_end", "tokens", "txn"]
#: severities: "damage" (committed data missing, unreadable or wrong: ``ok`` is False),
#: "leftover" (uncommitted data a killed writer left; harmless, removed by the next writer), "note"
SEVERITIES = ("damage", "leftover", "note")
_MAX_IDS = 1000  # block ids listed per problem


@dataclass(frozen=True)
class Problem:
    """One finding.

    Attributes:
        severity: "damage", "leftover" or "note" (see :data:`SEVERITIES`).
        kind: what was found: "manifest", "state", "index", "index_fragment",
            "missing_rows", "duplicate_rows", "missing_kv", "kv_array", "unreadable_kv",
            "corrupt_kv", "undecodable_kv", "pending_frames", "orphan_rows", "orphan_kv", "unknown_stream",
            "temp_files", "index_version", "writer_active".
        message: the finding in words, naming the file, stream, level and blocks.
        stream_id: the stream concerned, if one.
        level: the level concerned, if one.
        blocks: the block ids concerned (at most 1000 listed).
    """

    severity: str
    kind: str
    message: str
    stream_id: str | None = None
    level: str | None = None
    blocks: tuple[int, ...] = ()

    def line(self) -> str:
        return f"{self.severity.upper():<8} {self.kind:<15} {self.message}"


@dataclass
class VerifyReport:
    """What :func:`verify_store` found.

    Attributes:
        path: the store.
        problems: every finding, damage first.
        streams: per stream, per level: ``{"blocks": committed, "verified": blocks whose
            row and KV checked out, "missing": [...], "corrupt": [...], "unreadable": [...]}``.
        index_rows: rows of the lancedb table that could be read.
    """

    path: str
    problems: list[Problem] = field(default_factory=list)
    streams: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    index_rows: int = 0

    @property
    def ok(self) -> bool:
        """No damage: every committed block has its index row and intact KV (leftovers allowed)."""
        return not self.damage

    @property
    def damage(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "damage"]

    def add(self, severity: str, kind: str, message: str, stream_id: str | None = None, level: str | None = None,
            blocks: Any = ()) -> None:
        ids = tuple(int(i) for i in np.asarray(blocks, dtype=np.int64).reshape(-1)[:_MAX_IDS])
        self.problems.append(Problem(severity, kind, message, stream_id, level, ids))

    def summary(self) -> str:
        """A few lines for a person: the verdict, blocks verified per stream and level, then each finding."""
        verified = sum(v["verified"] for s in self.streams.values() for v in s.values())
        blocks = sum(v["blocks"] for s in self.streams.values() for v in s.values())
        n_damage = len(self.damage)
        head = (f"store {self.path}: " + ("OK" if self.ok else f"DAMAGED ({n_damage} problem"
                                          f"{'s' if n_damage != 1 else ''})")
                + f"; {len(self.streams)} stream(s), {verified:,} of {blocks:,} committed blocks verified"
                + f", {self.index_rows:,} index rows read")
        lines = [head]
        for sid, levels in sorted(self.streams.items()):
            parts = [f"{lv} {v['verified']:,}/{v['blocks']:,}" for lv, v in levels.items()]
            lines.append(f"  stream {sid!r}: " + (", ".join(parts) if parts else "no blocks"))
        order = {s: i for i, s in enumerate(SEVERITIES)}
        for p in sorted(self.problems, key=lambda p: order.get(p.severity, 9)):
            lines.append("  " + p.line())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"path", "ok", "index_rows", "streams", "problems": [...]}``."""
        return {"path": self.path, "ok": self.ok, "index_rows": self.index_rows, "streams": self.streams,
                "problems": [asdict(p) | {"blocks": list(p.blocks)} for p in self.problems]}


def verify_store(path: str, stream_id: str | None = None, storage_options: dict[str, Any] | None = None,
                 check_kv: bool = True) -> VerifyReport:
    """Check a disk store end to end (read only); see the module docstring.

    Args:
        path: the store (local folder or ``s3://...``).
        stream_id: check this stream only (default: every stream of the store).
        storage_options: object-store settings, as for the backend.
        check_kv: read every committed block's KV and compare its crc32 (the slow
            part); ``False`` checks files, rows and lengths only.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is False when committed data is
        missing, unreadable or does not match its checksum.

    Raises:
        StoreError: only for a hostile ``stream_id`` (everything found in the
            store is reported, not raised).
    """
    if stream_id is not None:
        check_stream_id(stream_id)
    report = VerifyReport(str(path))
    try:
        files = Files(str(path), storage_options)
    except StoreError as exc:
        report.add("damage", "manifest", str(exc))
        return report
    if not files.remote and not files.local.is_dir():
        report.add("damage", "manifest", f"{files.uri()}: no such folder" if not files.local.exists()
                   else f"{files.uri()}: a file, not a store folder")
        return report
    layout = _check_manifest(files, report)
    if layout is None:
        return report
    states = _read_states(files, stream_id, layout, report)
    rows = _read_rows(files, layout, stream_id, report, counts={sid: st["counts"] for sid, st in states.items()})
    _check_leftover_files(files, stream_id, states, report)
    for sid, state in sorted(states.items()):
        _check_stream(files, sid, state, layout, rows, report, check_kv)
        _check_pending(files, sid, state, report)
        if rows is not None:
            check_meaning(sid, state, (rows.get("meta") or {}).get(sid, {}), report)
    if rows is not None and rows.get("table") is not None and stream_id is None:
        unknown = sorted(set(rows["by_stream"]) - set(states))
        for sid in unknown:
            report.add("leftover", "unknown_stream", f"index rows of stream {sid!r}, which has no state file "
                       f"({len(rows['by_stream'][sid])} rows)", sid)
    return report


def check_backend(backend: Any, report: VerifyReport, check_kv: bool = True) -> None:
    """The per-stream checks of :func:`verify_store` over an open :class:`TieredBackend` (its committed counts)."""
    sid = backend.stream_id
    state = {"counts": dict(backend._committed), "levels": dict(backend._level_info)}
    layout = {"num_layers": backend.layout.num_layers, "num_kv_heads": backend.layout.num_kv_heads,
              "head_dim": backend.layout.head_dim, "dtype": backend.layout.dtype}
    rows = _read_rows(backend.files, layout, sid, report, table=backend.table, counts={sid: state["counts"]})
    _check_stream(backend.files, sid, state, layout, rows, report, check_kv, archive=backend.archive,
                  own_lock=backend._lockfile is not None)


# ------------------------------------------------------------------------------ parts
def _check_manifest(files: Files, report: VerifyReport) -> dict[str, Any] | None:
    where = files.uri(MANIFEST)
    try:
        m = files.read_json(MANIFEST)
    except StoreError as exc:
        report.add("damage", "manifest", str(exc))
        return None
    if m is None:
        report.add("damage", "manifest", f"{where}: missing (not a mukv store, or its manifest was deleted)")
        return None
    if m.get("format") != FORMAT:
        report.add("damage", "manifest", f"{where}: format {m.get('format')!r}, not {FORMAT!r}")
        return None
    try:
        version = int(m.get("format_version", 0))
    except (TypeError, ValueError):
        version = -1
    if not 1 <= version <= FORMAT_VERSION:
        report.add("damage", "manifest", f"{where}: format version {m.get('format_version')!r}; this mukv reads "
                   f"1 to {FORMAT_VERSION}")
        return None
    lay = m.get("layout")
    try:
        layout = {k: int(lay[k]) for k in ("num_layers", "num_kv_heads", "head_dim")}
        if min(layout.values()) < 1:
            raise ValueError("sizes must be positive")
        layout["dtype"] = dtype_from_name(lay["dtype"])
    except (TypeError, KeyError, ValueError, StoreError) as exc:
        report.add("damage", "manifest", f"{where}: invalid KV layout {lay!r} ({exc})")
        return None
    return layout


def _read_states(files: Files, only: str | None, layout: dict[str, Any], report: VerifyReport) -> dict[str, dict]:
    names = files.listing("streams")
    if only is not None:
        wanted = [f"{only}.json"]
        if wanted[0] not in names:
            report.add("damage", "state", f"{files.uri('streams')}: no stream {only!r}", only)
            return {}
    else:
        wanted = [n for n in names if n.endswith(".json") and not n.startswith(".")]
    out: dict[str, dict] = {}
    for name in wanted:
        sid = name[: -len(".json")]
        rel = f"streams/{name}"
        try:
            check_stream_id(sid)
        except StoreError:
            report.add("damage", "state", f"{files.uri(rel)}: not a valid stream id; not a file mukv wrote")
            continue
        try:
            found = read_state(files, sid, {k: layout[k] for k in ("num_layers", "num_kv_heads", "head_dim")})
        except StoreError as exc:
            report.add("damage", "state", f"stream {sid!r}: {exc}", sid)
            continue
        if found is None:
            continue
        state, values = found
        counts = dict(state.counts)
        levels = {lv: info.model_dump() for lv, info in state.levels.items()}
        out[sid] = {"counts": counts, "levels": levels, "txn": state.txn, "values": values}
    return out


def _read_rows(files: Files, layout: dict[str, Any], stream_id: str | None, report: VerifyReport,
               table: Any = None, counts: dict[str, dict[str, int]] | None = None) -> dict[str, Any] | None:
    """Index rows (stream_id, level, block_id, crc32): ``{"table": BlockTable | None, "by_stream": {...},
    "complete": bool}``, or ``None`` if the index cannot be opened."""
    from .lance_index import BlockTable

    index = files.uri("index")
    if table is None:
        if not files.remote and not (files.local / "index").exists():
            return {"table": None, "by_stream": {}, "complete": True}
        try:
            table = BlockTable(files, layout["num_kv_heads"] * layout["head_dim"], read_only=True,
                               vector_index_rows=None)
            if table.table() is None:
                return {"table": None, "by_stream": {}, "complete": True}
        except StoreError as exc:
            report.add("damage", "index", f"{index}: cannot be opened: {exc}")
            return None
    cols = ["stream_id", "level", "block_id", "crc32"]
    have = set(table.table().schema.names) if table.table() is not None else set()
    cols += [c for c in META_COLUMNS if c in have]
    complete = True
    try:
        t = table.rows(stream_id, cols)
    except StoreError as exc:
        older = table.rows_of_readable_version(stream_id, cols)
        if older is not None and not _holds(older[2], counts or {}):
            older = None  # an older version lacks committed rows: say which rows the latest version lost
        if older is not None:
            # e.g. a copy taken while the store was being written: the newest version of the table
            # references a file copied too late. If the older version holds every committed row (checked
            # below, as for any version), nothing committed is lost, and a writer opening the store goes
            # back to it.
            latest, version, t = older
            report.add("leftover", "index_version", f"{index}: the table's latest version {latest} cannot be "
                       f"read ({exc}); version {version} can, and is checked (a writer opening the store restores "
                       "it)")
        else:
            t, missing, complete = table.rows_by_fragment(cols)
            report.add("damage", "index", f"{index}: the table cannot be read whole ({exc})")
            for m in missing:
                report.add("damage", "index_fragment", f"{index}: {m}")
            if not complete:
                report.add("damage", "index", f"{index}: not every fragment of the table could be found; rows may "
                           "be missing beyond those listed")
            if t is not None and stream_id is not None:
                t = t.filter(_equals(t.column("stream_id"), stream_id))
    by_stream: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    meta: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    if t is not None and t.num_rows:
        report.index_rows += int(t.num_rows)
        sids = np.asarray(t.column("stream_id").to_pylist(), dtype=object)
        lvs = np.asarray(t.column("level").to_pylist(), dtype=object)
        bid = t.column("block_id").to_numpy()
        crc = t.column("crc32").to_numpy()
        extra = {c: t.column(c).to_numpy() for c in META_COLUMNS if c in t.column_names}
        extra["block_id"] = bid
        for s in np.unique(sids):
            sel = sids == s
            by_stream[str(s)] = {str(lv): (bid[sel & (lvs == lv)], crc[sel & (lvs == lv)])
                                 for lv in np.unique(lvs[sel])}
            meta[str(s)] = {str(lv): {c: a[sel & (lvs == lv)] for c, a in extra.items()}
                            for lv in np.unique(lvs[sel])}
    return {"table": table, "by_stream": by_stream, "meta": meta, "complete": complete}


def _holds(t, counts: dict[str, dict[str, int]]) -> bool:
    """Whether rows ``t`` (stream_id, level, block_id) have every committed block of ``counts``."""
    if t is None:
        return not any(n for levels in counts.values() for n in levels.values())
    sids = np.asarray(t.column("stream_id").to_pylist(), dtype=object)
    lvs = np.asarray(t.column("level").to_pylist(), dtype=object)
    bid = t.column("block_id").to_numpy()
    for sid, levels in counts.items():
        for lv, n in levels.items():
            got = np.unique(bid[(sids == sid) & (lvs == lv)])
            if n and np.count_nonzero((got >= 0) & (got < n)) != n:
                return False
    return True


def _equals(column, value: str):
    import pyarrow.compute as pc

    return pc.equal(column, value)


def _check_stream(files: Files, sid: str, state: dict, layout: dict[str, Any], rows: dict[str, Any] | None,
                  report: VerifyReport, check_kv: bool, archive: Any = None, own_lock: bool = False) -> None:
    from .zarr_kv import KVArchive

    counts: dict[str, int] = state["counts"]
    if archive is None:
        archive = KVArchive(files, sid, layout["dtype"], read_only=True)
    levels_report = report.streams.setdefault(sid, {})
    index_ok = rows is not None
    stream_rows = (rows or {}).get("by_stream", {}).get(sid, {})
    active = not own_lock and writer_active(files, sid)
    if active:
        report.add("note", "writer_active", f"stream {sid!r} is being written by another process; blocks beyond "
                   "its committed counts may be in flight", sid)
    on_disk = set()
    try:
        on_disk = set(archive.levels())
    except Exception:  # noqa: BLE001 - a listing error shows up below as missing KV
        pass
    for level in sorted(set(counts) | set(stream_rows) | on_disk):
        n = counts.get(level, 0)
        entry = {"blocks": n, "verified": 0, "missing": [], "corrupt": [], "unreadable": []}
        if n or level in counts:
            levels_report[level] = entry
        ids, crcs = stream_rows.get(level, (np.empty(0, np.int64), np.empty(0, np.int64)))
        # rows: exactly one per committed id, none beyond
        crc_of: dict[int, int] = {}
        if index_ok:
            beyond = ids[(ids >= n) | (ids < 0)]
            if beyond.size:
                report.add("leftover", "orphan_rows", f"stream {sid!r} {level}: {beyond.size} index rows beyond "
                           f"the {n} committed blocks (blocks {describe_ids(beyond)})", sid, level, beyond)
            inside = (ids >= 0) & (ids < n)
            uniq, first, times = np.unique(ids[inside], return_index=True, return_counts=True)
            dup = uniq[times > 1]
            if dup.size:
                report.add("damage", "duplicate_rows", f"stream {sid!r} {level}: blocks {describe_ids(dup)} have "
                           "more than one index row", sid, level, dup)
            crc_of = dict(zip(uniq.tolist(), crcs[inside][first].tolist()))
            missing = np.setdiff1d(np.arange(n, dtype=np.int64), uniq)
            if missing.size:
                report.add("damage", "missing_rows", f"stream {sid!r} {level}: {missing.size} committed blocks "
                           f"have no index row (blocks {describe_ids(missing)})", sid, level, missing)
                entry["missing"] = missing[:_MAX_IDS].tolist()
        # KV: arrays (one per codec the level was written with) of the right block shape that tile the
        # committed blocks; bytes matching the rows' crc32; rows that their codec decodes
        try:
            parts = archive.parts(level)
        except StoreError as exc:
            report.add("damage", "kv_array", f"stream {sid!r} {level}: {exc}", sid, level, np.arange(n))
            entry["unreadable"] = list(range(min(n, _MAX_IDS)))
            continue
        length = max((p.end for p in parts), default=0)
        if level not in counts:
            if length:
                report.add("leftover", "orphan_kv", f"stream {sid!r}: KV of level {level!r} ({length} blocks), "
                           "which the stream's state does not count", sid, level)
            continue
        info = state["levels"].get(level)
        wrong = [p for p in parts if info is not None and list(p.block_shape) != [int(x) for x in info["block_shape"]]]
        if wrong:
            report.add("damage", "kv_array", f"stream {sid!r} {level}: KV blocks of shape {wrong[0].block_shape} "
                       f"in {wrong[0].rel}, the state says {tuple(info['block_shape'])}", sid, level, np.arange(n))
            continue
        covered = np.zeros(max(n, length), dtype=np.int64)  # arrays holding each block
        for p in parts:
            covered[p.first : p.end] += 1
        twice = np.flatnonzero(covered[:n] > 1)
        if twice.size:
            report.add("damage", "kv_array", f"stream {sid!r} {level}: blocks {describe_ids(twice)} have KV in "
                       "more than one array", sid, level, twice)
        lost = np.flatnonzero(covered[:n] == 0)
        if lost.size:
            report.add("damage", "missing_kv", f"stream {sid!r} {level}: {lost.size} committed blocks have no KV "
                       f"on disk (blocks {describe_ids(lost)})", sid, level, lost)
        if length > n:
            report.add("leftover", "orphan_kv", f"stream {sid!r} {level}: {length - n} KV rows beyond the {n} "
                       "committed blocks", sid, level, np.arange(n, length))
        bad_read, corrupt, undecodable, why = [], [], [], ""
        for p in parts:
            r, c, u, w = _check_kv(archive, p, level, min(n, p.end), crc_of if index_ok else None, check_kv)
            bad_read.append(r)
            corrupt.append(c)
            undecodable.append(u)
            why = why or w
        bad_read, corrupt, undecodable = (np.unique(np.concatenate([np.empty(0, np.int64), *x]))
                                          for x in (bad_read, corrupt, undecodable))
        if bad_read.size:
            report.add("damage", "unreadable_kv", f"stream {sid!r} {level}: KV of blocks {describe_ids(bad_read)} "
                       f"cannot be read ({why})", sid, level, bad_read)
        if corrupt.size:
            report.add("damage", "corrupt_kv", f"stream {sid!r} {level}: KV of blocks {describe_ids(corrupt)} does "
                       "not match its checksum", sid, level, corrupt)
        if undecodable.size:
            report.add("damage", "undecodable_kv", f"stream {sid!r} {level}: KV of blocks "
                       f"{describe_ids(undecodable)} matches its checksum but its codec decodes it to NaN or "
                       "infinite values", sid, level, undecodable)
        entry["unreadable"] = np.union1d(bad_read, lost)[:_MAX_IDS].tolist()
        entry["corrupt"] = np.union1d(corrupt, undecodable)[:_MAX_IDS].tolist()
        if check_kv and index_ok and rows.get("complete", True):
            bad = set(bad_read.tolist()) | set(corrupt.tolist()) | set(undecodable.tolist()) | set(entry["missing"])
            bad |= set(lost.tolist())
            entry["verified"] = int(sum(1 for i in range(min(n, length)) if i not in bad and i in crc_of))
        levels_report[level] = entry


def _check_pending(files: Files, sid: str, state: dict, report: VerifyReport) -> None:
    """The pending frames file the stream's state names: present, of its size, matching its CRC-32."""
    p = getattr(state.get("values"), "pending", None)
    why = stored_pending_problem(files, sid, p) if p is not None else None
    if why is None:
        return
    try:  # a writer may have committed since the state was read, naming a newer file and removing this one
        now = (files.read_json(f"streams/{sid}.json") or {}).get("values", {}).get("pending")
    except (StoreError, AttributeError):
        now = None
    if not isinstance(now, dict) or now.get("file") != p.file or now.get("crc32") != p.crc32:
        return
    report.add("damage", "pending_frames", f"stream {sid!r}: {why}: frames {p.start}..{p.start + p.count - 1}, "
               "encoded but not yet stored by every level, are lost (reopened for writing, the stream goes on "
               f"without them; `mukv repair` drops the record)", sid)


def _check_kv(archive: Any, part: Any, level: str, end: int, crc_of: dict[int, int] | None,
              check_kv: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(unreadable ids, corrupt ids, undecodable ids, first read error) among the blocks of one array below
    ``end``: read shard by shard, then chunk by chunk. The first and the last block of each shard read are
    also decoded with the array's codec (their values must be finite)."""
    lo = part.first
    if end <= lo or not check_kv:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64), ""
    arr = part.array
    per_shard = int(getattr(arr, "shards", None)[0] if getattr(arr, "shards", None) else arr.chunks[0])
    per_chunk = int(arr.chunks[0])
    unreadable: list[int] = []
    corrupt: list[int] = []
    undecodable: list[int] = []
    errors: list[str] = []

    def check(a0: int, b0: int, step: int) -> None:
        for a in range(a0, b0, step):
            b = min(b0, a + step)
            try:
                data = archive.read(level, np.arange(a, b))
            except StoreError as exc:
                if step > per_chunk:
                    check(a, b, per_chunk)
                else:
                    unreadable.extend(range(a, b))
                    errors.append(str(exc).split("; run `mukv", 1)[0])
                continue
            if crc_of is not None:
                for i, c in zip(range(a, b), block_crc(data).tolist()):
                    if i in crc_of and int(crc_of[i]) != int(c):
                        corrupt.append(i)
            for j in sorted({0, b - a - 1}):
                if a + j not in corrupt and not _decodes(part, data[j : j + 1], archive.dtype):
                    undecodable.append(a + j)

    check(lo, end, max(per_shard, per_chunk))
    return (np.asarray(unreadable, np.int64), np.asarray(corrupt, np.int64), np.asarray(undecodable, np.int64),
            errors[0] if errors else "")


def _decodes(part: Any, rows: np.ndarray, dtype: Any) -> bool:
    """Whether ``part``'s codec decodes stored rows to finite KV of ``dtype`` (on the CPU)."""
    import torch

    from mukv.blocks import EncodedKV

    from .zarr_kv import from_numpy

    try:
        t = from_numpy(rows, part.row_dtype) if part.row_dtype.is_floating_point else torch.from_numpy(
            np.ascontiguousarray(rows))
        kv = part.codec.decode_blocks(EncodedKV(t, part.block_shape, dtype), "cpu")
    except Exception:  # noqa: BLE001 - a codec that fails on its own rows: reported as undecodable
        return False
    return bool(torch.isfinite(kv).all())


def writer_active(files: Files, sid: str) -> bool:
    """Whether another process holds stream ``sid``'s writer lock (local stores; probed, never taken), or
    its unexpired lease (object stores)."""
    if files.remote:
        import time

        try:
            lease = (files.read_json(f"streams/{sid}.json") or {}).get("lease") or {}
        except StoreError:
            return False
        exp = lease.get("expires")
        return lease.get("owner") is not None and isinstance(exp, (int, float)) and exp > time.time()
    lock = files.local / "streams" / f"{sid}.lock"
    if not lock.exists():
        return False
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


_TEMP = re.compile(r"(\.partial$)|(^\..*\.tmp$)")


def _check_leftover_files(files: Files, only: str | None, states: dict[str, dict], report: VerifyReport) -> None:
    if files.remote:
        return
    root = files.local
    temps = []
    for sub in ("streams", "kv") if only is None else ("streams", f"kv/{only}"):
        base = root / sub
        if base.exists():
            temps += [Path(d) / n for d, _, names in os.walk(base) for n in names if _TEMP.search(n)]
    if temps:
        report.add("leftover", "temp_files", f"{len(temps)} temp file(s) of an unfinished write, e.g. "
                   f"{temps[0].relative_to(root)}")
    if only is None:
        for name in files.listing("kv"):
            if name != "zarr.json" and name not in states and (root / "kv" / name).is_dir():
                report.add("leftover", "orphan_kv", f"KV of stream {name!r}, which has no state file", name)


def main(argv: list[str] | None = None) -> int:
    """``STORE [--stream ID] [--json] [--no-kv]``: print the report; exit 0 if OK, 1 if damaged.

    For a command line (``mukv inspect STORE --verify`` calls :func:`verify_store` the same way).
    """
    import argparse

    p = argparse.ArgumentParser(prog="verify_store", description="Check a mukv disk store end to end.")
    p.add_argument("store")
    p.add_argument("--stream", dest="stream_id")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-kv", action="store_true", help="skip reading KV (rows, files and lengths only)")
    args = p.parse_args(argv)
    rep = verify_store(args.store, args.stream_id, check_kv=not args.no_kv)
    print(json.dumps(rep.to_dict(), indent=1) if args.json else rep.summary())
    return 0 if rep.ok else 1
