"""The engine: one model, every stream of the store, one loop that ingests and answers.

The HTTP layer never calls a session: it queues frames (:meth:`Engine.push`, into the stream's
own :class:`~mukv.serve.queues.FrameQueue`) and jobs (:meth:`Engine.submit_ask`,
:meth:`Engine.call`), and reads numbers. A single thread runs the loop::

    while running:
        a waiting question?            -> answer it        (questions first; after
                                          questions_per_step in a row, one ingest step)
        a waiting control job?         -> run it           (open, create, delete a stream)
        a batch of frames due?         -> one ingest step  (IngestScheduler: plan, run): the frames
                                          of many streams in one batch, due when full or when the
                                          oldest waiting frame would miss the latency target
        time to look at the store?     -> refresh readers, find new streams, take over
                                          streams whose writer died, record idle gaps
        else                           -> sleep until something is queued

so a question waits at most for one ingest step, however many frames are queued.

The engine is put together from parts: the loop and what happens inside an ingest step are
:mod:`mukv.serve.loop`; who writes each stream when several servers share a store (readers
refreshed, lost writers demoted, orphaned streams taken over) is :mod:`mukv.serve.ownership`. This
module keeps the lifecycle, the stream table and what the HTTP layer calls.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np

from ..errors import InputError, MukvError, StoreError
from . import adapter
from .config import ServeConfig
from .errors import Conflict, NotFound, Unavailable
from .metrics import ServeMetrics
from .queues import FrameQueue, check_fps
from .loop import EngineLoop
from .ownership import StreamOwnership
from .scheduler import IngestScheduler
from .sources import SourcePuller, open_source
from .stream import ServedStream

log = logging.getLogger(__name__)


class _Job:
    def __init__(self, fn: Callable[[], Any], kind: str, stream: str | None = None):
        self.fn, self.kind, self.stream = fn, kind, stream
        self.future: Future = Future()
        self.arrived = time.monotonic()

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            self.future.set_exception(exc)


class Engine(EngineLoop, StreamOwnership):
    """Owns the model and the streams of one store (see the module docstring).

    Args:
        config: the server's configuration.
        model: a loaded model adapter to use (default: load ``config.model``, or the store's).
    """

    def __init__(self, config: ServeConfig, model: Any = None):
        self.config = config
        self.metrics = ServeMetrics()
        self.metrics.registry.collectors.append(self._collect)
        self.model = model
        self.model_name: str | None = getattr(model, "name", None)
        self._accelerated = False  # config.accelerations applied to the model
        self.server_name = config.backend_options.get("lease_owner") or f"{socket.gethostname()}:{os.getpid()}"
        self.scheduler = IngestScheduler(config.max_batch_frames, config.thumbnails, config.scheduler_config())
        self.state = "starting"
        self.broken: dict[str, str] = {}  # streams of the store that could not be opened
        self._streams: dict[str, ServedStream] = {}
        self._lock = threading.RLock()
        self._asks: deque[_Job] = deque()
        self._control: deque[_Job] = deque()
        self._kick = threading.Event()
        self._stop_loop = False
        self._thread: threading.Thread | None = None
        self._probes: dict[str, Any] = {}  # takeover probes (leases) of streams read here
        self._deleted: set[str] = set()

    # ------------------------------------------------------------------ lifecycle
    @property
    def backend_options(self) -> dict[str, Any]:
        return {"lease_owner": self.server_name, **self.config.backend_options}

    def load(self) -> None:
        """Load the model and check the store (before serving: a bad model or store fails here)."""
        from ..cli.common import _quiet_transformers, pick_model
        from ..session import load_model

        _quiet_transformers()
        if self.model is None:
            name = self.config.model or adapter.store_model(self.config.store, self.backend_options)
            import torch

            from ..session import default_device

            if name is None:
                model, name, _ = pick_model(None, self.config.device)
                self.model = model if not isinstance(model, str) else None
            device = torch.device(self.config.device) if self.config.device else default_device()
            if self.model is None:
                self.model = load_model(name, device)
            self.model_name = name
        if self.config.accelerations and not self._accelerated:
            from ..accel import accelerate

            accelerate(self.model, self.config.accelerations)  # ConfigError where they cannot run: before serving
            self._accelerated = True
        adapter.stream_ids(self.config.store, self.backend_options)  # the store is readable

    def start(self) -> None:
        """Load the model (unless :meth:`load` did), open every stream of the store, start the loop."""
        if self.model is None or self.model_name is None or (self.config.accelerations and not self._accelerated):
            self.load()
        for sid in adapter.stream_ids(self.config.store, self.backend_options):
            self._open_existing(sid)
        self._thread = threading.Thread(target=self._run, name="mukv-engine", daemon=True)
        self._thread.start()
        self._reaper = threading.Thread(target=self._reap, name="mukv-lag-reaper", daemon=True)
        self._reaper.start()
        self.state = "ok"

    def _reap(self, every: float = 0.25) -> None:
        """Drop frames past ``max_lag_s`` every ``every`` seconds, even while the engine is busy with a
        long step or question: a frame never waits more than ``max_lag_s + every`` seconds."""
        while not self._stop_loop:
            for s in self._all():
                if s.queue is not None:
                    s.queue.expire()
            time.sleep(every)

    def stop(self) -> None:
        """Stop cleanly: sources stop, queued frames are ingested for up to ``drain_s`` seconds, what is
        left is recorded as a gap, and every stream is closed (everything ingested is committed)."""
        if self.state == "stopped":
            return
        self.state = "stopping"
        streams = self._all()
        for s in streams:
            if s.source is not None:
                s.source.stop(timeout=2.0)
            if s.queue is not None:
                s.queue.close()
        deadline = time.monotonic() + self.config.drain_s
        while (time.monotonic() < deadline and self._thread is not None and self._thread.is_alive()
               and any(s.queue is not None and s.queue.frames and not s.failed for s in streams)):
            self._kick.set()
            time.sleep(0.02)
        self._stop_loop = True
        self._kick.set()
        if self._thread is not None:
            self._thread.join()
        for job in list(self._asks) + list(self._control):
            job.future.set_exception(Unavailable("the server is stopping"))
        self._asks.clear()
        self._control.clear()
        for s in streams:
            self._close_stream(s)
        for probe in self._probes.values():
            probe.release()
        self.state = "stopped"

    def _close_stream(self, s: ServedStream) -> None:
        try:
            if s.role == "writer" and s.queue is not None and not s.failed:
                s.queue.clear()
                gap = s.queue.pop_gap()
                if gap is not None:
                    s.record_gap(gap)
                s.update()
            s.session.close()
        except MukvError as exc:
            log.warning("stream %s: closing: %s", s.id, adapter.describe(exc))

    # ------------------------------------------------------------------ opening streams (engine thread)
    def _open_existing(self, sid: str) -> ServedStream | None:
        try:
            s = self._open(sid, create=False)
        except MukvError as exc:
            why = adapter.describe(exc)
            if self.broken.get(sid) != why:
                log.warning("stream %s not opened: %s", sid, why)
            self.broken[sid] = why  # tried again at each look at the store
            return None
        self.broken.pop(sid, None)
        return s

    def _open(self, sid: str, create: bool, config: dict[str, Any] | None = None) -> ServedStream:
        session = adapter.open_writer(self.config.store, sid, self.model, self.backend_options, config=config,
                                      thumbnails=self.config.thumbnails, create=create)
        s = self._served(sid, session)
        with self._lock:
            self._streams[sid] = s
        return s

    def _served(self, sid: str, session: Any) -> ServedStream:
        if adapter.is_writer(session):
            q = FrameQueue(self.config.max_lag_s, self.config.max_queue_bytes, session.config.stream.fps,
                           adapter.last_time(session))
            return ServedStream(sid, session, "writer", q)
        s = ServedStream(sid, session, "reader")
        s.owner = adapter.writer_of(session)
        return s

    # ------------------------------------------------------------------ what HTTP handlers call
    def _all(self) -> list[ServedStream]:
        with self._lock:
            return list(self._streams.values())

    def get(self, sid: str) -> ServedStream:
        from ..backends.disk.files import check_stream_id

        try:
            check_stream_id(sid)
        except StoreError as exc:
            raise InputError(str(exc)) from None
        with self._lock:
            s = self._streams.get(sid)
        if s is None:
            if sid in self.broken:
                raise Conflict(f"stream {sid!r} could not be opened: {self.broken[sid]}")
            raise NotFound(f"no stream {sid!r}; streams: {sorted(self._streams)[:20]}")
        return s

    def statuses(self) -> list[dict[str, Any]]:
        return [s.status() for s in sorted(self._all(), key=lambda s: s.id)]

    def _check_running(self) -> None:
        if self.state != "ok":
            raise Unavailable(f"the server is {self.state}")

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread (between ingest steps); returns its future."""
        self._check_running()
        job = _Job(fn, "control")
        self._control.append(job)
        self._kick.set()
        return job.future

    def open_source(self, spec: dict[str, Any], fps: float | None) -> dict[str, Any]:
        """Open a stream's source before the stream is created (HTTP thread: opening a camera may take
        its timeout, and the engine goes on meanwhile). Returns what :meth:`create` takes."""
        from ..config import MukvConfig

        rate = spec.get("fps") or fps or MukvConfig.build(self.config.config).stream.fps
        kind, source = open_source(spec.get("kind"), spec["location"], rate, self.config.max_batch_frames,
                                   spec.get("options"))
        live = spec.get("live") if spec.get("live") is not None else kind == "stream"
        return {"source": source, "kind": kind, "location": spec["location"], "fps": rate, "live": live}

    def check_new(self, sid: str) -> None:
        """Refuse a stream id that is invalid or taken (before opening anything)."""
        from ..backends.disk.files import check_stream_id

        try:
            check_stream_id(sid)
        except StoreError as exc:
            raise InputError(str(exc)) from None
        with self._lock:
            if sid in self._streams:
                raise Conflict(f"stream {sid!r} exists")

    def create(self, sid: str, fps: float | None = None, source: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create a stream (engine thread), with an optional opened source (:meth:`open_source`) pulled into it."""
        self.check_new(sid)
        with self._lock:
            if sid in self._streams:
                raise Conflict(f"stream {sid!r} exists")
            if len(self._streams) >= self.config.max_streams:
                raise Conflict(f"this server holds {len(self._streams)} streams (max_streams)")
        if adapter.exists(self.config.store, sid, self.backend_options):
            raise Conflict(f"stream {sid!r} exists in the store")
        config = dict(self.config.config or {})
        if fps is not None:
            config["stream"] = {**config.get("stream", {}), "fps": check_fps(fps)}
        self._deleted.discard(sid)
        s = self._open(sid, create=True, config=config or None)
        if source is not None:
            if s.role != "writer" or s.queue is None:
                raise Conflict(f"stream {sid!r} is written by another server")
            s.source = SourcePuller(s.queue, wake=self._kick.set, **source)
        return s.status()

    def close_for_delete(self, sid: str) -> None:
        """Stop a stream this server writes and close it (engine thread); :meth:`delete` then removes it."""
        s = self.get(sid)
        if s.role != "writer":
            raise Conflict(f"stream {sid!r} is written by {s.owner or 'another server'}; delete it there")
        if s.source is not None:
            s.source.stop(timeout=2.0)
        if s.queue is not None:
            s.queue.close()
            s.queue.clear()
        with self._lock:
            self._streams.pop(sid, None)
        self._deleted.add(sid)
        self.metrics.forget_stream(sid)
        try:
            s.session.close()
        except MukvError:
            pass

    def delete(self, sid: str) -> None:
        """Delete a closed stream from the store (any thread: its files go, the engine goes on)."""
        adapter.delete_stream(self.config.store, sid, self.backend_options)

    def push(self, sid: str, frames: np.ndarray, times: np.ndarray | None) -> dict[str, Any]:
        """Queue frames of a stream this server writes (HTTP thread; never waits for ingest)."""
        self._check_running()
        s = self.get(sid)
        if s.role != "writer" or s.queue is None:
            raise Conflict(f"stream {sid!r} is written by {s.owner or 'another server'}; push its frames there")
        if s.failed:
            raise Conflict(f"stream {sid!r} failed: {s.error}")
        t0, t1 = s.queue.push(frames, times)
        self._kick.set()
        return {"accepted": int(frames.shape[0]), "queued": s.queue.frames, "dropped": s.queue.dropped,
                "t_start": t0, "t_end": t1}

    def thumbnail(self, sid: str, index: int) -> bytes:
        s = self.get(sid)
        try:
            return adapter.thumbnail(s.session, index)
        except InputError as exc:
            raise NotFound(str(exc)) from None

    def submit_ask(self, sid: str, question: str, since: Any = None, until: Any = None,
                   max_new_tokens: int | None = None, top_k: dict[str, int] | None = None,
                   on_token: Callable[[str], None] | None = None) -> Future:
        """Queue a question (answered before any further ingest step, or inside a running step between
        its stages when the step does not hold this stream); returns the answer's future."""
        self._check_running()
        if len(question) > self.config.max_question_chars:
            raise InputError(f"question is too long: {len(question)} characters (max_question_chars "
                             f"{self.config.max_question_chars})")
        s = self.get(sid)
        if len(self._asks) >= self.config.max_waiting_questions:
            raise Unavailable(f"{len(self._asks)} questions are waiting (max_waiting_questions); ask again later")
        job = _Job(lambda: self._answer(s, job, question, since, until, max_new_tokens, top_k, on_token), "ask", sid)
        self._asks.append(job)
        self._kick.set()
        return job.future

    def _answer(self, s: ServedStream, job: _Job, question: str, since: Any, until: Any,
                max_new_tokens: int | None, top_k: dict[str, int] | None,
                on_token: Callable[[str], None] | None) -> dict[str, Any]:
        start = time.monotonic()
        if s.role == "reader" and start - s.refreshed > 0.25:
            self._refresh(s)
        first: list[float] = []

        def token(piece: str) -> None:
            if not first:
                first.append(time.monotonic())
            if on_token is not None:
                on_token(piece)

        try:
            body = adapter.ask(s.session, question, since, until, max_new_tokens, top_k, token)
        except BaseException:
            self.metrics.questions.inc(1, "error")
            raise
        end = time.monotonic()
        body["frames"] = adapter.frames_stored(s.session)
        body["t_end"] = adapter.last_time(s.session)
        body["timings"]["wait"] = start - job.arrived
        self.metrics.questions.inc(1, "ok")
        self.metrics.question_seconds.observe((first[0] if first else end) - job.arrived, "first_token")
        self.metrics.question_seconds.observe(end - job.arrived, "total")
        return body

    # ------------------------------------------------------------------ metrics
    def _collect(self) -> None:
        m = self.metrics
        roles: dict[str, int] = {"writer": 0, "reader": 0}
        for s in self._all():
            roles[s.role] = roles.get(s.role, 0) + 1
            n = s.numbers
            m.stream_frames.set(n.get("frames", 0), s.id)
            m.hot_bytes.set(n.get("hot_bytes", 0), s.id)
            m.disk_bytes.set(n.get("disk_bytes", 0), s.id)
            m.stored.set_total(s.stored, s.id)
            q = s.queue
            if q is not None:
                m.received.set_total(q.received, s.id)
                m.dropped.set_total(q.dropped, s.id)
                m.lag.set(q.lag(), s.id)
                m.queue_frames.set(q.frames, s.id)
                m.queue_bytes.set(q.bytes, s.id)
            m.gaps.set_total(s.gaps_recorded, s.id)
        for role, count in roles.items():
            m.streams.set(count, role)
        m.questions_waiting.set(len(self._asks))

    def summary(self) -> str:
        """One line: the streams closed and their frames (printed at shutdown)."""
        streams = sorted(self._all(), key=lambda s: s.id)
        parts = [f"{s.id} {s.numbers.get('frames', 0)} frames" + (f" ({s.queue.dropped} dropped)" if s.queue and
                                                                   s.queue.dropped else "") for s in streams[:20]]
        more = f" and {len(streams) - 20} more" if len(streams) > 20 else ""
        return f"{len(streams)} stream(s) committed: " + ", ".join(parts) + more if streams else "no streams"

    def health(self) -> dict[str, Any]:
        status = self.state if self.state in ("ok", "starting", "stopping") else "stopping"
        return {"status": status, "model": self.model_name, "streams": len(self._streams), "server": self.server_name}
