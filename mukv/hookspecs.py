"""The hook specifications of mukv: the one place that says what a plugin can do.

A plugin is any module or object with functions decorated by
:data:`mukv.hookimpl`. Every hook receives a ``register`` callback and calls it
once per component it contributes::

    import mukv

    @mukv.hookimpl
    def mukv_register_scorers(register):
        register("key_norm", lambda blocks: blocks.keys.norm(dim=-1).mean(dim=1))

Hooks run once, when the registry is built (the first time a session is
created, or after :func:`mukv.register_plugin`). They never run per block,
per layer or per question: the components they register are what the hot path
calls.

The ``register`` callback has the signature ``register(name: str, component)``.

A component that takes settings declares them as a pydantic model, its
``Settings`` attribute (see :mod:`mukv.specs`); the configuration then selects
it as ``{"name": NAME, setting: value, ...}`` and ``mukv plugins --json`` shows
the settings with their defaults.

A plugin that fails is contained: if its module does not import, if it defines a
function named like a hook that is none (``mukv_register_scorer``: the error names
the closest hook), or if one of its hooks raises, it is skipped whole and reported
(a warning, and ``mukv plugins``); a name that another package registered too is
refused (mukv's own built-in keeps its name; between two third-party packages,
selecting the name raises :class:`mukv.errors.ConfigError` naming both). Every
other component keeps working. A plugin added with :func:`mukv.register_plugin`
raises :class:`mukv.errors.ConfigError` instead, and is not registered.
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("mukv")
hookimpl = pluggy.HookimplMarker("mukv")

Register = Callable[[str, object], None]


@hookspec
def mukv_register_extractors(register: Register) -> None:
    """Register granularity extractors: how a level cuts frames into blocks.

    :param register: call ``register(name, extractor)`` once per extractor.
        ``extractor`` is a :class:`mukv.interfaces.GranularityExtractor`
        subclass (built with ``from_config(config, settings)``) or instance. Its one method,
        ``split(level, frames, grid)``, returns a ``LongTensor[n_blocks, block_len]``
        of token indices into a window of ``level.frames`` frames of
        ``grid[0] * grid[1]`` visual tokens each (frame-major, raster order).

    Called once, when the registry is built. A level selects its extractor by
    name with ``LevelConfig.extractor``.
    """


@hookspec
def mukv_register_scorers(register: Register) -> None:
    """Register token scorers: how important each token of a block is.

    :param register: call ``register(name, scorer)`` once per scorer. ``scorer``
        is a :class:`mukv.interfaces.TokenScorer` subclass (built with
        ``from_config(config, settings)``; its ``Settings`` model, if any, validates
        ``{"name": ..., setting: value}``), an instance, or a plain function
        ``f(blocks: PrefilledBlocks) -> Tensor[B, L]``. Higher scores mean keep.

    Called once, when the registry is built. The configuration chooses a scorer
    with ``scoring.scorer`` (or per level with ``LevelConfig.scorer``).
    """


@hookspec
def mukv_register_compressors(register: Register) -> None:
    """Register compressors: which tokens of a block are kept, given scores.

    :param register: call ``register(name, compressor)`` once per compressor: a
        :class:`mukv.interfaces.Compressor` subclass (built with
        ``from_config(config, settings)``) or instance. Its one method,
        ``select(blocks, scores) -> LongTensor[B, K]``, returns kept token
        indices in time order.

    Called once, when the registry is built; chosen with ``compression.compressor``.
    """


@hookspec
def mukv_register_retrievers(register: Register) -> None:
    """Register retrievers: which stored blocks answer a question.

    :param register: call ``register(name, retriever)`` once per retriever: a
        :class:`mukv.interfaces.Retriever` subclass (built with
        ``from_config(config, settings)``) or instance. Its one method,
        ``retrieve(query, index, plan) -> list[Hits]``, searches a
        :class:`mukv.interfaces.BlockIndex`.

    Called once, when the registry is built; chosen with ``retrieval.retriever``.
    """


@hookspec
def mukv_register_backends(register: Register) -> None:
    """Register storage backends: where compressed blocks live.

    :param register: call ``register(name, backend_class)`` once per backend: a
        :class:`mukv.interfaces.StorageBackend` subclass, constructed as
        ``backend_class(layout=KVLayout, path=..., device=..., **options)``.

    Called once, when the registry is built; chosen with ``Session(backend=name)``.
    Heavy optional imports belong inside the class, not at module import.
    """


@hookspec
def mukv_register_models(register: Register) -> None:
    """Register model adapters and model presets.

    :param register: call ``register(name, factory)`` once per entry. ``factory``
        is either a :class:`mukv.interfaces.ModelAdapter` subclass whose
        ``model_types`` attribute lists the Hugging Face ``config.model_type``
        values it loads from a local checkpoint directory
        (``cls.from_pretrained(path, device=..., dtype=...)``), or a preset: a
        function ``f(device, dtype, **settings) -> ModelAdapter`` that builds a model
        without downloading anything. Either may carry a ``Settings`` model: the
        settings of ``Session(model={"name": ..., setting: value})`` are validated
        by it and passed as keyword arguments (to ``from_pretrained`` for a class).

    Called once, when the registry is built; chosen with ``Session(model=...)``.
    """


@hookspec
def mukv_register_policies(register: Register) -> None:
    """Register policies: named configurations (MuKV itself and the baselines).

    :param register: call ``register(name, overrides)`` once per policy, where
        ``overrides`` is a ``dict`` of :class:`mukv.config.MukvConfig` fields
        (nested dicts allowed) applied over the defaults, or a function
        ``f(**settings) -> dict`` (with a ``Settings`` model, selected as
        ``{"name": ..., setting: value}``).

    Called once, when the registry is built; chosen with
    ``Session(policy=name)`` or ``MukvConfig.from_policy(name)``.
    """


@hookspec
def mukv_register_evictors(register: Register) -> None:
    """Register hot-tier eviction policies: which blocks leave fast memory first.

    :param register: call ``register(name, policy)`` once per policy: a
        :class:`mukv.interfaces.EvictionPolicy` subclass (built with
        ``from_config(config, settings)``) or instance. Its one method,
        ``victims(candidates, need_bytes)``, orders hot blocks for eviction.

    Called once, when the registry is built; chosen with the tiered backend's
    ``eviction`` option.
    """


@hookspec
def mukv_register_indexes(register: Register) -> None:
    """Register vector indexes: how block vectors are searched at scale.

    :param register: call ``register(name, index_class)`` once per index: a
        :class:`mukv.interfaces.VectorIndex` subclass, built as
        ``index_class(dim=V, device=..., **settings)``. Heavy imports (faiss) belong inside
        the class.

    Called once, when the registry is built; chosen by a backend's ``index`` option.
    """


@hookspec
def mukv_register_sources(register: Register) -> None:
    """Register frame sources: where live frames come from (files, folders, cameras).

    :param register: call ``register(name, source_class)`` once per source: a
        :class:`mukv.interfaces.FrameSource` subclass, built as
        ``source_class(location, fps=..., **options)`` (options validated by its
        ``Settings`` model when it has one). Its one method,
        ``chunks()``, yields ``(frames uint8 [n, H, W, 3], times [n])``.

    Called once, when the registry is built; chosen with ``Session.feed_from(name, ...)``.
    """


@hookspec
def mukv_register_codecs(register: Register) -> None:
    """Register KV codecs: how stored KV is encoded (bf16 as is, int8, int4, fp8 ...).

    :param register: call ``register(name, codec_class)`` once per codec: a
        :class:`mukv.interfaces.KVCodec` subclass, built as ``codec_class(**settings)``
        (its ``Settings`` pydantic model checks them). Its two methods,
        ``encode(kv [B, Y, 2, H, K, D]) -> EncodedKV`` (one row per block) and
        ``decode(encoded, device) -> [n, Y, 2, H, K, D]``, are the two directions of
        one byte layout.

    Called once, when the registry is built; chosen with ``MukvConfig.kv_codec``
    (a name, or ``{"name": name, **settings}``). A store records the codec's name
    and settings per array and reads each array with its own codec, so a codec's
    name must stay registered for as long as stores written with it are read.
    """
