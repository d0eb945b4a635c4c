"""Opening a :class:`~mukv.session.Session` (a part of it: :class:`SessionOpening`, a mixin).

``Session(...)`` checks its arguments, resolves its configuration (over a stored stream's
contract and the model's own defaults), builds the components the configuration names, loads
the model, opens the store through the backend, and reads the stream's bookkeeping back (or
commits a new stream's contract). ``Session.open`` reopens a stored stream with the model and
configuration it recorded; ``Session.fork`` makes a reader of a session's stream with another
retrieval, assembly or generation configuration. :mod:`mukv.session` keeps those methods (their
signatures and documentation) and the session's life after opening: feeding, asking, closing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .clock import to_unix
from .config import MukvConfig, merge
from .errors import ConfigError, InputError, StoreError
from .interfaces import Compressor, GranularityExtractor, Retriever, StorageBackend, TokenScorer
from .kvcodec import build_codec
from .loading import (
    _as_dict,
    _backend_spec,
    _model_record,
    _question_log,
    check_device,
    check_dtype,
    check_path,
    list_stream_ids,
    storage_differences,
)
from .pipeline import Ingestor, LevelPipeline
from .registry import registry
from .specs import build, canonicalize, config_hash, require_json, split
from .state import validate_values
from .stream import Stream, load_pending

if TYPE_CHECKING:
    from .session import Session

#: the stream state values a session reads back (mukv.state.StreamValues)
STATE_KEYS = ("session", "frames_seen", "cursors", "last_time", "first_time", "pending", "sources", "gaps")


class SessionOpening:
    """Opening steps of :class:`~mukv.session.Session` (a mixin: it sets up the session's
    configuration, components, model, store and stream)."""

    def _construct(self, model: Any, backend: Any, path: Any, config: Any, policy: Any, device: Any, dtype: Any,
                   stream_id: Any, backend_options: Any, progress: Any, read_only: Any, resize: Any,
                   wall_origin: Any, thumbnails: Any, log_questions: Any) -> None:
        """``Session(...)``'s work (the arguments as :class:`~mukv.session.Session` takes them, unchecked)."""
        # mukv.session's: callers replace load_model there, and a session logs as mukv.session
        from .session import load_model, log

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
        from .backends.disk.files import check_stream_id

        check_stream_id(stream_id)  # one rule for every backend: the id names folders, logs, exports and URLs
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
        self.retriever, compressor, extractors, scorers = self._components(reg, stored)
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
            self.retriever, compressor, extractors, scorers = self._components(reg, stored)
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

    def _components(self, reg, stored: dict[str, Any] | None
                    ) -> tuple[Retriever, Compressor, dict[str, GranularityExtractor], dict[str, TokenScorer]]:
        """The retriever, compressor, and per-level extractors and scorers that ``self.config`` names
        (``stored``: the stream's stored state, whose retriever :func:`check_retriever_levels` lets open)."""
        cfg = self.config
        retriever = build("retrievers", cfg.retrieval.retriever, cfg, Retriever, "retrieval.retriever", reg)
        written_with = split(MukvConfig.build(stored.get("config") or {}).retrieval.retriever)[0] if stored else None
        check_retriever_levels(retriever, cfg, written_with)
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
    def _reopen(cls, path: Any, stream_id: str, backend: Any, model: Any, read_only: bool,
                kwargs: dict[str, Any]) -> "Session":
        """``Session.open``'s work: the stored stream's model and contract, then ``cls(...)``."""
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

    def _fork(self, config: Any, policy: Any) -> "Session":
        """``Session.fork``'s work."""
        from .session import Session

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
            check_retriever_levels(child.retriever, new, split(self.config.retrieval.retriever)[0])
            child._owner = False
            child._closed = False
            if new.generation.system_prompt != self.config.generation.system_prompt:
                child.prefix = self.model.prefix(new.generation.system_prompt)
            return child


def check_retriever_levels(retriever: Retriever, config: MukvConfig, written_with: str | None = None) -> None:
    """ConfigError for a retriever that reads per-layer keys (:attr:`Retriever.needs_layer_keys`) over a
    level it searches (``top_k`` > 0) stored without them, where every question would fail; a stream
    already written with that retriever (``written_with``, its name) still opens.
    """
    if not getattr(retriever, "needs_layer_keys", False):
        return
    missing = [lv.name for lv in config.levels if lv.top_k > 0 and not lv.layer_keys]
    name = split(config.retrieval.retriever)[0]
    if not missing or (name is not None and name == written_with):
        return
    raise ConfigError(f"retrieval.retriever {name or type(retriever).__name__!r} compares each layer's question "
                      f"queries with the blocks' per-layer keys, and level(s) {', '.join(repr(m) for m in missing)} "
                      "are stored without them: set layer_keys true on those levels of a new stream (policy 'rekv' "
                      "does; levels given in config replace the policy's) or top_k 0, or choose another retriever")
