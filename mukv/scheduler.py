"""One ingest scheduler for every stream of a process.

A process holding many :class:`~mukv.Session` s of one model (hundreds of 0.5-fps cameras) would,
feeding each on its own, run hundreds of small forwards of one frame's blocks. The scheduler
queues the frames of every stream instead and stores them in batches
(:class:`~mukv.batching.BatchIngest`: one vision-tower batch across streams, one prefill forward
per level kind, then each stream's own transaction)::

    sched = mukv.IngestScheduler({"latency_target_s": 5})
    a = mukv.Session(model=model); b = mukv.Session(model=model)   # one model, shared
    sched.submit(a, frames_a); sched.submit(b, frames_b)           # queued: returns at once
    sched.step()                # one batch, if one is due (or run sched.start() for a thread)
    sched.ask(a, "what moved?") # goes before the next batch, or into a running one's next stage break
    sched.drain()               # everything queued, stored

When a batch runs (:class:`BatchPolicy`): as soon as it is full (``max_batch_frames``), or when
waiting longer would make the oldest waiting frame miss the latency target (its arrival plus
``latency_target_s``, less the time a batch of what waits is expected to take, measured on the
batches before). Which frames (fairness): streams by the arrival of their oldest waiting frame,
oldest first, at most ``max_stream_frames`` of each, so no stream waits behind a busy one for
more than a batch or two. Questions (:meth:`IngestScheduler.ask`) go before any batch that has not
started, up to ``questions_per_batch`` in a row while frames wait; a running batch lends the model
to questions at its stage boundaries (after the vision tower, after each level kind's forwards),
so a question waits for one stage, not for the whole batch. A question on a stream of the running
batch takes that stream out of it first (``withdraw_asked``): the stream's feed is rolled back,
the question reads what the stream last committed (as it would before the batch), and its frames
go back to the front of its queue for the next batch.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .batching import BatchIngest, BatchStats, FeedItem, FeedResult
from .config import format_validation_error
from .errors import ConfigError, InputError, MukvError, expect_number

log = logging.getLogger(__name__)


class SchedulerConfig(BaseModel):
    """How the ingest scheduler batches the frames of many streams."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    latency_target_s: float = Field(default=5.0, gt=0.0, le=86400.0)
    """Seconds from a frame's arrival to its blocks being searchable that the scheduler aims at: a
    batch that is not full runs early enough for its oldest frame to make it, by the batch time
    measured on the batches before. Frames of a level whose window is not complete yet (a
    segment of 4 frames) wait for the rest of their window."""

    max_batch_frames: int = Field(default=512, ge=1, le=65536)
    """Frames of all streams in one batch; a batch this full runs at once. Bounds the batch's memory
    (encoded frames, compressed blocks waiting for their commits) and the time a question waits
    for a running batch."""

    max_stream_frames: int = Field(default=64, ge=1, le=65536)
    """Frames of one stream in one batch, so that one stream with a backlog cannot fill a batch."""

    encode_batch_frames: int = Field(default=64, ge=1, le=65536)
    """Frames per vision-tower batch (frames of several streams together). Each vision-tower batch
    ends a stage: smaller ones let questions in sooner (``lend_between_stages``)."""

    prefill_batch_tokens: int = Field(default=16384, ge=1)
    """Most tokens in one prefill forward (windows of several streams together; at least one window)."""

    questions_per_batch: int = Field(default=4, ge=1, le=1024)
    """Questions answered in a row, at most, while a batch is due, and at most inside one running batch
    (at its stage boundaries): then the batch runs. Questions come first, but questions faster than
    the model answers them cannot starve ingest."""

    lend_between_stages: bool = True
    """Let questions on streams the running batch does not hold use the model at the batch's stage
    boundaries (after the vision tower, after each level kind's forwards). Off: every question
    waits for the running batch to end."""

    withdraw_asked: bool = True
    """With ``lend_between_stages``: a question on a stream of the running batch takes the stream out
    of the batch at its next stage boundary (but the last), rolled back, its frames queued again in
    front for the next batch, and is answered there on what the stream last committed. Frames are
    given back once: the batch that takes them again stores them, whatever is asked meanwhile, so a
    stream asked without pause still ingests. Off: such a question waits for the batch's commit (and
    then sees its frames)."""

    isolate_failures: bool = True
    """When the shared work of a batch fails (the vision tower, a prefill, a scorer), feed each stream
    of the batch again alone, so that only the stream causing the failure loses its frames."""

    @classmethod
    def build(cls, value: "SchedulerConfig | dict[str, Any] | None" = None) -> "SchedulerConfig":
        """A configuration from itself, a dict of fields or ``None`` (the defaults).

        Raises:
            ConfigError: naming every invalid field.
        """
        if isinstance(value, SchedulerConfig):
            return value
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"scheduler config must be a SchedulerConfig or a dict, not {type(value).__name__}")
        try:
            return cls.model_validate(value or {})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc).replace("mukv configuration", "scheduler configuration")
                              ) from None


@dataclass
class Waiting:
    """What one stream has waiting, as the policy sees it."""

    key: Hashable
    frames: int
    oldest: float  # arrival (clock seconds) of its oldest waiting frame


class BatchPolicy:
    """When a batch runs and which frames it takes (see the module docstring). Pure bookkeeping:
    the caller's clock, no threads; shared by :class:`IngestScheduler` and ``mukv serve``.

    Args:
        config: the scheduler's configuration.
    """

    #: weight of the newest batch in the running estimate of the time per frame
    EMA = 0.3

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.seconds_per_frame: float | None = None  # None until a batch was measured
        self._turn: dict[Hashable, int] = {}
        self._served = 0

    def estimate(self, frames: int) -> float:
        """Seconds a batch of ``frames`` frames is expected to take (0 before any was measured)."""
        return 0.0 if self.seconds_per_frame is None else self.seconds_per_frame * frames

    def observe(self, frames: int, seconds: float) -> None:
        """Record a batch's measured time."""
        if frames <= 0 or not seconds >= 0:
            return
        per = seconds / frames
        self.seconds_per_frame = per if self.seconds_per_frame is None else \
            (1 - self.EMA) * self.seconds_per_frame + self.EMA * per

    def batch_frames(self, waiting: Sequence[Waiting]) -> int:
        """Frames the next batch would take from ``waiting``."""
        cap = self.config.max_stream_frames
        return min(self.config.max_batch_frames, sum(min(w.frames, cap) for w in waiting if w.frames > 0))

    def due_in(self, waiting: Sequence[Waiting], now: float) -> float | None:
        """Seconds until the next batch is due (0: now), ``None`` when nothing waits."""
        live = [w for w in waiting if w.frames > 0]
        if not live:
            return None
        n = self.batch_frames(live)
        if n >= self.config.max_batch_frames or self.seconds_per_frame is None:
            return 0.0  # full, or no batch measured yet: the first one measures the batch time
        oldest = min(w.oldest for w in live)
        return max(0.0, oldest + self.config.latency_target_s - self.estimate(n) - now)

    def pick(self, waiting: Sequence[Waiting], now: float, force: bool = False) -> list[tuple[Hashable, int]]:
        """``[(key, frames)]`` to take now (empty when no batch is due, unless ``force``): streams by
        their oldest waiting frame, oldest first (equal arrivals: the stream served longest ago
        first), at most ``max_stream_frames`` each, ``max_batch_frames`` in all."""
        live = [w for w in waiting if w.frames > 0]
        due = self.due_in(live, now)
        if due is None or (due > 0 and not force):
            return []
        live.sort(key=lambda w: (w.oldest, self._turn.get(w.key, -1)))
        left, out = self.config.max_batch_frames, []
        for w in live:
            if left <= 0:
                break
            n = min(w.frames, self.config.max_stream_frames, left)
            out.append((w.key, n))
            left -= n
            self._served += 1
            self._turn[w.key] = self._served
        if len(self._turn) > 4 * max(1, len(live)) + 1024:  # forget streams gone
            keys = {w.key for w in live}
            self._turn = {k: v for k, v in self._turn.items() if k in keys}
        return out


class _Queue:
    """Frames of one session waiting for a batch, with the stream state they continue."""

    def __init__(self, session: Any):
        st = session._stream
        self.session = session
        self.chunks: deque[list[Any]] = deque()  # [frames uint8 [n,H,W,3], times f64 [n], arrivals f64 [n]]
        self.frames = 0
        self.last_time: float | None = st.last_time
        self.origin: float | None = st.wall_origin
        self.seen = st.frames_seen
        self.frame_hw: tuple[int, int] | None = st.frame_hw
        self.lock = threading.Lock()  # one submit of this session at a time
        self.withdrawn = 0  # frames at the head that a batch gave back for a question: not withdrawn again

    def oldest(self) -> float:
        return float(self.chunks[0][2][0])

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts: list[list[Any]] = []
        got = 0
        while self.chunks and got < n:
            head = self.chunks[0]
            k = min(n - got, int(head[0].shape[0]))
            parts.append([x[:k] for x in head])
            if k == head[0].shape[0]:
                self.chunks.popleft()
            else:
                self.chunks[0] = [x[k:] for x in head]
            got += k
        self.frames -= got
        self.withdrawn = max(0, self.withdrawn - got)
        return tuple(p[0] if len(parts) == 1 else torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


@dataclass
class BatchReport:
    """One batch of :class:`IngestScheduler`: each stream's result, the batch's counts, and for every
    frame fed its arrival (clock seconds) and the clock when its batch was committed."""

    results: list[FeedResult]
    stats: BatchStats
    arrivals: list[torch.Tensor] = field(default_factory=list)
    started: float = 0.0
    committed: float = 0.0

    def latencies(self) -> torch.Tensor:
        """``[frames]`` seconds from each stored frame's arrival to its batch's commit."""
        got = [self.committed - a for a, r in zip(self.arrivals, self.results) if r.ok]
        return torch.cat(got) if got else torch.empty(0, dtype=torch.float64)


class IngestScheduler:
    """Queues the frames of many sessions of one model and stores them in batches (module docstring).

    Args:
        config: a :class:`SchedulerConfig`, a dict of its fields, or ``None`` for the defaults.
        clock: monotonic seconds (a fake clock in tests).
        on_batch: called with each :class:`BatchReport` (on the thread that ran the batch); an
            exception it raises is logged, not raised (the batch is stored by then).

    Thread-safe: :meth:`submit` and :meth:`ask` may be called from any thread while :meth:`start`'s
    thread (or the caller, with :meth:`step`) runs batches.
    """

    def __init__(self, config: SchedulerConfig | dict[str, Any] | None = None,
                 clock: Callable[[], float] = time.monotonic, on_batch: Callable[[BatchReport], None] | None = None):
        self.config = SchedulerConfig.build(config)
        if not callable(clock):
            raise ConfigError("clock must be a callable returning seconds")
        if on_batch is not None and not callable(on_batch):
            raise ConfigError(f"on_batch must be a callable taking a BatchReport, or None; got {type(on_batch).__name__}")
        self.clock = clock
        self._now()  # a clock that does not return seconds is refused here, not in the middle of a batch
        self.on_batch = on_batch
        self.policy = BatchPolicy(self.config)
        self.batcher = BatchIngest(self.config.encode_batch_frames, self.config.prefill_batch_tokens,
                                   self.config.isolate_failures)
        self.batcher.between_stages = self._between_stages
        self.batcher.withdraw = self._withdraw_asked
        self.model: Any = None
        self._queues: dict[int, _Queue] = {}
        self._cv = threading.Condition()
        self._busy = False  # a batch or a question is using the model
        self._running = False  # a batch has started and not ended (it may have lent the model to questions)
        self._in_batch: frozenset[int] = frozenset()  # id() of the sessions of the running batch
        self._stays: frozenset[int] = frozenset()  # of those, the ones never withdrawn (withdrawn before)
        self._lent = False  # the running batch waits between its stages while questions use the model
        self._asks = 0  # questions waiting for the model
        self._asking: dict[int, int] = {}  # id(session) -> its questions waiting
        self._batch_waiting = False
        self._answered = 0  # questions answered since the last batch
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: Counts since the scheduler was made: batches, frames and blocks stored, streams failed,
        #: questions answered, feeds withdrawn from a running batch for a question (fed again later).
        self.totals = {"batches": 0, "frames": 0, "blocks": 0, "failed_feeds": 0, "questions": 0, "withdrawn": 0}

    # ------------------------------------------------------------------ streams and frames
    def submit(self, session: Any, frames: Any, timestamps: Any = None, resize: bool | None = None) -> int:
        """Queue frames of ``session`` for the next batches; returns the frames it has waiting.

        Frames and timestamps are validated and copied here, as :meth:`mukv.Session.feed` does
        (timestamps continue after the frames already waiting); the frames are stored, one
        transaction per batch, when a batch takes them.

        Raises:
            InputError: bad frames or timestamps (nothing queued).
            ConfigError: a session of another model than the scheduler's sessions.
            StoreError: a session that cannot be fed (read-only, closed, failed).
        """
        from .session import Session

        if not isinstance(session, Session):
            raise InputError(f"submit() takes a mukv.Session; got {type(session).__name__}")
        with self._cv:
            q = self._queues.get(id(session))
            if q is None or q.session is not session:
                if self._queues and self.model is not None and session.model is not self.model:
                    raise ConfigError("the scheduler batches sessions of one model: give every session the same "
                                      "adapter (Session(model=adapter))")
                q = _Queue(session)
                self._queues[id(session)] = q
                self.model = session.model
        with q.lock:  # validation (a copy, maybe a resize) outside the scheduler's lock: batches go on
            item = FeedItem.of(session, frames, timestamps, resize, (q.last_time, q.origin, q.seen), q.frame_hw)
            n = int(item.frames.shape[0])
            with self._cv:
                if self._queues.get(id(session)) is not q:
                    raise MukvError("the session was removed from the scheduler meanwhile")
                q.chunks.append([item.frames, item.times, torch.full((n,), self._now(), dtype=torch.float64)])
                q.frames += n
                q.seen += n
                q.last_time = float(item.times[-1])
                q.frame_hw = (int(item.frames.shape[1]), int(item.frames.shape[2]))
                if item.wall_origin is not None:
                    q.origin = item.wall_origin
                self._cv.notify_all()
                return q.frames

    def waiting(self, session: Any = None) -> int:
        """Frames waiting (of one session, or of all)."""
        with self._cv:
            if session is not None:
                q = self._queues.get(id(session))
                return q.frames if q is not None and q.session is session else 0
            return sum(q.frames for q in self._queues.values())

    def remove(self, session: Any) -> int:
        """Stop scheduling ``session``: its waiting frames are dropped (returned: how many); a
        batch already running for it completes."""
        with self._cv:
            q = self._queues.get(id(session))
            if q is None or q.session is not session:
                return 0
            del self._queues[id(session)]
            return q.frames

    def _waiting(self) -> list[Waiting]:
        return [Waiting(k, q.frames, q.oldest()) for k, q in self._queues.items() if q.frames]

    def due_in(self, now: float | None = None) -> float | None:
        """Seconds until the next batch is due (0: now; ``None``: nothing waits)."""
        with self._cv:
            return self.policy.due_in(self._waiting(), self._now() if now is None else expect_number(now, "now", unit=" of seconds"))

    # ------------------------------------------------------------------ batches
    def step(self, now: float | None = None, force: bool = False) -> BatchReport | None:
        """Run one batch if one is due (``force``: whatever waits, due or not). Questions waiting for
        the model go first (up to ``questions_per_batch`` of them). Returns the batch's report, or
        ``None`` when no batch ran."""
        with self._cv:
            self._batch_waiting = True
            try:
                while self._busy or self._running or (self._asks and self._answered < self.config.questions_per_batch):
                    self._cv.wait()
            finally:
                self._batch_waiting = False
            t = self._now() if now is None else expect_number(now, "now", unit=" of seconds")
            picks = self.policy.pick(self._waiting(), t, force)
            if not picks:
                self._cv.notify_all()
                return None
            items, arrivals, again = [], [], set()
            for key, n in picks:
                q = self._queues[key]
                if q.withdrawn:  # these frames left a batch for a question once: this batch stores them
                    again.add(id(q.session))
                frames, times, arr = q.take(n)
                st = q.session._stream
                items.append(FeedItem(q.session, frames, times, q.origin if st.wall_origin is None else None))
                arrivals.append(arr)
            self._busy = self._running = True
            self._in_batch = frozenset(id(it.session) for it in items)
            self._stays = frozenset(again)
            self._answered = 0
        try:
            t0 = self._now()
            results, stats = self.batcher.run(items)
            self.policy.observe(stats.frames, self._now() - t0)  # the batch time, on the scheduler's clock
        finally:
            with self._cv:
                self._busy = self._running = False
                self._in_batch = frozenset()
                self._cv.notify_all()
        self._requeue([(it, arr) for r, it, arr in zip(results, items, arrivals) if r.withdrawn])
        report = BatchReport(results, stats, arrivals, t, self._now())
        self.totals["batches"] += 1
        self.totals["frames"] += sum(r.frames for r in results if r.ok)
        self.totals["blocks"] += stats.blocks
        for r, it in zip(results, items):
            if r.withdrawn:
                self.totals["withdrawn"] += 1
            elif not r.ok:
                self.totals["failed_feeds"] += 1
                self._failed(r, it)
        if self.on_batch is not None:
            try:
                self.on_batch(report)
            except Exception:  # noqa: BLE001 - the batch is stored; the caller's callback does not undo it
                log.exception("on_batch raised (the batch is stored)")
        return report

    def _now(self) -> float:
        """The scheduler's clock, in seconds (ConfigError for a clock that gives something else)."""
        return expect_number(self.clock(), "clock must return seconds: its time", unit=" of seconds", error=ConfigError)

    def _requeue(self, back: list[tuple[FeedItem, torch.Tensor]]) -> None:
        """Frames of feeds withdrawn from the batch, back in front of their queues with their arrivals
        (a stream removed meanwhile loses them, as :meth:`remove` says)."""
        if not back:
            return
        with self._cv:
            for it, arr in back:
                q = self._queues.get(id(it.session))
                if q is None or q.session is not it.session:
                    continue
                q.chunks.appendleft([it.frames, it.times, arr])
                q.frames += int(it.frames.shape[0])
                q.withdrawn += int(it.frames.shape[0])
            self._cv.notify_all()

    @staticmethod
    def _failed(r: FeedResult, item: FeedItem) -> None:
        """A feed that stored nothing: say so, and record its frames as a gap of the stream (when the
        stream can still commit one)."""
        log.warning("stream %s: %d frame(s) not stored: %s", r.session.stream_id, r.frames, r.error)
        why = " ".join(f"not stored: {r.error}".split())[:200]
        try:
            r.session.record_gap(float(item.times[0]), float(item.times[-1]), r.frames, why)
        except Exception as exc:  # noqa: BLE001 - a broken stream: the warning above says what was lost
            log.warning("stream %s: the gap could not be recorded either: %s", r.session.stream_id, exc)

    def drain(self) -> list[BatchReport]:
        """Run batches, due or not, until nothing waits; returns their reports."""
        out = []
        while True:
            r = self.step(force=True)
            if r is None:
                return out
            out.append(r)

    # ------------------------------------------------------------------ questions
    def ask(self, session: Any, question: str, **kwargs: Any) -> Any:
        """:meth:`mukv.Session.ask` with priority over batches: it runs before the next batch starts,
        or at the running batch's next stage boundary (after the vision tower, after each level kind's
        forwards). A question on a stream of the running batch takes the stream out of the batch there
        (``withdraw_asked``; its frames wait for the next batch) or, past the last boundary or with
        ``withdraw_asked`` off, waits for the batch's commit. Frames queued are never waited for."""
        from .session import Session

        if not isinstance(session, Session):
            raise InputError(f"ask() takes a mukv.Session; got {type(session).__name__}")
        try:
            inspect.signature(Session.ask).bind(session, question, **kwargs)
        except TypeError as exc:
            raise InputError(f"ask(): {exc}") from None
        sid = id(session)
        with self._cv:
            self._asks += 1
            self._asking[sid] = self._asking.get(sid, 0) + 1
            try:
                while (self._busy or (self._running and (not self._lent or sid in self._in_batch))
                       or ((self._batch_waiting or self._lent) and self._answered >= self.config.questions_per_batch)):
                    self._cv.wait()
            finally:
                self._asks -= 1
                self._asking[sid] -= 1
                if not self._asking[sid]:
                    del self._asking[sid]
            self._busy = True
        try:
            return session.ask(question, **kwargs)
        finally:
            with self._cv:
                self._busy = False
                self._answered += 1
                self.totals["questions"] += 1
                self._cv.notify_all()

    def _between_stages(self) -> None:
        """Called by the running batch between its stages: lend the model to the questions waiting on
        other streams (up to ``questions_per_batch`` in the batch), then go on."""
        with self._cv:
            if not self.config.lend_between_stages or not self._running or not self._questions_outside():
                return
            self._lent, self._busy = True, False
            self._cv.notify_all()
            try:
                while self._busy or (self._questions_outside()
                                     and self._answered < self.config.questions_per_batch):
                    self._cv.wait()
            finally:
                self._lent, self._busy = False, True

    def _withdraw_asked(self, sessions: list[Any]) -> list[Any]:
        """Called by the running batch at a stage boundary: the sessions of the batch that questions
        wait on, to take out of it (then no longer in the batch for :meth:`ask`)."""
        with self._cv:
            if not (self.config.lend_between_stages and self.config.withdraw_asked and self._running
                    and self._answered < self.config.questions_per_batch):
                return []
            out = [s for s in sessions if id(s) in self._asking and id(s) not in self._stays]
            if out:
                self._in_batch = self._in_batch - {id(s) for s in out}
            return out

    def _questions_outside(self) -> bool:
        return any(sid not in self._in_batch for sid in self._asking)

    # ------------------------------------------------------------------ a thread of its own
    def start(self) -> "IngestScheduler":
        """Run batches on a background thread, each when it is due; returns the scheduler."""
        with self._cv:
            if self._thread is not None:
                raise MukvError("the scheduler is already running")
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="mukv-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True) -> None:
        """Stop the background thread, after storing everything waiting (``drain``)."""
        with self._cv:
            thread, self._thread = self._thread, None
            self._stopping = True
            self._cv.notify_all()
        if thread is not None:
            thread.join()
        if drain:
            self.drain()

    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stopping:
                    return
                due = self.policy.due_in(self._waiting(), self._now())
                if due is None or due > 0:
                    self._cv.wait(0.5 if due is None else min(due, 0.5))
                    continue
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the loop must go on; each stream's error is in its result
                log.exception("an ingest batch failed")

    def __enter__(self) -> "IngestScheduler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop(drain=exc[0] is None)
