"""Which frames the engine ingests next: one batch across streams at a time, questions between batches.

Every stream has its own queue (:class:`~mukv.serve.queues.FrameQueue`); the engine loop asks
the scheduler for a step, runs it, answers waiting questions, and asks again. A step is a list
of :class:`IngestWork`, one per stream it serves, stored as one batch
(:class:`mukv.batching.BatchIngest`: one vision-tower batch across streams, one prefill forward per
level kind, each stream's own transaction). When a step is due and which frames it takes is the
core scheduler's :class:`mukv.scheduler.BatchPolicy`: as soon as ``batch_frames`` wait, or when
the oldest waiting frame would otherwise miss ``latency_target_s``; streams oldest frame first,
at most ``max_batch_frames`` of each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..batching import BatchIngest
from ..errors import ConfigError
from ..scheduler import BatchPolicy, SchedulerConfig, Waiting
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
    arrived: float = 0.0  # monotonic arrival of the oldest of these frames
    stays: bool = False  # frames given back by a step before: this step stores them (never withdrawn)


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
        config: the batching configuration (:class:`mukv.scheduler.SchedulerConfig`; its
            ``max_stream_frames`` is ``max_batch_frames``).
    """

    def __init__(self, max_batch_frames: int, thumbnails: int = 0, config: SchedulerConfig | None = None):
        if isinstance(max_batch_frames, bool) or not isinstance(max_batch_frames, int) or max_batch_frames < 1:
            raise ConfigError(f"max_batch_frames must be a positive integer; got {max_batch_frames!r}"[:200])
        if config is not None and not isinstance(config, SchedulerConfig):
            raise ConfigError(f"config must be a SchedulerConfig; got {type(config).__name__}")
        base = config or SchedulerConfig()
        self.config = base.model_copy(update={"max_stream_frames": max_batch_frames})
        self.max_batch_frames = max_batch_frames
        self.thumbnails = thumbnails
        self.policy = BatchPolicy(self.config)
        self.batcher = BatchIngest(self.config.encode_batch_frames, self.config.prefill_batch_tokens,
                                   self.config.isolate_failures)
        self.last_stats: Any = None

    @staticmethod
    def _writers(streams: list[ServedStream]) -> list[ServedStream]:
        return [s for s in streams if s.role == "writer" and s.queue is not None and not s.failed]

    @staticmethod
    def _waiting(writers: list[ServedStream], now: float) -> list[Waiting]:
        out = []
        for s in writers:
            n = s.queue.frames
            if n:
                out.append(Waiting(s.id, n, now - s.queue.lag(now)))
        return out

    def due_in(self, streams: list[ServedStream], now: float | None = None) -> float | None:
        """Seconds until the next step is due (0: now; ``None``: no frames wait)."""
        now = time.monotonic() if now is None else now
        return self.policy.due_in(self._waiting(self._writers(streams), now), now)

    def plan(self, streams: list[ServedStream], now: float | None = None, force: bool = False) -> list[IngestWork]:
        """The next step: frames of the streams the policy picks (empty when no step is due, unless
        ``force``: whatever waits)."""
        now = time.monotonic() if now is None else now
        writers = {s.id: s for s in self._writers(streams)}
        works = []
        for sid, n in self.policy.pick(self._waiting(list(writers.values()), now), now, force):
            s = writers[sid]
            s.busy = True  # "ingesting" from the moment its frames leave the queue
            arrived = now - s.queue.lag(now)
            stays = s.queue.given_back > 0
            got = s.queue.take(n, now)
            if got is not None:
                works.append(IngestWork(s, *got, arrived=arrived, stays=stays))
            else:
                s.busy = False
        return works

    def run(self, works: list[IngestWork], on_done: Callable[[StepResult], None]) -> None:
        """Store the works' frames as one batch (one transaction per stream), each stream's gap first.
        A stream withdrawn from the batch for a question (``batcher.withdraw``) gets its frames back
        in front of its queue, and no result."""
        items, ready = [], []
        for w in works:
            s = w.stream
            s.busy = True
            n, t0, t1 = int(w.frames.shape[0]), float(w.times[0]), float(w.times[-1])
            try:
                if w.gap is not None:
                    s.record_gap(w.gap)
                items.append(adapter.feed_item(s.session, w.frames, w.times))
                ready.append(w)
            except Exception as exc:  # noqa: BLE001 - the engine records it against the stream
                try:
                    on_done(StepResult(s, n, t0, t1, False, exc))
                finally:
                    s.busy = False
        if not items:
            return
        t = time.perf_counter()
        try:
            results, stats = self.batcher.run(items)
        except BaseException:
            for w in ready:
                w.stream.busy = False
            raise
        self.policy.observe(stats.frames, time.perf_counter() - t)
        self.last_stats = stats
        for w, r in zip(ready, results):
            n, t0, t1 = int(w.frames.shape[0]), float(w.times[0]), float(w.times[-1])
            if r.withdrawn:
                w.stream.queue.put_back(w.frames, w.times, w.arrived)
                w.stream.busy = False
                continue
            try:
                on_done(StepResult(w.stream, n, t0, t1, r.ok, r.error))
            finally:
                w.stream.busy = False  # after its status is current

