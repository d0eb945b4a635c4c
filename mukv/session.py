"""``mukv.Session``: the application API.

    s = mukv.Session(model="tiny-llava-ov", backend="memory")
    s.feed(frames)                      # uint8 [n, H, W, 3], again and again
    s.ingest("video.mp4", fps=0.5)      # a file, sampled with decord
    answer = s.ask("what color was the car?")
    s.stats()

A session is thread-safe: ``feed`` and ``ask`` may be called from different
threads; calls are serialised.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .assembly import assemble_context, page_in, retrieved_blocks
from .blocks import Answer, Query
from .config import MukvConfig, merge
from .errors import ConfigError, EmptyMemoryError, InputError, MukvError, RetrievalError, StoreError
from .frames import as_frames, as_timestamps, iter_chunks
from .interfaces import (
    Compressor,
    GranularityExtractor,
    ModelAdapter,
    Retriever,
    StorageBackend,
    TokenScorer,
    build_component,
)
from .model import HFVideoLLM
from .pipeline import Ingestor, LevelPipeline
from .registry import registry
from .rope import rerotate
from .window import question_probe

MAX_QUESTION_TOKENS = 2048
#: the largest answer budget ``ask`` accepts (as ``generation.max_new_tokens``): the answer's KV is allocated up front
MAX_NEW_TOKENS = 4096


def default_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model: str | Path | ModelAdapter, device: torch.device, dtype: torch.dtype | None = None) -> HFVideoLLM:
    """A model adapter from a registered name (preset), a local checkpoint directory, or an adapter."""
    if isinstance(model, ModelAdapter):
        return model  # type: ignore[return-value]
    if not isinstance(model, (str, Path)) or not str(model):
        raise ConfigError(f"model must be a preset name, a checkpoint directory or a ModelAdapter; got {model!r}")
    reg = registry()
    path = Path(model)
    if isinstance(model, str) and model in reg.entries["models"]:
        factory = reg.get("models", model)
        if isinstance(factory, type):
            raise ConfigError(f"model {model!r} is an adapter class; pass a checkpoint directory it can load")
        return factory(device=device, dtype=dtype)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise StoreError(f"{path}: not a model checkpoint (no config.json)")
        try:
            model_type = json.loads(cfg_file.read_text()).get("model_type")
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"{cfg_file}: unreadable ({exc})") from None
        adapters = {
            t: e.component for e in reg.entries["models"].values()
            if isinstance(e.component, type) for t in getattr(e.component, "model_types", ())
        }
        if model_type not in adapters:
            raise ConfigError(f"no model adapter for model_type {model_type!r}; adapters exist for {sorted(adapters)}")
        return adapters[model_type].from_pretrained(path, device=device, dtype=dtype)
    presets = [n for n, e in reg.entries["models"].items() if not isinstance(e.component, type)]
    raise ConfigError(f"unknown model {str(model)!r}: not a registered preset and not a directory; presets: {sorted(presets)}")


class Session:
    """A stream's memory and the questions asked about it.

    Args:
        model: a registered preset ("tiny-llava-ov", "mukv-tiny", ...), a local
            checkpoint directory, or a :class:`~mukv.interfaces.ModelAdapter`
            (share one between sessions to load weights once).
        backend: registered storage backend ("memory", ...).
        path: where a disk backend keeps its store.
        config: a :class:`MukvConfig`, a dict of fields, or ``None`` for the
            policy's (default: MuKV's) configuration.
        policy: a registered policy name ("mukv", "rekv", "uniform",
            "sliding_window", "full_context", ...); ``config`` is applied over it.
        device: torch device; default CUDA if available else CPU.
        dtype: model dtype; default bf16 on CUDA, float32 on CPU.
        stream_id: which stream of the store this session reads and writes.
        backend_options: extra keyword arguments for the backend.
        progress: show progress bars on long work.
    """

    def __init__(
        self,
        model: str | Path | ModelAdapter = "tiny-llava-ov",
        backend: str = "memory",
        path: str | Path | None = None,
        config: MukvConfig | dict[str, Any] | None = None,
        policy: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        stream_id: str = "default",
        backend_options: dict[str, Any] | None = None,
        progress: bool = False,
    ):
        self._lock = threading.RLock()
        reg = registry()
        if not isinstance(backend, str):
            raise ConfigError(f"backend must be a registered backend name; got {backend!r}")
        backend_cls = reg.get("backends", backend, field="backend")
        stored = (backend_cls.peek_state(str(path), stream_id, "session", **(backend_options or {}))
                  if path is not None else None)
        if stored and config is None and policy is None:
            config = stored.get("config")
        if policy is not None:
            if not isinstance(policy, str):
                raise ConfigError(f"policy must be a registered policy name; got {policy!r}")
            base = MukvConfig.from_policy(policy)
            self.config = MukvConfig.build(base, **(config.model_dump() if isinstance(config, MukvConfig) else config or {}))
        else:
            self.config = MukvConfig.build(config)
        # a model's own defaults go under the policy's and the caller's fields, unless the caller gave a
        # whole configuration or the stream was stored with one
        layered = not stored and (config is None or isinstance(config, dict))
        self.progress = progress
        self.stream_id = stream_id
        try:
            self.device = torch.device(device) if device is not None else default_device()
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"invalid device {device!r}: {exc}") from None
        # resolve every component name before loading anything heavy
        self.retriever, compressor, extractors, scorers = self._components(reg)

        self.model = load_model(model, self.device, dtype)
        self.device = self.model.device
        model_defaults = getattr(self.model, "default_config", None) or {}
        if model_defaults and layered:  # e.g. levels sized for the model's tokens per frame
            self.config = (MukvConfig.from_policy(policy, under=model_defaults, **(config or {})) if policy is not None
                           else MukvConfig.build(merge(model_defaults, config or {})))
            self.retriever, compressor, extractors, scorers = self._components(reg)
        self.levels: list[LevelPipeline] = []
        for lv in self.config.levels:
            split = extractors[lv.name].split(lv, self.model.grid)
            if split.ndim != 2 or split.shape[1] == 0:
                raise ConfigError(f"extractor {lv.extractor!r} returned an invalid split of shape {tuple(split.shape)}")
            self.levels.append(LevelPipeline(lv, split, scorers[lv.name], compressor,
                                             Compressor.kept_count(lv, split.shape[1])))
        self.backend: StorageBackend = backend_cls(
            layout=self.model.layout, path=None if path is None else str(path), device=self.device,
            **({"stream_id": stream_id} if path is not None else {}), **(backend_options or {}))
        if path is not None and not stored:
            self.backend.set_state("session", {
                "model": str(model) if isinstance(model, (str, Path)) else self.model.name,
                "model_id": self.model.layout.model_id,
                "config": self.config.model_dump(mode="json"),
            })
        self.prefix = self.model.prefix(self.config.generation.system_prompt)
        start = int(self.backend.get_state("frames_seen", 0) or 0)
        cursors = self.backend.get_state("cursors", None)
        self._ingestor = Ingestor(self.model, self.prefix, self.levels, self.backend, self.config, start, cursors)
        self._frame_hw: tuple[int, int] | None = None
        last = self.backend.get_state("last_time", None)
        self._last_time: float | None = last
        self._closed = False
        self._owner = True

    def _components(self, reg) -> tuple[Retriever, Compressor, dict[str, GranularityExtractor], dict[str, TokenScorer]]:
        """The retriever, compressor, and per-level extractors and scorers that ``self.config`` names."""
        retriever = build_component(
            "retrievers", reg.get("retrievers", self.config.retrieval.retriever, "retrieval.retriever"),
            self.config, Retriever)
        compressor = build_component(
            "compressors", reg.get("compressors", self.config.compression.compressor, "compression.compressor"),
            self.config, Compressor)
        extractors, scorers = {}, {}
        for i, lv in enumerate(self.config.levels):
            extractors[lv.name] = build_component(
                "extractors", reg.get("extractors", lv.extractor, f"levels.{i}.extractor"), self.config,
                GranularityExtractor)
            sname = lv.scorer or self.config.scoring.scorer
            field = f"levels.{i}.scorer" if lv.scorer else "scoring.scorer"
            scorers[lv.name] = build_component("scorers", reg.get("scorers", sname, field), self.config, TokenScorer)
        return retriever, compressor, extractors, scorers

    @classmethod
    def open(cls, path: str | Path, stream_id: str = "default", backend: str = "lancedb",
             model: str | Path | ModelAdapter | None = None, **kwargs: Any) -> "Session":
        """Reopen a stored stream: same model and configuration, ingestion resumes
        where it stopped.

        Args:
            path: the store (a local directory or a URI the backend supports).
            stream_id: which stream of the store.
            backend: the backend that wrote it.
            model: override the recorded model (e.g. a checkpoint that moved);
                by default the one recorded in the store.

        Raises:
            StoreError: no mukv stream at ``path`` / ``stream_id``.
        """
        reg = registry()
        backend_cls = reg.get("backends", backend, field="backend")
        stored = backend_cls.peek_state(str(path), stream_id, "session", **(kwargs.get("backend_options") or {}))
        if not stored:
            raise StoreError(f"{path}: no mukv stream {stream_id!r} (not a mukv store, or a different stream id)")
        return cls(model=model if model is not None else stored["model"], backend=backend, path=path,
                   stream_id=stream_id, **kwargs)

    def fork(self, config: MukvConfig | dict[str, Any] | None = None, policy: str | None = None) -> "Session":
        """A session over the same stored memory with another retrieval, assembly or
        generation configuration (e.g. to compare retrievers on one ingest).

        The fork shares the model, the store and the stream: frames fed through
        either are seen by both. Closing a fork does not close the store.

        Raises:
            ConfigError: the new configuration changes how blocks are stored
                (levels, scoring, compression or stream settings).
        """
        with self._lock:
            self._check_open()
            if policy is not None:
                base = MukvConfig.from_policy(policy)
                extra = config.model_dump() if isinstance(config, MukvConfig) else (config or {})
                new = MukvConfig.build(base, **extra)
            else:
                new = MukvConfig.build(self.config, **(config.model_dump() if isinstance(config, MukvConfig)
                                                       else config or {}))
            fixed = ("scoring", "compression", "stream")
            old_levels = [lv.model_dump(exclude={"top_k", "rerank_weight"}) for lv in self.config.levels]
            new_levels = [lv.model_dump(exclude={"top_k", "rerank_weight"}) for lv in new.levels]
            changed = [f for f in fixed if getattr(new, f) != getattr(self.config, f)]
            if old_levels != new_levels:
                changed.insert(0, "levels")
            if changed:
                raise ConfigError(f"a fork shares stored blocks, so it cannot change {', '.join(changed)}; "
                                  "only top_k, rerank weights, retrieval, assembly and generation")
            reg = registry()
            child = object.__new__(Session)
            child.__dict__.update(self.__dict__)
            child.config = new
            child.levels = [LevelPipeline(lv, lp.split, lp.scorer, lp.compressor, lp.kept)
                            for lv, lp in zip(new.levels, self.levels)]
            child.retriever = build_component(
                "retrievers", reg.get("retrievers", new.retrieval.retriever, "retrieval.retriever"), new, Retriever)
            child._owner = False
            if new.generation.system_prompt != self.config.generation.system_prompt:
                child.prefix = self.model.prefix(new.generation.system_prompt)
            return child

    # -- feeding --------------------------------------------------------------------------
    def feed(self, frames: Any, timestamps: Any = None) -> int:
        """Add frames to the stream; store every block they complete.

        Args:
            frames: ``uint8 [n, H, W, 3]`` (numpy or torch), one ``[H, W, 3]``
                frame, or an iterable of frames or batches (a live source).
            timestamps: ``[n]`` stream times in seconds (strictly increasing,
                after the last fed frame); default: ``1 / config.stream.fps``
                apart, continuing the stream.

        Returns:
            Number of blocks stored (all levels).

        Raises:
            InputError: bad frames or timestamps; nothing of the call is stored (for an
                iterable: nothing from the chunk of ``encode_batch_frames`` frames holding
                the bad one on; the chunks before it are stored).
        """
        with self._lock:
            self._check_open()
            if isinstance(frames, (np.ndarray, torch.Tensor)):
                return self._feed_batch(as_frames(frames, self._frame_hw), timestamps)
            if timestamps is not None:
                raise InputError("timestamps can only be given with an array of frames, not an iterable")
            if isinstance(frames, (str, bytes, Path)):
                raise InputError("feed() takes frames; use ingest() for a video file")
            if not isinstance(frames, Iterable):
                raise InputError(f"frames must be an array of uint8 [n, H, W, 3] or an iterable of frames; got {type(frames).__name__}")
            stored = 0
            for chunk in iter_chunks(frames, self.config.stream.encode_batch_frames):
                stored += self._feed_batch(as_frames(chunk, self._frame_hw), None)
            return stored

    def _feed_batch(self, frames: torch.Tensor, timestamps: Any) -> int:
        if getattr(self.backend, "read_only", False):  # refuse before any bookkeeping moves
            raise StoreError(f"stream {self.stream_id!r} is open read-only; frames cannot be fed")
        n = frames.shape[0]
        ts = as_timestamps(timestamps, n, self._last_time)
        if ts is None:
            step = 1.0 / self.config.stream.fps
            base = -step if self._last_time is None else self._last_time
            ts = base + step * torch.arange(1, n + 1, dtype=torch.float64)
            if not (bool(torch.isfinite(ts).all()) and float(ts[0]) > base and bool((ts[1:] > ts[:-1]).all())):
                raise InputError(f"stream time {base} is too large to continue at {self.config.stream.fps} fps; "
                                 "pass timestamps")
        bs = self.config.stream.encode_batch_frames
        embeds = torch.cat([self.model.encode_frames(frames[i : i + bs]) for i in range(0, n, bs)])
        self._frame_hw = (int(frames.shape[1]), int(frames.shape[2]))
        self._last_time = float(ts[-1])
        stored = self._ingestor.add_frames(embeds, ts)
        self.backend.set_state("frames_seen", self._ingestor.frames_seen)
        self.backend.set_state("cursors", dict(self._ingestor.cursor))
        self.backend.set_state("last_time", self._last_time)
        return stored

    def ingest(self, path: str | Path, fps: float | None = None) -> int:
        """Read a video file with decord, sampled at ``fps`` (default ``config.stream.fps``), and feed it.

        Times continue the stream: the video's first frame comes ``1 / fps``
        after the last frame fed so far.

        Returns:
            Number of blocks stored.

        Raises:
            InputError: missing or unreadable file, bad fps.
        """
        return self.feed_from("video", path, fps=fps)

    def feed_from(self, source: str, location: Any, fps: float | None = None, background: bool = False,
                  **options: Any) -> "int | LiveFeed":
        """Feed every chunk of a registered frame source.

        Args:
            source: registered source name ("video", "images", "iterator", "stream").
            location: what the source reads (a path, a URL, an iterable).
            fps: sampling rate (default ``config.stream.fps``).
            background: run in a daemon thread and return a :class:`LiveFeed`
                handle at once; questions can be asked meanwhile.
            options: passed to the source (e.g. ``format="v4l2"`` for a camera).

        Returns:
            The number of blocks stored, or a :class:`LiveFeed` if ``background``.

        Raises:
            UnknownPluginError: unknown source; InputError: the source cannot be
            opened (raised here, before any thread starts).
        """
        self._check_open()
        fps = self.config.stream.fps if fps is None else fps
        source_cls = registry().get("sources", source, field="source")
        options.setdefault("chunk", self.config.stream.encode_batch_frames)
        src = source_cls(location, fps=fps, **options)
        label = str(location) if isinstance(location, (str, Path)) else type(location).__name__
        if background:
            return LiveFeed(self, src, fps, label)
        return self._feed_source(src, fps, label)

    def _feed_source(self, src: Any, fps: float, label: str, stop: threading.Event | None = None) -> int:
        total = getattr(src, "total", None)
        bar = _progress(total, f"ingest {Path(label).name}", self.progress)
        stored = 0
        offset: float | None = None
        try:
            for frames, times in src.chunks():
                with self._lock:
                    self._check_open()
                    if offset is None:
                        offset = 0.0 if self._last_time is None else self._last_time + 1.0 / fps
                    stored += self._feed_batch(as_frames(frames, self._frame_hw), times.to(torch.float64) + offset)
                bar.update(frames.shape[0])
                if stop is not None and stop.is_set():
                    break
        finally:
            bar.close()
        return stored

    # -- asking -----------------------------------------------------------------------------
    def ask(self, question: str, top_k: dict[str, int] | None = None, max_new_tokens: int | None = None) -> Answer:
        """Answer a question from what has been fed so far.

        Args:
            question: the question text.
            top_k: per-level number of blocks, overriding the configuration; a
                value larger than what the level stores raises.
            max_new_tokens: decoding budget (default ``config.generation.max_new_tokens``).

        Returns:
            An :class:`~mukv.blocks.Answer`: text, retrieved blocks (level, time
            span, score), KV tokens at answer time, timings per stage.

        Raises:
            InputError: empty or too long question; EmptyMemoryError: nothing stored
            yet; RetrievalError: a top-k the store cannot serve.
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
        with self._lock:
            self._check_open()
            t_start = time.perf_counter()
            timings: dict[str, float] = {}
            notes: list[str] = []
            plan = self._plan(top_k, notes)
            n_q = self.model.tokenize(question).numel()
            if n_q > MAX_QUESTION_TOKENS:
                raise InputError(f"question is too long: {n_q} tokens (at most {MAX_QUESTION_TOKENS})")
            t0 = time.perf_counter()
            vector = self.model.query_vector(self.prefix, question)
            timings["query"] = time.perf_counter() - t0
            query = Query(question, vector, self._last_time or 0.0, self._ingestor.frames_seen,
                          probe=question_probe(self.model, self.prefix, question, self.backend,
                                               sum(plan.get(lp.level.name, 0) * lp.kept for lp in self.levels)))
            t0 = time.perf_counter()
            hits = self.retriever.retrieve(query, self.backend, plan)
            timings["retrieve"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            pieces = page_in(self.backend, hits, [lp.level.name for lp in self.levels], self.config.assembly.rerotate)
            fn = (lambda k, old, new: rerotate(self.model, k, old, new)) if self.config.assembly.rerotate else None
            tl = getattr(self.model, "timeline", None) if self.config.assembly.rerotate else None
            assembled = assemble_context(self.prefix.kv, pieces, self.config.assembly.order, fn, tl)
            context = assembled.kv
            timings["page_in"] = time.perf_counter() - t0
            budget = max_new_tokens or self.config.generation.max_new_tokens
            text, _, gen_t = self.model.generate(context, question, budget, assembled.next_position)
            timings.update(gen_t)
            timings["total"] = time.perf_counter() - t_start
            return Answer(question, text, retrieved_blocks(pieces, assembled), int(context.shape[4]), timings, notes)

    def _plan(self, top_k: dict[str, int] | None, notes: list[str]) -> dict[str, int]:
        names = [lp.level.name for lp in self.levels]
        if top_k is not None:
            if not isinstance(top_k, dict):
                raise InputError(f"top_k must be a dict of level name -> count; got {type(top_k).__name__}")
            unknown = sorted(set(top_k) - set(names), key=repr)
            if unknown:
                raise InputError(f"top_k names unknown levels {unknown}; levels: {names}")
            for name, k in top_k.items():
                if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                    raise InputError(f"top_k[{name!r}] must be a non-negative integer; got {k!r}")
        if sum(self.backend.count(n) for n in names) == 0:
            seen = self._ingestor.frames_seen
            raise EmptyMemoryError(
                "nothing is stored yet: feed frames before asking" if seen == 0 else
                f"nothing is stored yet: {seen} frame(s) fed, no level has completed a block"
            )
        plan = {}
        for lp in self.levels:
            name = lp.level.name
            stored = self.backend.count(name)
            if top_k is not None and name in top_k:
                k = top_k[name]
                if k > stored:
                    raise RetrievalError(f"top_k[{name!r}] = {k} but only {stored} {name} block(s) are stored")
            else:
                k = lp.level.top_k
                if k > stored:
                    if self.config.retrieval.on_short_stream == "error":
                        raise RetrievalError(
                            f"levels.{name}.top_k = {k} but only {stored} {name} block(s) are stored "
                            "(retrieval.on_short_stream = 'error')")
                    if stored < k and k < 1_000_000:
                        notes.append(f"{name}: top-k {k} clamped to the {stored} block(s) stored")
                    k = stored
            plan[name] = k
        return plan

    # -- state ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Frames fed, and blocks / tokens / bytes held per level."""
        with self._lock:
            levels = self.backend.stats()
            return {
                "frames": self._ingestor.frames_seen,
                "last_time": self._last_time,
                "levels": {lp.level.name: levels.get(lp.level.name, {"blocks": 0, "tokens": 0, "bytes": 0})
                           for lp in self.levels},
                "bytes": sum(levels.get(lp.level.name, {}).get("bytes", 0) for lp in self.levels),
                "uncovered_frames": {k: v for k, v in self._ingestor.uncovered.items() if v},
                "kv_bytes_per_token": self.model.layout.token_bytes(),
            }

    def close(self) -> None:
        """Flush and close the store. The session cannot be used afterwards."""
        with self._lock:
            if not self._closed:
                if not self._owner:  # a fork: the store belongs to its parent
                    self._closed = True
                    return
                try:
                    self.backend.flush()
                finally:
                    self.backend.close()
                    self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise MukvError("this session is closed")

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LiveFeed:
    """A frame source feeding a session from a background thread.

    Attributes:
        blocks: blocks stored so far (updated when the feed ends).
        error: the exception that ended the feed, if any.
    """

    def __init__(self, session: Session, source: Any, fps: float, label: str):
        self.session, self.source, self.label = session, source, label
        self.blocks = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fps,), name=f"mukv-feed-{label}", daemon=True)
        self._thread.start()

    def _run(self, fps: float) -> None:
        try:
            self.blocks = self.session._feed_source(self.source, fps, self.label, self._stop)
        except BaseException as exc:  # reported through .error and join()
            self.error = exc

    @property
    def running(self) -> bool:
        """Whether the feed thread is still reading."""
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the feed to stop after its current chunk and wait for it."""
        self._stop.set()
        self._thread.join(timeout)

    def join(self, timeout: float | None = None) -> int:
        """Wait for the source to end; re-raise its error; return blocks stored."""
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.blocks


class _NoBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="frame")
