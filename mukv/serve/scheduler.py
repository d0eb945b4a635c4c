"""Which frames the engine ingests next: one step at a time, questions between steps.

Every stream has its own queue (:class:`~mukv.serve.queues.FrameQueue`); the engine loop asks
the scheduler for a step, runs it, answers waiting questions, and asks again. A step is a list
of :class:`IngestWork`, one per stream it serves. Today a step serves one stream (round robin
over the streams with waiting frames, at most ``max_batch_frames`` of them) and feeds it through
its :class:`~mukv.Session`; a batched scheduler that prefills the frames of many streams in one
forward (issue 18) replaces :meth:`IngestScheduler.plan` and :meth:`IngestScheduler.run` and
keeps everything around them: the queues, the gaps, the metrics, the priority of questions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import adapter
from .queues import GapRun
from .stream import ServedStream


@dataclass
class IngestWork:
    """Frames of one stream taken from its queue for one step."""

    stream: ServedStream
    frames: np.ndarray  # uint8 [n, H, W, 3]
    times: np.ndarray  # float64 [n] stream seconds
    gap: GapRun | None  # frames dropped just before these, to record with them


@dataclass
class StepResult:
    """What one step did to one stream."""

    stream: ServedStream
    frames: int
    t_start: float
    t_end: float
    stored: bool
    error: BaseException | None = None


class IngestScheduler:
    """Plans and runs ingest steps (see the module docstring).

    Args:
        max_batch_frames: frames of a stream per step.
        thumbnails: long side of the thumbnails kept (0: none).
    """

    def __init__(self, max_batch_frames: int, thumbnails: int = 0):
        self.max_batch_frames = max_batch_frames
        self.thumbnails = thumbnails
        self._next = 0

    def plan(self, streams: list[ServedStream], now: float | None = None) -> list[IngestWork]:
        """The next step: frames of the next stream (round robin) that has any waiting."""
        now = time.monotonic() if now is None else now
        writers = [s for s in streams if s.role == "writer" and s.queue is not None and not s.failed]
        for i in range(len(writers)):
            s = writers[(self._next + i) % len(writers)]
            got = s.queue.take(self.max_batch_frames, now)
            if got is not None:
                self._next = (self._next + i + 1) % max(1, len(writers))
                return [IngestWork(s, *got)]
        return []

    def run(self, works: list[IngestWork], on_done: Callable[[StepResult], None]) -> None:
        """Store each work's frames in its stream (one transaction per stream), its gap first."""
        for w in works:
            s = w.stream
            s.busy = True
            n, t0, t1 = int(w.frames.shape[0]), float(w.times[0]), float(w.times[-1])
            try:
                if w.gap is not None:
                    s.record_gap(w.gap)
                adapter.feed(s.session, w.frames, w.times, self.thumbnails)
                on_done(StepResult(s, n, t0, t1, True))
            except Exception as exc:  # noqa: BLE001 - the engine records it against the stream
                on_done(StepResult(s, n, t0, t1, False, exc))
            finally:
                s.busy = False
