"""Typed configuration of a mukv session.

Every field has a docstring and is validated when the configuration is built;
an invalid value raises :class:`mukv.errors.ConfigError` naming the field.
Fields that name a component (scorer, compressor, retriever, extractor) take a
registered name, a name with settings (``{"name": "topk", "dedup": True}``) or an
object implementing the interface (:mod:`mukv.specs`). Names and settings are
checked against the registry when a session is built (an unknown name lists the
registered choices, a bad setting names the field and the plugin).

The defaults are the run of MuKV's authors (LLaVA-OneVision, 196 visual tokens
per frame): three levels of 49, 196 and 784 tokens, keep ratios 0.1 / 0.1 / 0.8,
attention weights alpha 0.5 / 0.7 / 0.8, final top-k 20 / 32 / 12, 2x
over-retrieval, segment-guided rerank with weight 0.3 and N = 5.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .specs import component_ref

log = logging.getLogger(__name__)

#: A field naming a granularity extractor (a name, ``{"name": ..., **settings}`` or an object).
ExtractorRef = component_ref("extractors")
#: A field naming a token scorer (a name, ``{"name": ..., **settings}``, an object or a function).
ScorerRef = component_ref("scorers")
#: An optional field naming a token scorer (``None``: the default).
OptionalScorerRef = component_ref("scorers", optional=True)
#: A field naming a compressor.
CompressorRef = component_ref("compressors")
#: A field naming a retriever.
RetrieverRef = component_ref("retrievers")

_MODEL = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True)


class LevelConfig(BaseModel):
    """One granularity level: how its blocks are cut, compressed and retrieved."""

    model_config = _MODEL

    name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Name of the level, unique in a configuration ("patch", "frame", "segment")."""

    extractor: ExtractorRef
    """Granularity extractor that cuts a window of frames into blocks: a registered
    name ("patch_raster", "patch_spatial", "frame", "segment"), a name with settings,
    or an object."""

    frames: int = Field(default=1, ge=1, le=4096)
    """Frames per window: 1 for patch and frame levels, S for segments (S = 4)."""

    tokens: int | None = Field(default=None, ge=1)
    """Tokens per block inside one frame (49 for the paper's patches); ``None``
    means a block is the whole window. Must divide the model's tokens per frame."""

    keep_ratio: float = Field(gt=0.0, le=1.0)
    """Fraction r of a block's tokens kept after scoring: floor(L * r) tokens,
    at least one."""

    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    """Weight of the attention signal in the dual score
    s = alpha * attention + (1 - alpha) * frequency."""

    top_k: int = Field(ge=0)
    """Number of blocks of this level retrieved per question (final, after rerank)."""

    rerank_weight: float = Field(default=0.0, ge=0.0, le=1.0)
    """Weight of the similarity to the guide level's context vector in the
    segment-guided rerank: s' = (1 - w) * s + w * cos(v, c). 0 disables it."""

    scorer: OptionalScorerRef = None
    """Token scorer for this level only (a name, a name with settings, or an object);
    ``None`` uses ``scoring.scorer``."""

    local_window: int = Field(default=0, ge=0, le=100_000)
    """Sliding-window encoding (ReKV's): each block is prefilled after the system prompt
    and the ``local_window`` blocks of this level before it (their uncompressed KV),
    instead of alone. ReKV's ``n_local`` of 15,000 tokens is about 76 frames of 196
    tokens. 0: every block is prefilled on its own (MuKV)."""

    layer_keys: bool = False
    """Also store each block's mean key in every layer, RoPE removed, for retrievers that
    choose blocks per layer (ReKV's: ``retrieval.retriever = "layerwise"``)."""


class ScoringConfig(BaseModel):
    """How tokens of a block are scored."""

    model_config = _MODEL

    scorer: ScorerRef = "dual"
    """Token scorer used by every level without its own: a registered name, a name with
    settings (``{"name": "dual", "frequency": "frequency_diff"}``), or an object."""

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        return _migrate_scoring(data, None)[0] if isinstance(data, dict) else data


class CompressionConfig(BaseModel):
    """How a block is compressed once scored."""

    model_config = _MODEL

    compressor: CompressorRef = "topk"
    """Compressor: a registered name, a name with settings
    (``{"name": "topk", "dedup": True, "threshold": 0.9}``), or an object."""

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        return _migrate_compression(data) if isinstance(data, dict) else data


#: Fields that older mukv kept in ``scoring`` and ``compression`` and that are now settings of
#: the built-in plugins, with their old defaults: a stored configuration holding them still opens.
LEGACY_SCORING = {"attention": "attention", "frequency": "frequency_fft"}
LEGACY_COMPRESSION = {"dedup": ("dedup", False), "dedup_threshold": ("threshold", 0.9),
                      "dedup_oversample": ("oversample", 1.2)}


def _with_settings(spec: Any, settings: dict[str, Any]) -> Any:
    """A component spec with ``settings`` added (those it sets itself win)."""
    if isinstance(spec, str):
        return {"name": spec, **settings}
    if isinstance(spec, dict) and "name" in spec:
        return {**settings, **spec}
    return spec  # an object or an invalid value: left to field validation


def _spec_name(spec: Any) -> Any:
    return spec if isinstance(spec, str) else spec.get("name") if isinstance(spec, dict) else None


def _migrate_scoring(scoring: dict[str, Any], levels: Any) -> tuple[dict[str, Any], Any]:
    """Move the old ``scoring.attention`` / ``scoring.frequency`` into the settings of every
    "dual" scorer the configuration names (``scoring.scorer`` and per-level scorers)."""
    if not any(k in scoring for k in LEGACY_SCORING):
        return scoring, levels
    scoring = dict(scoring)
    moved = {k: scoring.pop(k) for k in LEGACY_SCORING if k in scoring}
    settings = {k: v for k, v in moved.items() if v != LEGACY_SCORING[k]}
    if settings:
        log.warning("scoring.%s is deprecated: give it as a setting of the dual scorer, "
                    '{"scoring": {"scorer": {"name": "dual", %s}}}', "/".join(settings),
                    ", ".join(f'"{k}": {json.dumps(v)}' for k, v in settings.items()))
        if _spec_name(scoring.get("scorer", "dual")) == "dual":
            scoring["scorer"] = _with_settings(scoring.get("scorer", "dual"), settings)
        if isinstance(levels, list):
            levels = [({**lv, "scorer": _with_settings(lv["scorer"], settings)}
                       if isinstance(lv, dict) and _spec_name(lv.get("scorer")) == "dual" else lv) for lv in levels]
    return scoring, levels


def _migrate_compression(compression: dict[str, Any]) -> dict[str, Any]:
    """Move the old ``compression.dedup*`` fields into the settings of the "topk" compressor."""
    if not any(k in compression for k in LEGACY_COMPRESSION):
        return compression
    compression = dict(compression)
    moved = {k: compression.pop(k) for k in LEGACY_COMPRESSION if k in compression}
    settings = {LEGACY_COMPRESSION[k][0]: v for k, v in moved.items() if v != LEGACY_COMPRESSION[k][1]}
    if settings:
        log.warning("compression.%s is deprecated: give it as a setting of the topk compressor, "
                    '{"compression": {"compressor": {"name": "topk", %s}}}', "/".join(moved),
                    ", ".join(f'"{k}": {json.dumps(v)}' for k, v in settings.items()))
        if _spec_name(compression.get("compressor", "topk")) == "topk":
            compression["compressor"] = _with_settings(compression.get("compressor", "topk"), settings)
    return compression


class RetrievalConfig(BaseModel):
    """How blocks are retrieved for a question."""

    model_config = _MODEL

    retriever: RetrieverRef = "semi_hierarchical"
    """Retriever: a registered name, a name with settings, or an object."""

    over_retrieval: float = Field(default=2.0, ge=1.0, le=100.0)
    """Candidates fetched per level before the rerank, as a multiple of top-k."""

    rerank_n: int = Field(default=5, ge=1)
    """Number N of top guide-level candidates averaged into the context vector."""

    guide_level: str | None = "segment"
    """Level whose top candidates guide the rerank of the others; ``None`` disables
    the rerank. Left unset with no "segment" level, it becomes ``None``."""

    chunk_blocks: int = Field(default=1, ge=1, le=4096)
    """Per-layer retrieval (``layerwise``) ranks runs of this many consecutive blocks by
    their mean score and takes whole runs (ReKV's ``chunk_size``; 1: single blocks)."""

    layer_probe: Literal["prompt", "memory"] = "prompt"
    """How per-layer retrieval (``layerwise``) forms each layer's question queries: "prompt",
    the question after the system prompt; "memory", the question run through the memory,
    each layer attending to the blocks it chose before the next layer's queries form (ReKV's
    question pass)."""

    recent_blocks: int = Field(default=0, ge=0)
    """Per-layer retrieval (``layerwise``) always reads the most recent blocks too, this
    many of each level's top-k (the local window at answer time; ReKV's public code: 0)."""

    diversity: float | None = Field(default=None, gt=0.0, le=1.0)
    """Near-duplicate suppression: a candidate whose block vector has a cosine similarity above
    this with a block already chosen at its level is passed over, so that the many near-identical
    blocks of a long static scene do not fill a level's top-k; passed-over candidates fill the
    top-k only when too few others remain, so every level still reads its budget. ``None``: off
    (the paper's retrieval). Used by the ``semi_hierarchical`` retriever (MuKV's)."""

    diversity_pool: float = Field(default=8.0, ge=1.0, le=100.0)
    """Candidates searched per level when ``diversity`` is on, as a multiple of top-k (never
    fewer than ``over_retrieval``)."""

    on_short_stream: Literal["clamp", "error"] = "clamp"
    """When a level stores fewer blocks than its configured top-k: "clamp" takes
    them all, "error" raises :class:`mukv.errors.RetrievalError`. A top-k passed
    explicitly to ``Session.ask`` always raises when too large."""


class AssemblyConfig(BaseModel):
    """How retrieved blocks are put together before the answer prompt."""

    model_config = _MODEL

    order: Literal["level_score", "time"] = "level_score"
    """"level_score": level by level, best score first (the authors' order);
    "time": every retrieved block in stream-time order."""

    rerotate: bool = False
    """Move retrieved keys onto one timeline (consecutive positions in assembled
    order) instead of keeping their overlapping prefill positions (the authors'
    behaviour)."""


class GenerationConfig(BaseModel):
    """Prompts and decoding."""

    model_config = _MODEL

    system_prompt: str | None = Field(default=None, max_length=32768)
    """Text prefilled before every block and question (at most 32,768 characters, valid Unicode);
    ``None`` uses the model adapter's default."""

    @field_validator("system_prompt")
    @classmethod
    def _prompt_text(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"not valid Unicode text ({exc.reason} at position {exc.start})") from None
            if "\x00" in v:
                raise ValueError("must not contain NUL characters")
        return v

    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    """Greedy decoding stops after this many tokens (or at end of sequence)."""


class StreamConfig(BaseModel):
    """Properties of the incoming stream."""

    model_config = _MODEL

    fps: float = Field(default=0.5, gt=0.0, le=1000.0)
    """Frames per second assumed for ``Session.feed`` without timestamps, and the
    default sampling rate of ``Session.ingest``."""

    prefill_batch_tokens: int = Field(default=16384, ge=1)
    """Upper bound on tokens in one batched prefill pass (bounds activation memory)."""

    encode_batch_frames: int = Field(default=64, ge=1)
    """Frames per vision-tower batch (with :data:`mukv.encode_ahead.ENCODE_AHEAD` on a GPU, a feed of
    several batches is prefilled one batch at a time while the next batches are encoded)."""


def _default_levels() -> list[LevelConfig]:
    return [
        LevelConfig(name="patch", extractor="patch_raster", frames=1, tokens=49, keep_ratio=0.1, alpha=0.5,
                    top_k=20, rerank_weight=0.3),
        LevelConfig(name="frame", extractor="frame", frames=1, keep_ratio=0.1, alpha=0.7, top_k=32,
                    rerank_weight=0.3),
        LevelConfig(name="segment", extractor="segment", frames=4, keep_ratio=0.8, alpha=0.8, top_k=12),
    ]


class MukvConfig(BaseModel):
    """The whole configuration of a session. Defaults: the MuKV authors' run."""

    model_config = _MODEL

    levels: list[LevelConfig] = Field(default_factory=_default_levels, min_length=1)
    """Granularity levels, in the order their blocks are assembled."""

    scoring: ScoringConfig = ScoringConfig()
    """Token scoring."""

    compression: CompressionConfig = CompressionConfig()
    """Token selection."""

    retrieval: RetrievalConfig = RetrievalConfig()
    """Block retrieval."""

    assembly: AssemblyConfig = AssemblyConfig()
    """Order of retrieved blocks in the answer context."""

    generation: GenerationConfig = GenerationConfig()
    """Prompts and decoding."""

    stream: StreamConfig = StreamConfig()
    """Stream timing and batching."""

    kv_codec: str | dict[str, Any] = "none"
    """How stored KV is encoded (a KV codec, ``mukv_register_codecs``): a registered name
    ("none": the model's dtype as is; "int8": keys per channel and values per token; "int4":
    groups along the head dimension, two values per byte; "fp8": e4m3 with per-block scales)
    or ``{"name": NAME, **settings}`` (e.g. ``{"name": "int4", "group_size": 32}``). A store
    records the codec of each level array and reads every array with its own, so a stream can
    change codec between sessions (new blocks use the new one); see ``docs/how-to/codecs.md``."""

    @field_validator("kv_codec")
    @classmethod
    def _check_codec(cls, value: Any) -> Any:
        name = value.get("name") if isinstance(value, dict) else value
        if not isinstance(name, str) or not name.strip():
            raise ValueError('a KV codec is a registered name or {"name": NAME, **settings} with a non-empty name')
        if isinstance(value, dict) and any(not isinstance(k, str) for k in value):
            raise ValueError("settings of a KV codec are named by strings")
        return value

    def codec_spec(self) -> tuple[str, dict[str, Any]]:
        """``kv_codec`` as ``(name, settings)``."""
        if isinstance(self.kv_codec, str):
            return self.kv_codec, {}
        spec = dict(self.kv_codec)
        return spec.pop("name"), spec

    @model_validator(mode="before")
    @classmethod
    def _default_guide(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("scoring"), dict):
            # the old scoring.attention / frequency reach per-level "dual" scorers too
            scoring, levels = _migrate_scoring(data["scoring"], data.get("levels"))
            data = {**data, "scoring": scoring, **({"levels": levels} if "levels" in data else {})}
        # The default guide level is "segment"; configurations without such a
        # level and without an explicit guide get no rerank instead of an error.
        if isinstance(data, dict) and "levels" in data:
            retrieval = data.get("retrieval") or {}
            if isinstance(retrieval, BaseModel):
                retrieval = retrieval.model_dump(exclude_unset=True)
            levels = data["levels"] if isinstance(data["levels"], (list, tuple)) else []  # else: field error below
            names = [lv.get("name") if isinstance(lv, dict) else getattr(lv, "name", None) for lv in levels]
            if isinstance(retrieval, dict) and "guide_level" not in retrieval and "segment" not in names:
                data = {**data, "retrieval": {**retrieval, "guide_level": None}}
        return data

    @model_validator(mode="after")
    def _check_levels(self) -> "MukvConfig":
        names = [lv.name for lv in self.levels]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"levels: duplicate level names {dup}")
        guide = self.retrieval.guide_level
        if guide is not None and guide not in names:
            raise ValueError(f"retrieval.guide_level {guide!r} is not a level; levels: {names}")
        return self

    def level(self, name: str) -> LevelConfig:
        """The level called ``name``."""
        for lv in self.levels:
            if lv.name == name:
                return lv
        raise ConfigError(f"no level {name!r}; levels: {[lv.name for lv in self.levels]}")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, value: "MukvConfig | dict[str, Any] | None" = None, **overrides: Any) -> "MukvConfig":
        """Build a configuration from a config, a dict of fields, or nothing, plus
        keyword overrides (nested dicts merge into the defaults).

        Raises:
            ConfigError: naming every invalid field.
        """
        if isinstance(value, MukvConfig):
            data = value.model_dump()
        elif value is None:
            data = {}
        elif isinstance(value, dict):
            data = dict(value)
        else:
            raise ConfigError(f"config must be a MukvConfig or a dict, not {type(value).__name__}")
        data = merge(data, overrides)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from None

    @classmethod
    def from_policy(cls, name: Any, *, under: dict[str, Any] | None = None, **overrides: Any) -> "MukvConfig":
        """The configuration of a registered policy ("mukv", "rekv", "uniform",
        "sliding_window", "full_context", ...) with optional overrides.

        ``name`` is a policy name, or a name with the settings of a policy that takes
        some (``{"name": "rekv", "top_k": 32}``). ``under`` holds fields the policy and
        the overrides are applied over, in place of mukv's defaults: a model's own defaults
        (:attr:`~mukv.interfaces.ModelAdapter.default_config`, e.g. levels sized for its
        tokens per frame).

        Raises:
            UnknownPluginError: no such policy.
            ConfigError: bad settings or fields.
        """
        return cls.build(merge(merge(dict(under or {}), policy_fields(name)), overrides))

    def replace(self, **overrides: Any) -> "MukvConfig":
        """A copy with fields replaced (nested dicts merge), validated again."""
        return MukvConfig.build(self, **overrides)


def policy_fields(policy: Any, field: str = "policy") -> dict[str, Any]:
    """The configuration fields of a policy spec (a name, or ``{"name": ..., **settings}``).

    A policy is registered as a dict of fields, or as a function returning one; a
    function with a ``Settings`` model takes its settings as keyword arguments.

    Raises:
        UnknownPluginError: no such policy.
        ConfigError: bad settings, or the policy does not give a dict of fields.
    """
    from .specs import resolve

    r = resolve("policies", policy, field)
    if r.name is None:
        raise ConfigError(f"{field}: a policy is a registered name (or a name with settings); got {policy!r}")
    fields = r.component(**r.kwargs()) if callable(r.component) else r.component
    if not isinstance(fields, dict):
        raise ConfigError(f"policy {r.name!r} ({r.entry.package}) gave {type(fields).__name__}, not a dict of "
                          "configuration fields")
    return dict(fields)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``overrides`` into a copy of ``base`` (dicts merge, other values replace).

    A component given with settings (a dict with a "name") replaces one of another
    name whole; the settings of the same component merge."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, BaseModel):
            value = value.model_dump()
        current = out.get(key)
        other_component = (isinstance(value, dict) and isinstance(current, dict) and "name" in value
                           and "name" in current and value["name"] != current["name"])
        if isinstance(value, dict) and isinstance(current, (dict, BaseModel)) and not other_component:
            current = out[key].model_dump() if isinstance(out[key], BaseModel) else out[key]
            out[key] = merge(current, value)
        else:
            out[key] = value
    return out


def format_validation_error(exc: ValidationError) -> str:
    """One line per invalid field: ``field.path: message (got value)``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        got = err.get("input")
        shown = repr(got)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        lines.append(f"{loc}: {err['msg']} (got {shown})")
    return "invalid mukv configuration:\n  " + "\n  ".join(lines)
