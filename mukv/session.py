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
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .blocks import Answer
from .clock import is_wall_clock, stream_seconds, to_unix, unix_array
from .config import MukvConfig, merge
from .errors import ConfigError, InputError, MukvError, StoreError
from .frames import as_frames, as_timestamps, iter_chunks, resize_frames
from .ingest import LiveFeed  # noqa: F401  (the handle feed_from(background=True) returns)
from .kvcodec import build_codec
from .interfaces import (
    Compressor,
    GranularityExtractor,
    ModelAdapter,
    Retriever,
    StorageBackend,
    TokenScorer,
)
from .pipeline import Ingestor, LevelPipeline
from .registry import registry
from .specs import build, canonicalize, config_hash, require_json
from .state import MAX_STREAM_TIME, validate_values
from .stream import Stream, load_pending

from .answering import MAX_QUESTION_TOKENS, answer_question, plan_top_k  # noqa: F401  (re-exported)
from .loading import (  # noqa: F401  (re-exported: mukv.session's public helpers since 0.1)
    DEFAULT_MODEL,
    MAX_PATH_CHARS,
    STORAGE_FIELDS,
    _as_dict,
    _backend_spec,
    _model_record,
    _question_log,
    check_device,
    check_dtype,
    check_path,
    default_device,
    list_stream_ids,
    load_model,
    storage_differences,
)

log = logging.getLogger(__name__)

#: the largest answer budget ``ask`` accepts (as ``generation.max_new_tokens``): the answer's KV is allocated up front
MAX_NEW_TOKENS = 4096
#: the stream state values a session reads back (mukv.state.StreamValues)
STATE_KEYS = ("session", "frames_seen", "cursors", "last_time", "first_time", "pending", "sources", "gaps")


class Session:
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
        stream_id: which stream of the store this session reads and writes.
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
        self._lock = threading.RLock()
        self._closed = False
        self._owner = False
        reg = registry()
        if backend_options is not None and not isinstance(backend_options, dict):
            raise ConfigError(f"backend_options must be a dict; got {type(backend_options).__name__}")
        backend, backend_options = _backend_spec(backend, backend_options)
        backend_cls = reg.get("backends", backend, field="backend")
        if backend_options is not None and not isinstance(backend_options, dict):
            raise ConfigError(f"backend_options must be a dict; got {type(backend_options).__name__}")
        options = dict(backend_options or {})
        if "codec" in options:
            raise ConfigError('the KV codec is chosen with config={"kv_codec": ...}, not a backend option')
        if path is not None:
            path = check_path(path, "path")
        if not isinstance(stream_id, str):
            raise InputError(f"stream_id must be a string; got {type(stream_id).__name__}")
        for name, flag in (("progress", progress), ("read_only", read_only), ("resize", resize)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{name} must be True or False; got {flag!r}")
        if thumbnails is not None and (not isinstance(thumbnails, int) or isinstance(thumbnails, bool)
                                       or not 16 <= thumbnails <= 1024):
            raise ConfigError(f"thumbnails must be a thumbnail size in pixels from 16 to 1024, or None; got {thumbnails!r}")
        origin = None if wall_origin is None else to_unix(wall_origin, "wall_origin")
        if "read_only" in options:
            read_only = bool(options.pop("read_only")) or read_only
        stored = (backend_cls.peek_state(str(path), stream_id, "session", **options) if path is not None else None)
        if read_only and not stored:
            known = list_stream_ids(backend_cls, str(path), options) if path is not None else []
            raise StoreError(f"{path}: no stream {stream_id!r} to open read-only"
                             + (f"; streams: {', '.join(known)}" if known else ""))
        if stored and (wall_origin is not None or thumbnails is not None):
            raise ConfigError(f"stream {stream_id!r} exists: wall_origin and thumbnails are fixed when a stream is "
                              "created (its contract); leave them out")
        self.progress = progress
        self.stream_id = stream_id
        self.resize = resize
        self.config, layered = self._resolve_config(config, policy, stored)
        self.device = check_device(device)
        check_dtype(dtype)
        # resolve every component (names, settings) before loading anything heavy
        self.config = canonicalize(self.config, reg)
        if path is not None and not stored:
            require_json(self.config, "a stream stored on disk")
        self.retriever, compressor, extractors, scorers = self._components(reg)
        self._question_log = _question_log(log_questions, path, stream_id, options)
        self.codec = build_codec(self.config.kv_codec)

        self.model = load_model(model, self.device, dtype)
        if getattr(self.model, "random_weights", False) and not getattr(self.model, "_mukv_warned", False):
            log.warning("model %s has random weights: its answers are meaningless (retrieval, compression and "
                        "memory are real); use mukv-tiny or a trained checkpoint for answers", self.model.name)
            try:
                self.model._mukv_warned = True
            except AttributeError:  # pragma: no cover - an adapter with __slots__
                pass
        self.device = self.model.device
        model_defaults = getattr(self.model, "default_config", None) or {}
        if model_defaults and layered:  # e.g. levels sized for the model's tokens per frame
            self.config = (MukvConfig.from_policy(policy, under=model_defaults, **_as_dict(config)) if policy is not None
                           else MukvConfig.build(merge(model_defaults, _as_dict(config))))
            self.config = canonicalize(self.config, reg)
            self.retriever, compressor, extractors, scorers = self._components(reg)
            self.codec = build_codec(self.config.kv_codec)
        lay = self.model.layout
        self.codec.row_layout((lay.num_layers, 2, lay.num_kv_heads, 1, lay.head_dim), lay.dtype)  # can it store them
        self.levels: list[LevelPipeline] = []
        for lv in self.config.levels:
            split = extractors[lv.name].split(lv, self.model.grid)
            if split.ndim != 2 or split.shape[1] == 0:
                raise ConfigError(f"extractor {lv.extractor!r} returned an invalid split of shape {tuple(split.shape)}")
            self.levels.append(LevelPipeline(lv, split, scorers[lv.name], compressor,
                                             Compressor.kept_count(lv, split.shape[1])))
        self.prefix = self.model.prefix(self.config.generation.system_prompt)
        self.backend: StorageBackend = backend_cls(
            layout=self.model.layout, path=path, device=self.device,
            **({"stream_id": stream_id, "read_only": read_only} if path is not None else {}),
            **self._codec_option(backend_cls, backend, options), **options)
        try:
            self._stream = self._open_stream(model, stored, read_only, origin, thumbnails)
        except BaseException:
            self.backend.close()
            raise
        self._owner = True
        log.info("session over stream %r: model %s, backend %s%s, config %s", stream_id, self.model.name, backend,
                 f" at {path}" if path is not None else "", config_hash(self.config))

    # -- construction helpers ----------------------------------------------------------------
    @staticmethod
    def _resolve_config(config: Any, policy: str | None, stored: dict[str, Any] | None) -> tuple[MukvConfig, bool]:
        """The session's configuration and whether a model's own defaults may go under it."""
        if config is not None and not isinstance(config, (dict, MukvConfig)):
            raise ConfigError(f"config must be a MukvConfig or a dict, not {type(config).__name__}")
        if policy is not None and not isinstance(policy, (str, Mapping)):
            raise ConfigError(f"policy must be a registered policy name (or one with settings); got {policy!r}")
        if stored:
            reg = registry()
            base = canonicalize(MukvConfig.build(stored.get("config") or {}), reg)
            if policy is not None:
                new = MukvConfig.from_policy(policy, **_as_dict(config))
            else:
                new = MukvConfig.build(base, **_as_dict(config))
            new = canonicalize(new, reg)
            changed = storage_differences(base, new)
            if changed:
                raise ConfigError(
                    f"the stream's contract (fixed when it was created) cannot change {', '.join(changed)}: its "
                    "blocks were made with other settings; a session of the stream may change only top_k, rerank "
                    "weights, retrieval, assembly and generation. Use a new stream id for other settings")
            return new, False
        if policy is not None:
            return MukvConfig.build(MukvConfig.from_policy(policy), **_as_dict(config)), config is None or isinstance(config, dict)
        return MukvConfig.build(config), config is None or isinstance(config, dict)

    def _open_stream(self, model: Any, stored: dict[str, Any] | None, read_only: bool, origin: float | None,
                     thumbnails: int | None) -> Stream:
        be = self.backend
        now = be.get_state("session", None)
        if stored is None and now is not None and not read_only:
            raise StoreError(f"stream {self.stream_id!r} was created by another process while this session "
                             "opened it; open it again")
        values = validate_values({k: be.get_state(k) for k in
                                  STATE_KEYS
                                  if be.get_state(k) is not None}, f"stream {self.stream_id!r}")
        contract = dict(now) if now else {
            "model": _model_record(model, self.model),
            "model_id": self.model.layout.model_id,
            "config": self.config.model_dump(mode="json"), "tokens_per_frame": int(self.model.tokens_per_frame),
            "frame_size": None, "wall_origin": origin, "thumbnails": thumbnails, "created": time.time(),
        }
        if now and contract.get("model_id") and self.model.layout.model_id and \
                contract["model_id"] != self.model.layout.model_id:
            raise StoreError(f"stream {self.stream_id!r} was made with model {contract['model_id']!r}; this session's "
                             f"model is {self.model.layout.model_id!r}")
        pending, why = load_pending(be, values, self.model.tokens_per_frame, self.model.hidden_size) \
            if be.persistent and values.pending and not read_only else (None, None)
        #: why the frames a level had not consumed could not be restored on reopening (``None``: they were)
        self.reopen_note = why
        ingestor = Ingestor(self.model, self.prefix, self.levels, be, self.config, values.frames_seen,
                            values.cursors, pending)
        stream = Stream(ingestor, be, values, contract, writable=not read_only)
        if not now and not read_only:
            with stream.transaction():
                pass  # commits the contract: the stream exists from here on
        return stream

    def _codec_option(self, backend_cls: type, backend: str, options: dict[str, Any] | None) -> dict[str, Any]:
        """``{"codec": ...}`` for a backend that stores KV through a codec; nothing for one that stores it as
        given (refused with any codec but "none")."""
        if options and "codec" in options:
            raise ConfigError('the KV codec is chosen with config={"kv_codec": ...}, not a backend option')
        if getattr(backend_cls, "accepts_codec", False):
            return {"codec": self.codec}
        if self.codec.name != "none":
            raise ConfigError(f"kv_codec {self.codec.name!r}: backend {backend!r} stores KV as it is given "
                              "(it does not accept codecs); use kv_codec 'none' or a backend that does "
                              "(memory, lancedb)")
        return {}

    def _components(self, reg) -> tuple[Retriever, Compressor, dict[str, GranularityExtractor], dict[str, TokenScorer]]:
        """The retriever, compressor, and per-level extractors and scorers that ``self.config`` names."""
        cfg = self.config
        retriever = build("retrievers", cfg.retrieval.retriever, cfg, Retriever, "retrieval.retriever", reg)
        compressor = build("compressors", cfg.compression.compressor, cfg, Compressor, "compression.compressor", reg)
        extractors, scorers = {}, {}
        for i, lv in enumerate(cfg.levels):
            extractors[lv.name] = build("extractors", lv.extractor, cfg, GranularityExtractor,
                                        f"levels.{i}.extractor", reg)
            own = lv.scorer is not None
            scorers[lv.name] = build("scorers", lv.scorer if own else cfg.scoring.scorer, cfg, TokenScorer,
                                     f"levels.{i}.scorer" if own else "scoring.scorer", reg)
        return retriever, compressor, extractors, scorers

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
        path = check_path(path, "path")
        options = kwargs.get("backend_options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"backend_options must be a dict; got {type(options).__name__}")
        backend, options = _backend_spec(backend, options)
        options = options or {}
        kwargs["backend_options"] = options
        backend_cls = registry().get("backends", backend, field="backend")
        stored = backend_cls.peek_state(str(path), stream_id, "session", **options)
        if not stored:
            known = list_stream_ids(backend_cls, str(path), options)
            raise StoreError(f"{path}: no mukv stream {stream_id!r}" + (f"; streams: {', '.join(known)}" if known else
                             " (not a mukv store, or a different stream id)"))
        return cls(model=model if model is not None else stored["model"], backend=backend, path=path,
                   stream_id=stream_id, read_only=read_only, **kwargs)

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
        with self._lock:
            self._check_open()
            if policy is not None:
                if not isinstance(policy, (str, Mapping)):
                    raise ConfigError(f"policy must be a registered policy name (or one with settings); got {policy!r}")
                new = MukvConfig.build(MukvConfig.from_policy(policy), **_as_dict(config))
            else:
                if config is not None and not isinstance(config, (dict, MukvConfig)):
                    raise ConfigError(f"config must be a MukvConfig or a dict, not {type(config).__name__}")
                new = MukvConfig.build(self.config, **_as_dict(config))
            reg = registry()
            new = canonicalize(new, reg)
            changed = storage_differences(self.config, new)
            if new.kv_codec != self.config.kv_codec:  # a fork reads through the session's backend and its codec
                changed.append("kv_codec")
            if changed:
                raise ConfigError(f"a fork shares stored blocks, so it cannot change {', '.join(changed)}; "
                                  "only top_k, rerank weights, retrieval, assembly and generation")
            child = object.__new__(Session)
            child.__dict__.update(self.__dict__)
            child.config = new
            child.levels = [LevelPipeline(lv, lp.split, lp.scorer, lp.compressor, lp.kept)
                            for lv, lp in zip(new.levels, self.levels)]
            child.retriever = build("retrievers", new.retrieval.retriever, new, Retriever, "retrieval.retriever", reg)
            child._owner = False
            child._closed = False
            if new.generation.system_prompt != self.config.generation.system_prompt:
                child.prefix = self.model.prefix(new.generation.system_prompt)
            return child

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
        with self._lock:
            self._check_writable()
            if isinstance(frames, (np.ndarray, torch.Tensor)):
                return self._feed_batch(self._checked(frames, resize), timestamps)
            if timestamps is not None:
                raise InputError("timestamps can only be given with an array of frames, not an iterable")
            if isinstance(frames, (str, bytes, Path)):
                raise InputError("feed() takes frames; use ingest() for a video file")
            if not isinstance(frames, Iterable):
                raise InputError(f"frames must be an array of uint8 [n, H, W, 3] or an iterable of frames; got {type(frames).__name__}")
            stored = 0
            for chunk in iter_chunks(frames, self.config.stream.encode_batch_frames):
                stored += self._feed_batch(self._checked(chunk, resize), None)
            return stored

    def _checked(self, frames: Any, resize: bool | None, copy: bool = True,
                 want: tuple[int, int] | None = None) -> torch.Tensor:
        """Validated frames of the stream's size (or ``want``, the size of frames queued before these;
        resized if asked), as a private copy."""
        t = as_frames(frames)
        hw = (int(t.shape[1]), int(t.shape[2]))
        want = self._stream.frame_hw or want
        if want is not None and hw != want:
            if not (self.resize if resize is None else resize):
                raise InputError(
                    f"frame size changed: the stream's frames are {want[0]}x{want[1]}, these are {hw[0]}x{hw[1]}; "
                    "resize them (resize=True, or --resize on the command line), or start a new stream")
            return resize_frames(t, want)
        return t.clone() if copy else t

    def _stream_times(self, timestamps: Any, n: int, after: "tuple[float | None, float | None, int] | None" = None
                      ) -> tuple[torch.Tensor, float | None]:
        """Validated stream times of ``n`` frames, and a wall-clock origin to set (a new stream given
        wall-clock timestamps), else ``None``. ``after``: ``(last time, wall-clock origin, frames)`` of
        the stream as frames queued but not fed yet leave it (default: as it is now)."""
        st = self._stream
        last, wall_origin, seen = (st.last_time, st.wall_origin, st.frames_seen) if after is None else after
        if timestamps is None:
            step = 1.0 / self.config.stream.fps
            base = -step if last is None else last
            ts = base + step * torch.arange(1, n + 1, dtype=torch.float64)
            if not (bool(torch.isfinite(ts).all()) and float(ts[0]) > base and bool((ts[1:] > ts[:-1]).all())
                    and float(ts[-1]) <= MAX_STREAM_TIME):
                raise InputError(f"stream time {base} is too large to continue at {self.config.stream.fps} fps; "
                                 "pass timestamps")
            return ts, None
        origin = None
        if is_wall_clock(timestamps):
            unix = unix_array(timestamps)
            if wall_origin is None:
                if seen > 0:
                    raise InputError("wall-clock timestamps given to a stream that counts stream seconds (it has no "
                                     "wall-clock origin): give stream seconds, or start a new stream")
                if unix.size and math.isfinite(float(unix[0])):
                    origin = float(unix[0])
            values = unix - (origin if origin is not None else wall_origin)
        else:
            values = timestamps
        ts = as_timestamps(values, n, last)
        if float(ts.abs().max()) > MAX_STREAM_TIME:
            raise InputError(f"timestamps must lie within +-{MAX_STREAM_TIME:g} stream seconds; got up to "
                             f"{float(ts.abs().max()):g}")
        return ts, origin

    def _feed_batch(self, frames: torch.Tensor, timestamps: Any, source: dict[str, Any] | None = None) -> int:
        self._check_writable()
        ts, origin = self._stream_times(timestamps, int(frames.shape[0]))
        bs = self.config.stream.encode_batch_frames
        st = self._stream

        def encode(f: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.model.encode_frames(f[i : i + bs]) for i in range(0, f.shape[0], bs)])

        with st.lock:
            return st.feed(frames, ts, encode, source, wall_origin=origin)

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
        if not isinstance(path, (str, Path)):
            raise InputError(f"ingest() takes the path of a video file; got {type(path).__name__}")
        return self.feed_from("video", check_path(path, "path"), fps=fps, upsample=upsample, force=force,
                              resize=resize, on_chunk=on_chunk)

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
        with self._lock:
            self._check_writable()
            self._stream.record_gap(t_start, t_end, frames, reason)

    def thumbnail(self, frame: int) -> bytes:
        """The JPEG thumbnail of stream frame ``frame`` (a stream created with ``thumbnails=``).

        Raises:
            InputError: a bad frame index, or one not stored yet.
            StoreError: the stream keeps no thumbnails.
        """
        if not isinstance(frame, (int, np.integer)) or isinstance(frame, bool):
            raise InputError(f"frame must be a frame index (int); got {type(frame).__name__}")
        with self._lock:
            self._check_open()
            self._refresh_reader()
            if not self._stream.thumbnails:
                raise StoreError(f"stream {self.stream_id!r} keeps no thumbnails (create it with thumbnails=96)")
            if not 0 <= int(frame) < self._stream.frames_seen:
                raise InputError(f"frame {int(frame)} is not stored: the stream has frames 0..{self._stream.frames_seen - 1}")
            data = self.backend.read_file(f"thumbs/{int(frame):09d}.jpg")
            if data is None:
                raise StoreError(f"stream {self.stream_id!r}: the thumbnail of frame {int(frame)} is missing")
            return data

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
