"""``mukv.Session``: the application API.

    s = mukv.Session()                  # mukv-tiny, in memory
    s = mukv.Session(model="mukv-tiny", backend="lancedb", path="store")
    s.feed(frames)                      # uint8 [n, H, W, 3], again and again
    s.ingest("video.mp4", fps=0.5)      # a file, sampled with decord
    answer = s.ask("what color was the car?")
    s.stats()

A session is thread-safe: ``feed`` and ``ask`` may be called from different
threads; calls are serialised. Every feed is a transaction: it stores every
block its frames complete and moves the stream's bookkeeping (frames seen,
stream time, cursors, pending frames) with them, or, on any error or
interrupt, changes nothing (:mod:`mukv.stream`).

The class is put together from parts: opening a session (``Session(...)``,
``Session.open``, ``Session.fork``) is :mod:`mukv.opening`, feeding it frames
(``feed``, ``ingest``, ``record_gap``, ``thumbnail``) :mod:`mukv.feeding`, answering a
question :mod:`mukv.answering`. This module keeps the API and the stream's state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from .blocks import Answer
from .clock import stream_seconds
from .config import MukvConfig
from .errors import InputError, MukvError, StoreError
from .feeding import SessionFeeding
from .ingest import LiveFeed  # noqa: F401  (the handle feed_from(background=True) returns)
from .interfaces import ModelAdapter
from .opening import STATE_KEYS, SessionOpening
from .pipeline import Ingestor
from .state import validate_values

from .answering import MAX_QUESTION_TOKENS, answer_question, plan_top_k  # noqa: F401  (re-exported)
from .loading import (  # noqa: F401  (re-exported: mukv.session's public helpers since 0.1)
    DEFAULT_MODEL,
    MAX_PATH_CHARS,
    STORAGE_FIELDS,
    check_device,
    check_dtype,
    check_path,
    default_device,
    list_stream_ids,
    load_model,
    storage_differences,
)

#: a session's logger (:mod:`mukv.opening` logs through it: the records keep this name)
log = logging.getLogger(__name__)

#: the largest answer budget ``ask`` accepts (as ``generation.max_new_tokens``): the answer's KV is allocated up front
MAX_NEW_TOKENS = 4096


class Session(SessionFeeding, SessionOpening):
    """A stream's memory and the questions asked about it.

    Args:
        model: a registered preset ("mukv-tiny", the default; "tiny-llava-ov", ...), a
            local checkpoint directory, either with settings
            (``{"name": ..., "parity": "authors"}``), or a
            :class:`~mukv.interfaces.ModelAdapter` (share one between sessions to load
            weights once). A preset with random weights logs a warning: its answers
            are meaningless.
        backend: registered storage backend ("memory", the default; "lancedb"), or
            ``{"name": ..., **options}`` (the options join ``backend_options``).
        path: where a disk backend keeps its store.
        config: a :class:`MukvConfig`, a dict of fields, or ``None`` for the
            policy's (default: MuKV's) configuration. For a stored stream, the
            fields are applied over the stream's own configuration, and only
            those that do not change how blocks are stored may differ
            (:func:`storage_differences`).
        policy: a registered policy name ("mukv", "rekv", "uniform",
            "sliding_window", "full_context", ...), or one with settings
            (``{"name": "rekv", "top_k": 32}``); ``config`` is applied over it.
        device: torch device; default CUDA if available else CPU.
        dtype: model dtype; default bf16 on CUDA, float32 on CPU.
        stream_id: which stream of the store this session reads and writes: 1 to 128 characters of
            ``[A-Za-z0-9_.-]``, starting with a letter, digit or underscore, without ``..`` (with every
            backend; a ``StoreError`` names the rule otherwise).
        backend_options: extra keyword arguments for the backend.
        progress: show progress bars on long work.
        read_only: open a stored stream for reading only: never takes the
            stream's writer lock, never blocks a writer, sees its new commits
            (:meth:`refresh`, done before every question).
        resize: frames of another size than the stream's are resized to it
            (bilinear, antialiased) instead of refused. Recorded per source.
        wall_origin: for a new stream, the wall-clock time of stream time 0 (a
            ``datetime``, ``numpy.datetime64``, ISO 8601 string or Unix seconds);
            set from the first timestamps instead when they are wall-clock times.
        thumbnails: for a new stream, keep a JPEG thumbnail of every frame whose
            long side is this many pixels (:meth:`thumbnail`); ``None``: none.
        log_questions: keep a question log (question, answer, retrieved blocks,
            timings, configuration hash, time) in the store (``True``; needs
            ``path``) or in another directory or URI (a string); read it with
            :class:`mukv.logs.QuestionLog` or ``mukv logs``.

    A configuration may name components by Python objects (see :mod:`mukv.specs`);
    a new stream with a ``path`` records its configuration as JSON and refuses them.
    """

    def __init__(
        self,
        model: str | Path | dict[str, Any] | ModelAdapter = DEFAULT_MODEL,
        backend: str | dict[str, Any] = "memory",
        path: str | Path | None = None,
        config: MukvConfig | dict[str, Any] | None = None,
        policy: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        stream_id: str = "default",
        backend_options: dict[str, Any] | None = None,
        progress: bool = False,
        read_only: bool = False,
        resize: bool = False,
        wall_origin: Any = None,
        thumbnails: int | None = None,
        log_questions: bool | str | Path = False,
    ):
        self._construct(model, backend, path, config, policy, device, dtype, stream_id, backend_options, progress,
                        read_only, resize, wall_origin, thumbnails, log_questions)

    # -- opening -----------------------------------------------------------------------------
    # (the work of __init__, open and fork, and the helpers _resolve_config, _open_stream, _codec_option and
    # _components: :class:`~mukv.opening.SessionOpening`)
    @classmethod
    def open(cls, path: str | Path, stream_id: str = "default", backend: str | dict[str, Any] = "lancedb",
             model: str | Path | dict[str, Any] | ModelAdapter | None = None, read_only: bool = False,
             **kwargs: Any) -> "Session":
        """Reopen a stored stream: same model and configuration, ingestion resumes
        where it stopped.

        Args:
            path: the store (a local directory or a URI the backend supports).
            stream_id: which stream of the store.
            backend: the backend that wrote it.
            model: override the recorded model (e.g. a checkpoint that moved);
                by default the one recorded in the store.
            read_only: a reader: never blocks the stream's writer (see :class:`Session`).
            kwargs: other :class:`Session` arguments (``config`` may change retrieval,
                assembly and generation only).

        Raises:
            StoreError: no mukv stream at ``path`` / ``stream_id`` (the message lists the store's streams).
        """
        return cls._reopen(path, stream_id, backend, model, read_only, kwargs)

    def fork(self, config: MukvConfig | dict[str, Any] | None = None, policy: str | None = None) -> "Session":
        """A reader of this session's stream with another retrieval, assembly or generation
        configuration (e.g. to compare retrievers on one ingest).

        The fork shares the model, the store and the stream's bookkeeping: frames fed
        to this session are seen by the fork at once. A fork cannot feed (it is never a
        second writer of the stream). Closing a fork does not close the store; closing
        this session closes its forks.

        Raises:
            ConfigError: the new configuration changes how blocks are stored
                (levels, scoring, compression, stream settings or the KV codec).
            MukvError: this session is closed.
        """
        return self._fork(config, policy)

    # -- the stream's bookkeeping (read-only views) ------------------------------------------
    @property
    def _ingestor(self) -> Ingestor:
        return self._stream.ingestor

    @property
    def _last_time(self) -> float | None:
        return self._stream.last_time

    @property
    def _frame_hw(self) -> tuple[int, int] | None:
        return self._stream.frame_hw

    @property
    def read_only(self) -> bool:
        """Whether this session can only read its stream (a reader, or a fork)."""
        return not self._owner or not self._stream.writable

    @property
    def wall_origin(self) -> float | None:
        """Unix time of the stream's time 0, if it keeps wall-clock time."""
        return self._stream.wall_origin

    # -- feeding --------------------------------------------------------------------------
    # (the work of feed, ingest, record_gap and thumbnail, and the steps _checked, _stream_times and _feed_batch
    # that mukv.ingest and mukv.batching take too: :class:`~mukv.feeding.SessionFeeding`)
    def feed(self, frames: Any, timestamps: Any = None, resize: bool | None = None) -> int:
        """Add frames to the stream; store every block they complete.

        The frames are copied on entry (a caller may reuse its buffer at once), and the call
        is one transaction: on any error or interrupt nothing of it is stored and the stream's
        bookkeeping is as before, so a retry never stores a frame twice. An iterable is fed in
        chunks of ``stream.encode_batch_frames`` frames, one transaction each.

        Args:
            frames: ``uint8 [n, H, W, 3]`` (numpy or torch), one ``[H, W, 3]``
                frame, or an iterable of frames or batches (a live source).
            timestamps: ``[n]`` times, strictly increasing, after the last fed frame:
                stream seconds, or wall-clock times (``numpy.datetime64``, ``datetime``,
                Unix seconds >= 1e9), which give a new stream its wall-clock origin;
                default: ``1 / config.stream.fps`` apart, continuing the stream.
            resize: resize frames of another size to the stream's (default: the session's
                ``resize``); otherwise such frames are refused.

        Returns:
            Number of blocks stored (all levels).

        Raises:
            InputError: bad frames or timestamps; nothing of the call is stored (for an
                iterable: nothing from the chunk holding the bad item on).
            StoreError: a read-only session, or the store failed (nothing of the call stored).
        """
        return self._feed(frames, timestamps, resize)

    def ingest(self, path: str | Path, fps: float | None = None, *, upsample: bool = False, force: bool = False,
               resize: bool | None = None, on_chunk: Any = None) -> int:
        """Read a video file with decord, sampled at ``fps`` (default ``config.stream.fps``), and feed it.

        Times continue the stream: the video's first frame comes ``1 / fps``
        after the last frame fed so far. Each chunk is one transaction; the file is
        recorded as a source of the stream (path, size, SHA-256, fps, the frames and
        times it produced), so a second ingest of the same content is refused unless
        ``force``, and an interrupted one resumes where it stopped.

        Args:
            fps: sampling rate, at most the video's own unless ``upsample``.
            upsample: allow ``fps`` above the video's rate (frames repeat).
            force: ingest a file whose content the stream already holds.
            resize: see :meth:`feed`.
            on_chunk: called with ``(frames, blocks)`` after each committed chunk.

        Returns:
            Number of blocks stored.

        Raises:
            InputError: missing or unreadable file, bad fps, or (without ``force``) a file
                already ingested (:class:`~mukv.ingest.AlreadyIngested`).
        """
        return self._ingest(path, fps, upsample, force, resize, on_chunk)

    def feed_from(self, source: str, location: Any, fps: float | None = None, background: bool = False,
                  **options: Any) -> "int | Any":
        """Feed every chunk of a registered frame source.

        Args:
            source: registered source name ("video", "images", "iterator", "stream").
            location: what the source reads (a path, a URL, an iterable).
            fps: sampling rate (default ``config.stream.fps``); for a video or a stream at
                most its own rate unless ``upsample=True``.
            background: run in a daemon thread and return a :class:`~mukv.ingest.LiveFeed`
                handle at once; questions can be asked meanwhile.
            options: ``force``, ``resize``, ``upsample`` (see :meth:`ingest`), ``on_chunk``
                (called with ``(frames, blocks)`` after each committed chunk), and options of
                the source (e.g. ``format="v4l2"`` for a camera; ``timeout_s``).

        Returns:
            The number of blocks stored, or a :class:`~mukv.ingest.LiveFeed` if ``background``.

        Raises:
            UnknownPluginError: unknown source.
            ConfigError: invalid source options.
            InputError: the source cannot be opened, or bad options (raised here, before any
                thread starts).
        """
        from .ingest import feed_from

        return feed_from(self, source, location, fps, background, options)

    def record_gap(self, t_start: float, t_end: float, frames: int, reason: str = "dropped") -> None:
        """Record that ``frames`` frames between stream times ``t_start`` and ``t_end`` arrived but
        were not stored (e.g. a service that fell behind dropped them). Committed at once; listed by
        ``mukv streams list`` and :meth:`stats`."""
        self._record_gap(t_start, t_end, frames, reason)

    def thumbnail(self, frame: int) -> bytes:
        """The JPEG thumbnail of stream frame ``frame`` (a stream created with ``thumbnails=``).

        Raises:
            InputError: a bad frame index, or one not stored yet.
            StoreError: the stream keeps no thumbnails.
        """
        return self._thumbnail(frame)

    # -- asking -----------------------------------------------------------------------------
    def ask(self, question: str, top_k: dict[str, int] | None = None, max_new_tokens: int | None = None,
            since: Any = None, until: Any = None, on_token: Callable[[str], None] | None = None) -> Answer:
        """Answer a question from what has been fed so far.

        Args:
            question: the question text.
            top_k: per-level number of blocks, overriding the configuration; a
                value larger than what the level stores raises.
            max_new_tokens: decoding budget (default ``config.generation.max_new_tokens``).
            since, until: answer from the blocks lying in this time window only: stream
                seconds, or (for a stream with a wall-clock origin) datetimes, ISO 8601
                strings or Unix seconds.
            on_token: called on the asking thread with each new piece of the answer's text as
                it is decoded (for streaming it to a user); the pieces joined are the answer
                text up to trailing whitespace. An exception it raises ends the question.

        Returns:
            An :class:`~mukv.blocks.Answer`: text, retrieved blocks (level, time
            span, score, wall-clock times when known), KV tokens at answer time,
            timings per stage.

        Raises:
            InputError: empty or too long question, a bad window.
            EmptyMemoryError: nothing stored yet (in the window).
            RetrievalError: a top-k the store cannot serve.
        """
        if not isinstance(question, str):
            raise InputError(f"question must be a string; got {type(question).__name__}")
        if not question.strip():
            raise InputError("question is empty")
        try:
            question.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate: no tokenizer takes it
            raise InputError(f"question is not valid Unicode text: {exc.reason} at position {exc.start}") from None
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool)
                                           or not 1 <= max_new_tokens <= MAX_NEW_TOKENS):
            raise InputError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS}; got {max_new_tokens!r}")
        if on_token is not None and not callable(on_token):
            raise InputError(f"on_token must be a callable taking a str; got {type(on_token).__name__}")
        with self._lock:
            self._check_open()
            self._refresh_reader()
            window = self._window(since, until)
            return self._answer(question, top_k, max_new_tokens, window, on_token)

    def _window(self, since: Any, until: Any) -> tuple[float | None, float | None] | None:
        if since is None and until is None:
            return None
        origin = self._stream.wall_origin
        lo = None if since is None else stream_seconds(since, origin, "since")
        hi = None if until is None else stream_seconds(until, origin, "until")
        if lo is not None and hi is not None and hi < lo:
            raise InputError(f"until ({until}) is before since ({since})")
        return lo, hi

    def _refresh_reader(self) -> None:
        """A reader catches up with the writer's commits (cheap when nothing changed)."""
        if not self._stream.writable and hasattr(self.backend, "refresh"):
            self.refresh()

    def refresh(self) -> bool:
        """A read-only session: see what the stream's writer has committed since (done before
        every question). Returns whether anything changed. A writing session is always current."""
        with self._lock:
            self._check_open()
            fn = getattr(self.backend, "refresh", None)
            if self._stream.writable or not callable(fn) or not fn():
                return False
            be = self.backend
            values = validate_values({k: be.get_state(k) for k in
                                      STATE_KEYS
                                      if be.get_state(k) is not None}, f"stream {self.stream_id!r}")
            st = self._stream
            st.ingestor.frames_seen = values.frames_seen
            st.ingestor.cursor.update(values.cursors or {})
            st.last_time = values.last_time
            st.sources = [s.model_dump() for s in values.sources]
            st.gaps = [g.model_dump() for g in values.gaps]
            if values.session is not None:
                st.contract = values.session.model_dump()
                size = st.contract.get("frame_size")
                st.frame_hw = tuple(size) if size else None  # type: ignore[assignment]
            return True

    def _answer(self, question: str, top_k: dict[str, int] | None, max_new_tokens: int | None,
                window: tuple[float | None, float | None] | None, on_token: Any = None) -> Answer:
        return answer_question(self, question, top_k, max_new_tokens, window, on_token)

    def _plan(self, top_k: dict[str, int] | None, notes: list[str], index: Any = None,
              window: tuple[float | None, float | None] | None = None) -> dict[str, int]:
        return plan_top_k(self, top_k, notes, index, window)

    # -- state ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Frames fed, and blocks / tokens / bytes held per level; sources and gaps of the stream."""
        with self._lock:
            levels = self.backend.stats()
            st = self._stream
            return {
                "frames": st.frames_seen,
                "last_time": st.last_time,
                "wall_origin": st.wall_origin,
                "frame_size": list(st.frame_hw) if st.frame_hw else None,
                "levels": {lp.level.name: levels.get(lp.level.name, {"blocks": 0, "tokens": 0, "bytes": 0})
                           for lp in self.levels},
                "bytes": sum(levels.get(lp.level.name, {}).get("bytes", 0) for lp in self.levels),
                "uncovered_frames": {k: v for k, v in st.ingestor.uncovered.items() if v},
                "kv_bytes_per_token": self.model.layout.token_bytes(),
                "sources": [dict(s) for s in st.sources],
                "gaps": [dict(g) for g in st.gaps],
            }

    def flush(self) -> None:
        """Make everything fed so far durable now (a disk store writes in the background)."""
        with self._lock:
            self._check_open()
            if self._stream.writable:
                self.backend.flush()

    def close(self) -> None:
        """Flush and close the store. The session (and its forks) cannot be used afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._owner:  # a fork: the store belongs to its parent
                return
            self._stream.closed = True
            try:
                if self._stream.writable and not self._stream.broken:
                    self.backend.flush()  # a write failure is said again: what was not stored
            finally:
                self.backend.close()

    def _check_open(self) -> None:
        if self._closed or self._stream.closed:
            raise MukvError("this session is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if not self._owner:
            raise StoreError("a fork reads the stream of the session it was forked from; feed that session")
        self._stream.check_writable()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
