"""The meaning checks of :func:`~mukv.backends.disk.verify.verify_store`: not whether the bytes are
intact, but whether the stream says something true.

Per stream, over its committed blocks (ids ``0 .. count - 1`` of every level) and its state:

* **frames**: a level's blocks cover windows in stream order: ids ascend with frame starts, two blocks
  either share a window or do not overlap, and every window holds the same number of blocks
  (``overlapping_frames``, ``duplicate_frames``);
* **times**: stream time increases strictly with the frame index, within a level and across levels
  (a frame has one time, whichever level stores it) (``time_order``, ``time_mismatch``);
* **state against data**: no block ends after the frames the state has seen, a level's cursor is
  past its last block, the last time is the latest block's (``state_behind_data``);
  a row beyond the counts that a committed transaction wrote, or whose frames the state's cursor says
  were covered, means the state lost count of committed data (``uncounted_committed``);
* **one compression per stream**: every block of a level keeps the same number of tokens, the number
  the state records, and the number the stream's own configuration gives (``mixed_compression``);
  the stream's contract (its configuration) is valid (``contract``).

The checks of the state against the data need a session's state (a stream whose state records its
contract); blocks written straight through the backend (benchmarks, tests) get the data checks only.

Each finding is damage: the stream would answer from memory that does not match its video.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .zarr_kv import describe_ids


def _tol(t: np.ndarray) -> float:
    return 1e-9 * max(1.0, float(np.abs(t).max()) if t.size else 1.0)


def check_meaning(sid: str, state: dict[str, Any], meta: dict[str, dict[str, np.ndarray]], report: Any) -> None:
    """Add what is wrong with stream ``sid``'s meaning to ``report`` (see the module docstring).

    Args:
        state: ``{"counts", "levels", "txn", "values"}`` as :func:`~.verify._read_states` reads it.
        meta: per level, the stream's index rows as arrays (``block_id``, ``frame_start``, ``frame_end``,
            ``t_start``, ``t_end``, ``tokens``, and ``txn`` where the table has it).
    """
    values = state.get("values")
    if values is not None and values.session is None:
        values = None  # not a session's stream (blocks written straight through the backend): no state to hold
    counts: dict[str, int] = state["counts"]
    frame_time: dict[int, float] = {}
    max_end, max_t = 0, -math.inf
    cursors = dict(values.cursors or {}) if values is not None else {}
    for level in sorted(set(counts) | set(meta)):
        cols = meta.get(level)
        if not cols or "block_id" not in cols or "frame_start" not in cols:
            continue
        n = counts.get(level, 0)
        ids = cols["block_id"]
        _uncounted(sid, level, ids, cols, n, state, cursors, report)
        inside = (ids >= 0) & (ids < n)
        if not inside.any():
            continue
        order = np.argsort(ids[inside], kind="stable")
        pick = lambda c: cols[c][inside][order] if c in cols else None  # noqa: E731
        bid, fs, fe, ts, te = pick("block_id"), pick("frame_start"), pick("frame_end"), pick("t_start"), pick("t_end")
        if len(np.unique(bid)) != bid.size:
            continue  # duplicate rows: reported by the row checks, the rest would repeat it
        _frames(sid, level, bid, fs, fe, report)
        if ts is not None and te is not None:
            _times(sid, level, bid, fs, fe, ts, te, frame_time, report)
            if te.size:
                max_t = max(max_t, float(np.nanmax(te)))
        max_end = max(max_end, int(fe.max()))
        if values is not None and level in cursors and int(fe.max()) > cursors[level]:
            report.add("damage", "state_behind_data", f"stream {sid!r} {level}: blocks reach frame {int(fe.max())} "
                       f"but the level's cursor is {cursors[level]}", sid, level, bid[fe > cursors[level]])
        _tokens(sid, level, bid, pick("tokens"), state, report)
    if values is None:
        return
    if max_end > values.frames_seen:
        report.add("damage", "state_behind_data", f"stream {sid!r}: blocks cover frames up to {max_end - 1} but the "
                   f"state has seen {values.frames_seen} frames (blocks of frames it never counted)", sid)
    if max_t > -math.inf and (values.last_time is None or max_t > values.last_time + _tol(np.array([max_t]))):
        report.add("damage", "state_behind_data", f"stream {sid!r}: blocks reach stream time {max_t:g} but the "
                   f"state's last time is {values.last_time}", sid)
    _contract(sid, state, report)


def _uncounted(sid: str, level: str, ids: np.ndarray, cols: dict[str, np.ndarray], n: int, state: dict[str, Any],
               cursors: dict[str, int], report: Any) -> None:
    beyond = ids >= n
    if not beyond.any():
        return
    committed = np.zeros(int(beyond.sum()), dtype=bool)
    if "txn" in cols:
        committed |= cols["txn"][beyond] <= int(state.get("txn", 0))
    if level in cursors and "frame_end" in cols:
        committed |= cols["frame_end"][beyond] <= cursors[level]
    if committed.any():
        bad = ids[beyond][committed]
        report.add("damage", "uncounted_committed", f"stream {sid!r} {level}: the state counts {n} blocks, but blocks "
                   f"{describe_ids(bad)} beyond them were committed (by their transaction, or because the state's "
                   "cursor covers their frames): the state lost count of its data", sid, level, bad)


def _frames(sid: str, level: str, bid: np.ndarray, fs: np.ndarray, fe: np.ndarray, report: Any) -> None:
    bad = bid[fe <= fs]
    if bad.size:
        report.add("damage", "overlapping_frames", f"stream {sid!r} {level}: blocks {describe_ids(bad)} end before "
                   "they start", sid, level, bad)
    same = (fs[1:] == fs[:-1]) & (fe[1:] == fe[:-1])
    after = fs[1:] >= fe[:-1]
    wrong = ~(same | after)
    if wrong.any():
        bad = bid[1:][wrong]
        report.add("damage", "overlapping_frames", f"stream {sid!r} {level}: blocks {describe_ids(bad)} cover frames "
                   "an earlier block of the level already covers (or go back in the stream)", sid, level, bad)
        return
    # blocks per window: every window holds the same number
    starts = np.flatnonzero(np.r_[True, ~same])
    sizes = np.diff(np.r_[starts, bid.size])
    if sizes.size > 1:
        mode = np.bincount(sizes).argmax()
        odd = starts[sizes != mode]
        # the newest window may hold fewer only if a batch was cut there; more is always a repeat
        odd = odd[sizes[sizes != mode] > mode] if odd.size else odd
        if odd.size:
            bad = bid[odd]
            report.add("damage", "duplicate_frames", f"stream {sid!r} {level}: windows starting at blocks "
                       f"{describe_ids(bad)} hold more blocks than the level's others ({mode}): frames stored twice",
                       sid, level, bad)


def _times(sid: str, level: str, bid: np.ndarray, fs: np.ndarray, fe: np.ndarray, ts: np.ndarray, te: np.ndarray,
           frame_time: dict[int, float], report: Any) -> None:
    if not (np.isfinite(ts).all() and np.isfinite(te).all()):
        bad = bid[~(np.isfinite(ts) & np.isfinite(te))]
        report.add("damage", "time_order", f"stream {sid!r} {level}: blocks {describe_ids(bad)} have times that are "
                   "not finite numbers", sid, level, bad)
        return
    tol = _tol(np.concatenate([ts, te]))
    bad = bid[te < ts - tol]
    if bad.size:
        report.add("damage", "time_order", f"stream {sid!r} {level}: blocks {describe_ids(bad)} end before they start "
                   "in stream time", sid, level, bad)
    new_window = (fs[1:] != fs[:-1])
    back = new_window & (ts[1:] <= ts[:-1] + tol)
    if back.any():
        bad = bid[1:][back]
        report.add("damage", "time_order", f"stream {sid!r} {level}: blocks {describe_ids(bad)} start at or before the "
                   "time of an earlier frame: stream time must increase with the frame index", sid, level, bad)
    # one time per frame, whichever level stores it (windows of one frame give it exactly)
    mismatch = []
    one = fe - fs == 1
    for i in np.flatnonzero(one):
        f, t = int(fs[i]), float(ts[i])
        if f in frame_time and abs(frame_time[f] - t) > tol:
            mismatch.append(int(bid[i]))
        frame_time.setdefault(f, t)
    for i in np.flatnonzero(~one):
        f = int(fs[i])
        if f in frame_time and abs(frame_time[f] - float(ts[i])) > tol:
            mismatch.append(int(bid[i]))
    if mismatch:
        report.add("damage", "time_mismatch", f"stream {sid!r} {level}: blocks {describe_ids(mismatch)} give their "
                   "frames another time than the stream's other blocks of the same frames (frames stored twice, "
                   "with different times)", sid, level, mismatch)


def _tokens(sid: str, level: str, bid: np.ndarray, tokens: np.ndarray | None, state: dict[str, Any],
            report: Any) -> None:
    info = (state.get("levels") or {}).get(level)
    if tokens is None or info is None:
        return
    k = int(info["tokens"])
    bad = bid[tokens != k]
    if bad.size:
        report.add("damage", "mixed_compression", f"stream {sid!r} {level}: blocks {describe_ids(bad)} keep another "
                   f"number of tokens than the level's {k}: blocks compressed two ways in one stream", sid, level, bad)
    expect = _expected_kept(level, state)
    if expect is not None and expect != k:
        report.add("damage", "mixed_compression", f"stream {sid!r} {level}: blocks keep {k} tokens, the stream's "
                   f"configuration keeps {expect}", sid, level)


def _expected_kept(level: str, state: dict[str, Any]) -> int | None:
    """Tokens a block of ``level`` keeps under the stream's recorded configuration (``None``: unknown)."""
    values = state.get("values")
    contract = values.session if values is not None else None
    if contract is None:
        return None
    tpf = contract.tokens_per_frame
    for lv in (contract.config or {}).get("levels", []):
        if not isinstance(lv, dict) or lv.get("name") != level:
            continue
        try:
            length = int(lv["tokens"]) if lv.get("tokens") else (int(lv.get("frames", 1)) * int(tpf) if tpf else None)
            if length is None:
                return None
            return max(1, min(length, math.floor(length * float(lv["keep_ratio"]) + 1e-9)))
        except (KeyError, TypeError, ValueError):
            return None
    return None


def _contract(sid: str, state: dict[str, Any], report: Any) -> None:
    from mukv.config import MukvConfig
    from mukv.errors import ConfigError

    values = state.get("values")
    contract = values.session if values is not None else None
    if contract is None:
        return
    try:
        cfg = MukvConfig.build(contract.config)
    except ConfigError as exc:
        report.add("damage", "contract", f"stream {sid!r}: its recorded configuration is invalid ({exc})", sid)
        return
    names = {lv.name for lv in cfg.levels}
    strange = sorted(set(state["counts"]) - names)
    if strange:
        report.add("damage", "contract", f"stream {sid!r}: levels {strange} hold blocks but are not levels of the "
                   f"stream's configuration ({sorted(names)})", sid)
