"""``mukv repair``: make a stream's state agree with its data again, only when asked.

A writer never "repairs" a stream by deleting committed data: a stream whose state disagrees with its
data refuses to open for writing (:meth:`TieredBackend._recover`) and ``verify_store`` reports it. This
module says what a repair would do (:func:`plan_repair`) and does it on request (:func:`apply_repair`):

1. per level, keep the longest run of blocks ``0 .. m - 1`` that are whole and true: one index row
   each, KV matching its checksum, frame windows in stream order without overlaps or repeats, times
   increasing with the frame and agreeing with the other levels' times of the same frames; blocks a
   killed writer left uncommitted (a transaction the state never committed) are not kept;
2. the state is rebuilt around what is kept: block counts (which may grow, when the state had lost
   count of committed blocks, or shrink, when blocks repeat frames or go back in time), frames seen,
   cursors, stream time; the stream's contract (model and configuration) is kept as recorded;
3. what is not kept is deleted (index rows, KV rows), with leftovers of killed writers.

Nothing changes without :func:`apply_repair`, which re-plans under the stream's writer lock.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mukv.errors import StoreError
from mukv.state import validate_values

from .files import FORMAT, FORMAT_VERSION, Files, check_stream_id
from .state_file import LevelInfo, stored_pending_problem, validate_manifest, validate_state
from .zarr_kv import block_crc

MANIFEST = "mukv.json"
_COLS = ["level", "block_id", "frame_start", "frame_end", "t_start", "t_end", "crc32", "tokens"]


@dataclass
class StreamRepair:
    """What a repair does to one stream.

    Attributes:
        stream_id: the stream.
        actions: lines for a person, in order.
        counts: blocks kept per level (the new counts).
        delete_from: per level, the first block id deleted (rows and KV from there on go).
        state: the new state file, or ``None`` when the state stays as it is.
        refused: why this stream cannot be repaired (nothing is done to it), or ``None``.
    """

    stream_id: str
    actions: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    delete_from: dict[str, int] = field(default_factory=dict)
    state: dict[str, Any] | None = None
    refused: str | None = None

    @property
    def needed(self) -> bool:
        return bool(self.actions) and self.refused is None


@dataclass
class RepairPlan:
    """:func:`plan_repair`'s answer: one :class:`StreamRepair` per stream."""

    path: str
    streams: list[StreamRepair] = field(default_factory=list)
    applied: bool = False

    @property
    def needed(self) -> bool:
        return any(s.needed for s in self.streams)

    def summary(self) -> str:
        lines = [f"store {self.path}: " + ("repaired" if self.applied else
                                           "nothing to repair" if not self.needed and not any(
                                               s.refused for s in self.streams) else "repair plan")]
        for s in self.streams:
            if s.refused:
                lines.append(f"  stream {s.stream_id!r}: cannot repair: {s.refused}")
            elif s.actions:
                lines.append(f"  stream {s.stream_id!r}:")
                lines += [f"    - {a}" for a in s.actions]
        if self.needed and not self.applied:
            lines.append("nothing was changed; run again with --yes to do this")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "applied": self.applied,
                "streams": [{"stream_id": s.stream_id, "actions": s.actions, "counts": s.counts,
                             "delete_from": s.delete_from, "refused": s.refused} for s in self.streams]}


def plan_repair(path: str, stream_id: str | None = None, storage_options: dict[str, Any] | None = None,
                check_kv: bool = True) -> RepairPlan:
    """What a repair of the store (or of one stream) would do; changes nothing."""
    from .streams import stream_ids

    files = Files(str(path), storage_options)
    raw = files.read_json(MANIFEST)
    if raw is None:
        raise StoreError(f"{path}: not a mukv store (no {MANIFEST})")
    manifest = validate_manifest(raw, files.uri(MANIFEST), FORMAT)
    ids = [check_stream_id(stream_id)] if stream_id is not None else stream_ids(files)
    plan = RepairPlan(str(path))
    for sid in ids:
        plan.streams.append(_plan_stream(files, manifest, sid, check_kv))
    return plan


def _raw_state(files: Files, sid: str) -> dict[str, Any] | None:
    """The state file as JSON, however invalid its fields (``None`` if it is not JSON at all)."""
    try:
        return files.read_json(f"streams/{sid}.json")
    except StoreError:
        return None


def _plan_stream(files: Files, manifest: Any, sid: str, check_kv: bool) -> StreamRepair:
    from .lance_index import BlockTable
    from .zarr_kv import KVArchive, dtype_from_name

    rep = StreamRepair(sid)
    layout = manifest.layout.model_dump()
    raw = _raw_state(files, sid)
    if raw is None:
        rep.refused = "its state file is missing or not JSON, so its configuration is unknown; delete the stream"
        return rep
    valid = True
    try:
        state, values = validate_state(raw, files.uri(f"streams/{sid}.json"), sid, layout)
        txn, counts, vals = state.txn, dict(state.counts), dict(state.values)
        levels = {lv: i.model_dump() for lv, i in state.levels.items()}
    except StoreError as exc:
        valid = False
        rep.actions.append(f"rebuild the state from the data: {exc}")
        vals = raw.get("values") if isinstance(raw.get("values"), dict) else {}
        try:
            validate_values({"session": vals.get("session")}, "contract")
        except StoreError:
            rep.refused = "its state is invalid and its recorded configuration with it; delete the stream"
            return rep
        txn, counts, levels = None, {}, {}
    table = BlockTable(files, manifest.layout.num_kv_heads * manifest.layout.head_dim, read_only=True,
                       vector_index_rows=None)
    have_txn = table.table() is not None and "txn" in table.table().schema.names
    rows = table.rows(sid, _COLS + (["txn"] if have_txn else [])) if table.table() is not None else None
    archive = KVArchive(files, sid, dtype_from_name(layout["dtype"]), read_only=True)
    cursors = vals.get("cursors") if valid and isinstance(vals.get("cursors"), dict) else {}
    keep: dict[str, int] = {}
    frame_time: dict[int, float] = {}
    max_end, max_t, min_t = 0, None, None
    by_level: dict[str, dict[str, np.ndarray]] = {}
    if rows is not None and rows.num_rows:
        lv_col = np.asarray(rows.column("level").to_pylist(), dtype=object)
        for lv in np.unique(lv_col):
            sel = lv_col == lv
            by_level[str(lv)] = {c: rows.column(c).to_numpy()[sel] for c in rows.column_names if c != "level"}
    # finest windows first: their times define each frame's time for the others
    order = sorted(by_level, key=lambda lv: (int(np.median(by_level[lv]["frame_end"] - by_level[lv]["frame_start"]))
                                             if by_level[lv]["block_id"].size else 0, lv))
    for level in order:
        cols = by_level[level]
        m, why = _keep_prefix(level, cols, counts.get(level), txn, cursors.get(level), have_txn, archive,
                              frame_time, check_kv)
        keep[level] = m
        n = counts.get(level, 0)
        if valid and m > n:
            rep.actions.append(f"{level}: count blocks {n}..{m - 1}, committed and intact but not counted by the state")
        if m < len(np.unique(cols["block_id"])) or (valid and m < n):
            first_bad = m
            rep.delete_from[level] = first_bad
            last = int(cols["block_id"].max())
            rep.actions.append(f"{level}: delete blocks {first_bad}..{last}" + (f" ({why})" if why else ""))
        if m:
            sel = np.argsort(cols["block_id"])[:m]
            max_end = max(max_end, int(cols["frame_end"][sel].max()))
            t = float(cols["t_end"][sel].max())
            max_t = t if max_t is None else max(max_t, t)
            t0 = float(cols["t_start"][sel].min())
            min_t = t0 if min_t is None else min(min_t, t0)
            info = LevelInfo(tokens=int(cols["tokens"][sel[0]]),
                             block_shape=[layout["num_layers"], 2, layout["num_kv_heads"], int(cols["tokens"][sel[0]]),
                                          layout["head_dim"]])
            levels.setdefault(level, info.model_dump())
    for level, n in counts.items():
        if level not in keep and n:
            keep[level] = 0
            rep.actions.append(f"{level}: the state counts {n} blocks but none has an index row; count 0")
    rep.counts = {lv: m for lv, m in keep.items()}
    _plan_pending(files, sid, vals if valid else {}, rep)
    new_vals = dict(vals)
    seen = int(vals.get("frames_seen", 0)) if valid else 0
    if valid and max_end <= seen and all(keep.get(lv, 0) == n for lv, n in counts.items()) and \
            not rep.delete_from and not rep.actions:
        return rep  # nothing to do for this stream
    frames_seen = max(max_end, seen if valid and not rep.delete_from else 0)
    new_cursors = {}
    for lv, m in keep.items():
        if m:
            sel = np.argsort(by_level[lv]["block_id"])[:m]
            new_cursors[lv] = int(by_level[lv]["frame_end"][sel].max())
        else:
            new_cursors[lv] = 0
    if valid and seen != frames_seen:
        rep.actions.append(f"frames seen: {seen} -> {frames_seen}")
    last_time = max_t if (max_t is not None and (not valid or rep.delete_from or vals.get("last_time") is None
                                                  or max_t > vals["last_time"])) else vals.get("last_time")
    new_vals.update(frames_seen=frames_seen, cursors=new_cursors, last_time=last_time, pending=None)
    first = vals.get("first_time")
    if not (isinstance(first, (int, float)) and not isinstance(first, bool) and np.isfinite(first)
            and (min_t is None or first <= min_t) and (last_time is None or first <= last_time)):
        if min_t is not None or first is not None:
            rep.actions.append(f"first time: {first!r} -> {min_t!r} (the earliest kept block's)")
        new_vals["first_time"] = min_t
    new_vals["sources"] = [s for s in (vals.get("sources") or []) if isinstance(s, dict)]
    for s in new_vals["sources"]:
        fr = s.get("frames")
        if isinstance(fr, list) and len(fr) == 2 and isinstance(fr[1], int) and fr[1] > frames_seen:
            s["frames"] = [min(fr[0], frames_seen), frames_seen]
            s["complete"] = False
    try:
        validate_values(new_vals, "repaired state")
    except StoreError as exc:
        rep.refused = f"the rebuilt state would not be valid ({exc})"
        return rep
    rep.state = {"format_version": FORMAT_VERSION, "stream_id": sid,
                 "txn": (txn if txn is not None else int(max((by_level[lv].get("txn", np.zeros(1)).max()
                                                              for lv in by_level), default=0))) + 1,
                 "counts": rep.counts, "levels": {lv: levels[lv] for lv in rep.counts if lv in levels},
                 "values": new_vals, "updated": time.time()}
    if not rep.actions:
        rep.actions.append("rewrite the state to agree with the data")
    return rep


def _plan_pending(files: Files, sid: str, vals: dict[str, Any], rep: StreamRepair) -> None:
    """An action dropping the state's pending frames record where its file is missing, of the wrong size
    or fails its CRC-32 (reopening would go on without those frames; the state then says so too)."""
    if not vals.get("pending"):
        return
    p = validate_values(vals, f"stream {sid!r}").pending
    why = stored_pending_problem(files, sid, p)
    if why:
        rep.actions.append(f"drop the pending frames record ({why}): the levels waiting for frames "
                           f"{p.start}..{p.start + p.count - 1} go on from the next frame fed")


def _keep_prefix(level: str, cols: dict[str, np.ndarray], counted: int | None, txn: int | None,
                 cursor: int | None, have_txn: bool, archive: Any, frame_time: dict[int, float], check_kv: bool
                 ) -> tuple[int, str]:
    """How many blocks ``0 .. m - 1`` of a level to keep, and why the next one is not kept."""
    ids = cols["block_id"]
    order = np.argsort(ids, kind="stable")
    ids_s = ids[order]
    fs, fe, ts = cols["frame_start"][order], cols["frame_end"][order], cols["t_start"][order]
    crc = cols["crc32"][order]
    length = archive.length(level)
    m = 0
    why = ""
    prev: tuple[int, int] | None = None
    last_t = None
    for j in range(ids_s.size):
        if ids_s[j] != m:
            why = f"block {m} has {'no' if ids_s[j] > m else 'a second'} index row"
            break
        beyond_state = counted is not None and m >= counted
        if beyond_state:
            committed = (have_txn and txn is not None and int(cols["txn"][order][j]) <= txn) or \
                (cursor is not None and int(fe[j]) <= cursor)
            if not committed:
                why = "written by a transaction the stream never committed"
                break
        if m >= length:
            why = f"block {m} has no KV"
            break
        win = (int(fs[j]), int(fe[j]))
        if win[1] <= win[0] or (prev is not None and win != prev and win[0] < prev[1]):
            why = f"block {m} covers frames {win[0]}..{win[1] - 1} again"
            break
        t = float(ts[j])
        if not np.isfinite(t) or (last_t is not None and win != prev and t <= last_t):
            why = f"block {m} goes back in stream time"
            break
        if win[0] in frame_time and abs(frame_time[win[0]] - t) > 1e-9 * max(1.0, abs(t)):
            why = f"block {m} gives frame {win[0]} another time"
            break
        if check_kv:
            data = archive.read(level, np.array([m]))
            if int(block_crc(data)[0]) != int(crc[j]):
                why = f"block {m}'s KV does not match its checksum"
                break
        prev, last_t = win, t
        m += 1
    for j in range(m):  # the kept blocks' times become the frames' times
        frame_time.setdefault(int(fs[j]), float(ts[j]))
    return m, why


def apply_repair(path: str, stream_id: str | None = None, storage_options: dict[str, Any] | None = None
                 ) -> RepairPlan:
    """Plan again under each stream's writer lock, then do it: delete what is not kept (index rows,
    KV rows, pending files), write the new state (the commit point), remove leftovers."""
    from .lance_index import BlockTable
    from .streams import _lock
    from .zarr_kv import KVArchive, dtype_from_name

    files = Files(str(path), storage_options)
    first = plan_repair(path, stream_id, storage_options, check_kv=True)
    out = RepairPlan(str(path))
    for s in first.streams:
        if not s.needed:
            out.streams.append(s)
            continue
        lock = _lock(files, s.stream_id)
        try:
            rep = plan_repair(path, s.stream_id, storage_options, check_kv=True).streams[0]
            out.streams.append(rep)
            if not rep.needed or rep.state is None:
                continue
            manifest = validate_manifest(files.read_json(MANIFEST), files.uri(MANIFEST), FORMAT)
            table = BlockTable(files, manifest.layout.num_kv_heads * manifest.layout.head_dim, vector_index_rows=None)
            table.delete_uncounted(rep.stream_id, rep.counts)
            from .layer_keys import LayerKeyArchive

            for archive in (KVArchive(files, rep.stream_id, dtype_from_name(manifest.layout.dtype)),
                            LayerKeyArchive(files, rep.stream_id, torch.float16)):  # KV, and per-layer keys
                for level in archive.levels():
                    if archive.length(level) > rep.counts.get(level, 0):
                        archive.truncate(level, rep.counts.get(level, 0))
            old = _raw_state(files, rep.stream_id) or {}
            pend = (old.get("values") or {}).get("pending") if isinstance(old.get("values"), dict) else None
            files.write_json(f"streams/{rep.stream_id}.json", json.loads(json.dumps(rep.state)))
            if isinstance(pend, dict) and isinstance(pend.get("file"), str):
                try:
                    files.delete(f"streams/{rep.stream_id}/{check_stream_id(pend['file'])}")
                except StoreError:
                    pass
        finally:
            if lock is not None:
                lock.release()
    out.applied = True
    return out
