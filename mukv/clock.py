"""Stream time and wall-clock time.

A stream counts time in *stream seconds* from its first frame. It may also carry a *wall-clock
origin* (the Unix time of stream time 0): set explicitly when the stream is created
(``Session(..., wall_origin=...)``), or taken from the first timestamps fed when they are wall-clock
times (``numpy.datetime64``, ``datetime``, or numbers of at least :data:`~mukv.state.EPOCH_THRESHOLD`,
read as Unix seconds). Answers, ``mukv ask`` and ``mukv inspect`` then show ISO 8601 times, and
``Session.ask(since=..., until=...)`` accepts them.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np

from .errors import InputError
from .state import EPOCH_THRESHOLD, MAX_STREAM_TIME


def to_unix(value: Any, what: str = "time") -> float:
    """Unix seconds of a wall-clock time: a ``datetime`` (naive = UTC), ``numpy.datetime64``, an ISO 8601
    string, or a number of Unix seconds."""
    if isinstance(value, bool):
        raise InputError(f"{what} must be a time, not a boolean")
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.timestamp()
    if isinstance(value, np.datetime64):
        if np.isnat(value):
            raise InputError(f"{what} is NaT (not a time)")
        return float(value.astype("datetime64[ns]").astype(np.int64)) / 1e9
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 64:
            raise InputError(f"{what}: {value[:40]!r}... is not an ISO 8601 time")
        try:
            return to_unix(dt.datetime.fromisoformat(text.replace("Z", "+00:00")), what)
        except ValueError:
            raise InputError(f"{what}: {value!r} is not an ISO 8601 time (e.g. 2026-12-06T14:03:00Z)") from None
    if isinstance(value, (int, float, np.integer, np.floating)):
        try:
            v = float(value)
        except OverflowError:
            v = math.inf
        if not math.isfinite(v) or not 0 <= v <= 1e11:
            raise InputError(f"{what} must be Unix seconds between 1970 and 5138; got {value!r}")
        return v
    raise InputError(f"{what} must be a datetime, numpy.datetime64, ISO 8601 string or Unix seconds; "
                     f"got {type(value).__name__}")


def iso(t: float | None, origin: float | None) -> str | None:
    """ISO 8601 (UTC, milliseconds) of stream time ``t`` for a stream whose time 0 is ``origin``."""
    if t is None or origin is None or not math.isfinite(t):
        return None
    stamp = dt.datetime.fromtimestamp(origin + t, tz=dt.timezone.utc)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_wall_clock(timestamps: Any) -> bool:
    """Whether fed timestamps are wall-clock times (datetime-like, or numbers >= 1e9 Unix seconds)."""
    try:
        arr = np.asarray(timestamps)
    except (TypeError, ValueError, OverflowError):
        return False
    if arr.dtype.kind == "M":
        return True
    flat = arr.reshape(-1)
    if not flat.size:
        return False
    first = flat[0]
    if isinstance(first, str):
        try:
            first = float(first)  # a number written as text
        except ValueError:
            return True
    if isinstance(first, (dt.datetime, np.datetime64)):
        return True
    if isinstance(first, bool) or not isinstance(first, (int, float, np.integer, np.floating)):
        return False
    try:
        v = float(first)
    except (OverflowError, ValueError):
        return False
    return math.isfinite(v) and EPOCH_THRESHOLD <= v <= 1e11


def unix_array(timestamps: Any) -> np.ndarray:
    """Wall-clock timestamps (datetime64, datetimes, ISO strings or Unix seconds) as float64 Unix seconds."""
    arr = np.asarray(timestamps)
    if arr.ndim > 1:
        raise InputError(f"timestamps must be one time per frame, shape [n]; got shape {list(arr.shape)}")
    if arr.dtype.kind == "M":
        if np.isnat(arr).any():
            raise InputError("timestamps contain NaT (not a time)")
        return arr.astype("datetime64[ns]").astype(np.int64).astype(np.float64) / 1e9
    if arr.dtype == object or arr.dtype.kind in "US":
        if arr.size > 1 << 24:
            raise InputError("too many timestamps")
        return np.array([to_unix(v, "timestamp") for v in arr.reshape(-1)], dtype=np.float64)
    try:
        return arr.astype(np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InputError(f"timestamps must be numbers or times: {exc}") from None


def stream_seconds(value: Any, origin: float | None, what: str) -> float:
    """A point of a stream as stream seconds: a number (stream seconds, or Unix seconds >= 1e9 for a
    stream with a wall-clock origin), or a datetime / datetime64 / ISO string (needs the origin)."""
    if isinstance(value, bool):
        raise InputError(f"{what} must be stream seconds or a time, not a boolean")
    if isinstance(value, (int, float, np.integer, np.floating)):
        try:
            v = float(value)
        except OverflowError:
            v = math.inf
        if not math.isfinite(v):
            raise InputError(f"{what} must be a finite number; got {str(value)[:40]}")
        if v >= EPOCH_THRESHOLD and origin is not None:
            return v - origin
        if abs(v) > MAX_STREAM_TIME:
            raise InputError(f"{what} = {value!r} is out of range (|t| <= {MAX_STREAM_TIME:g} s)")
        return v
    if isinstance(value, (str, dt.datetime, np.datetime64)):
        if isinstance(value, str):
            try:
                return stream_seconds(float(value), origin, what)
            except ValueError:
                pass
        if origin is None:
            raise InputError(f"{what} = {value!r} is a wall-clock time, but this stream keeps no wall-clock "
                             "origin: give stream seconds")
        return to_unix(value, what) - origin
    raise InputError(f"{what} must be stream seconds, a datetime or an ISO 8601 string; got {type(value).__name__}")
