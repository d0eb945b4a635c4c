"""One stream's frames waiting for ingest: bounded in waiting time and in bytes.

Frames get their stream times when they arrive (given by the pusher, or ``1 / fps`` after the
previous frame), so a frame that is dropped leaves a hole of known times. A frame waits at most
``max_lag_s``; the queue holds at most ``max_bytes``; past either bound the *oldest* waiting
frames are dropped (a live camera's newest frames matter most, and dropping from the head keeps
the dropped frames one contiguous run of stream time). Each run of dropped frames becomes one
gap, handed to the engine with the next frames it takes, so the gap is committed with them.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, InputError, expect_number


@dataclass
class _Batch:
    frames: np.ndarray  # uint8 [n, H, W, 3]
    times: np.ndarray  # float64 [n] stream seconds
    arrived: float  # monotonic seconds

    @property
    def nbytes(self) -> int:
        return int(self.frames.nbytes)


@dataclass
class GapRun:
    """Frames dropped in a row: stream times of the first and last, and how many."""

    t_start: float
    t_end: float
    frames: int


class FrameQueue:
    """Frames of one stream waiting for ingest (thread-safe).

    Args:
        max_lag_s: seconds a frame may wait.
        max_bytes: bytes of frames the queue may hold.
        fps: rate of frames pushed without timestamps.
        last_time: stream time of the stream's last stored frame (``None``: a new stream).
        frame_hw: the stream's frame size, if known.
    """

    def __init__(self, max_lag_s: float, max_bytes: int, fps: float, last_time: float | None = None,
                 frame_hw: tuple[int, int] | None = None):
        for name, value in (("max_lag_s", max_lag_s), ("max_bytes", max_bytes), ("fps", fps)):
            expect_number(value, f"FrameQueue: {name}", above=0, error=ConfigError)
        self.max_lag_s, self.max_bytes, self.fps = float(max_lag_s), int(max_bytes), float(fps)
        self.last_time = last_time  # of the last frame queued (or stored)
        self.frame_hw = frame_hw
        self._items: deque[_Batch] = deque()
        self._cv = threading.Condition()
        self.bytes = 0
        self.frames = 0
        self.received = 0
        self.dropped = 0
        self.closed = False
        self._gap: GapRun | None = None
        #: frames at the head given back by an ingest step for a question (:meth:`put_back`): the
        #: step that takes them next stores them (they are not given back twice)
        self.given_back = 0

    # ------------------------------------------------------------------ pushing
    def push(self, frames: np.ndarray, times: np.ndarray | None = None, now: float | None = None) -> tuple[float, float]:
        """Queue ``uint8 [n, H, W, 3]`` frames with stream times ``[n]`` (or ``1 / fps`` apart).

        Returns:
            The stream times of the first and last frame queued.

        Raises:
            InputError: bad timestamps (not finite, not increasing, not after the stream's last),
                a frame size other than the stream's, a push larger than the queue, a closed queue.
        """
        n = int(frames.shape[0])
        hw = (int(frames.shape[1]), int(frames.shape[2]))
        if frames.nbytes > self.max_bytes:
            raise InputError(f"a push of {frames.nbytes} bytes is larger than a stream's queue ({self.max_bytes} bytes); "
                             "push fewer frames at a time")
        now = time.monotonic() if now is None else now
        with self._cv:
            if self.closed:
                raise InputError("the stream is stopping; no more frames are taken")
            if self.frame_hw is not None and hw != self.frame_hw:
                raise InputError(f"frame size changed: the stream's frames are {self.frame_hw[0]}x{self.frame_hw[1]}, "
                                 f"these are {hw[0]}x{hw[1]}; resize them, or push to a new stream")
            ts = self._times(n, times)
            self.frame_hw = hw
            self.last_time = float(ts[-1])
            self._items.append(_Batch(frames, ts, now))
            self.bytes += int(frames.nbytes)
            self.frames += n
            self.received += n
            self._expire(now)
            while self.bytes > self.max_bytes:
                self._drop_head(1)
            self._cv.notify_all()
            return float(ts[0]), float(ts[-1])

    def _times(self, n: int, times: np.ndarray | None) -> np.ndarray:
        after = self.last_time
        if times is None:
            step = 1.0 / self.fps
            base = -step if after is None else after
            ts = base + step * np.arange(1, n + 1, dtype=np.float64)
            if not np.isfinite(ts).all() or (n > 1 and not (np.diff(ts) > 0).all()) or ts[0] <= base:
                raise InputError(f"stream time {base} is too large to continue at {self.fps} fps; pass timestamps")
            return ts
        ts = np.asarray(times, dtype=np.float64).reshape(-1)
        if ts.size != n:
            raise InputError(f"got {ts.size} timestamps for {n} frames")
        if not np.isfinite(ts).all():
            raise InputError("timestamps must be finite numbers (seconds)")
        if n > 1 and not bool((np.diff(ts) > 0).all()):
            raise InputError("timestamps must be strictly increasing")
        if after is not None and ts[0] <= after:
            raise InputError(f"timestamps must continue the stream: first {float(ts[0])} <= last {after}")
        return ts

    def wait_room(self, nbytes: int, timeout: float) -> bool:
        """Wait until ``nbytes`` more fit under half the queue's bound (sources that must not drop)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.bytes and self.bytes + nbytes > self.max_bytes // 2 and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.5))
            return not self.closed

    # ------------------------------------------------------------------ taking
    def take(self, max_frames: int, now: float | None = None) -> tuple[np.ndarray, np.ndarray, GapRun | None] | None:
        """The oldest waiting frames (at most ``max_frames``, one batch's size) with their times, and the
        run of frames dropped before them (to record as a gap); ``None`` if nothing waits."""
        now = time.monotonic() if now is None else now
        with self._cv:
            self._expire(now)
            if not self._items:
                return None
            parts_f, parts_t, got = [], [], 0
            while self._items and got < max_frames:
                head = self._items[0]
                k = min(max_frames - got, head.frames.shape[0])
                parts_f.append(head.frames[:k])
                parts_t.append(head.times[:k])
                self._remove_head(k)
                got += k
            gap, self._gap = self._gap, None
            self._cv.notify_all()
        frames = parts_f[0] if len(parts_f) == 1 else np.concatenate(parts_f)
        times = parts_t[0] if len(parts_t) == 1 else np.concatenate(parts_t)
        return frames, times, gap

    def put_back(self, frames: np.ndarray, times: np.ndarray, arrived: float) -> None:
        """Frames taken for ingest and not stored, but not refused either (their stream left the batch
        for a question): back in front of the queue, in front of frames pushed since, with ``arrived``
        (the oldest arrival among them). The queue's bounds then apply as to any waiting frame."""
        n = int(frames.shape[0])
        if n == 0:
            return
        with self._cv:
            self._items.appendleft(_Batch(frames, times, arrived))
            self.bytes += int(frames.nbytes)
            self.frames += n
            self.given_back += n
            while self.bytes > self.max_bytes:
                self._drop_head(1)
            self._cv.notify_all()

    def lost(self, t_start: float, t_end: float, frames: int) -> None:
        """Count frames taken for ingest but not stored (a refused feed) as dropped, part of the next gap."""
        with self._cv:
            self.dropped += frames
            if self._gap is None:
                self._gap = GapRun(t_start, t_end, frames)
            else:
                self._gap = GapRun(min(t_start, self._gap.t_start), max(t_end, self._gap.t_end),
                                   self._gap.frames + frames)

    def pop_gap(self) -> GapRun | None:
        """The run of dropped frames not yet handed out (at shutdown, or when nothing else waits)."""
        with self._cv:
            gap, self._gap = self._gap, None
            return gap

    def clear(self) -> int:
        """Drop everything waiting (recorded as a gap); returns frames dropped."""
        with self._cv:
            n = self.frames
            while self._items:
                self._drop_head(self._items[0].frames.shape[0])
            self._cv.notify_all()
            return n

    def close(self) -> None:
        """Take no more frames."""
        with self._cv:
            self.closed = True
            self._cv.notify_all()

    # ------------------------------------------------------------------ bounds
    def expire(self, now: float | None = None) -> int:
        """Drop frames that waited longer than ``max_lag_s``; returns frames dropped."""
        if not self._items:
            return 0
        with self._cv:
            before = self.dropped
            self._expire(time.monotonic() if now is None else now)
            return self.dropped - before

    def _expire(self, now: float) -> None:
        while self._items and now - self._items[0].arrived > self.max_lag_s:
            self._drop_head(self._items[0].frames.shape[0])

    def _drop_head(self, k: int) -> None:
        head = self._items[0]
        k = min(k, head.frames.shape[0])
        t0, t1 = float(head.times[0]), float(head.times[k - 1])
        if self._gap is None:
            self._gap = GapRun(t0, t1, k)
        else:
            self._gap = GapRun(self._gap.t_start, t1, self._gap.frames + k)
        self.dropped += k
        self._remove_head(k)

    def _remove_head(self, k: int) -> None:
        head = self._items[0]
        if k >= head.frames.shape[0]:
            self._items.popleft()
            self.bytes -= head.nbytes
        else:
            before = head.nbytes
            head.frames, head.times = head.frames[k:], head.times[k:]
            self.bytes -= before - head.nbytes
        self.frames -= k
        self.given_back = max(0, self.given_back - k)

    def lag(self, now: float | None = None) -> float:
        """Seconds the oldest waiting frame has waited (0 when nothing waits)."""
        now = time.monotonic() if now is None else now
        with self._cv:
            return max(0.0, now - self._items[0].arrived) if self._items else 0.0


def check_fps(fps: float) -> float:
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0:
        raise InputError(f"fps must be a positive number; got {fps!r}")
    return float(fps)
