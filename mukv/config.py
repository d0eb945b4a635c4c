"""Typed configuration of a mukv session.

Every field has a docstring and is validated when the configuration is built;
an invalid value raises :class:`mukv.errors.ConfigError` naming the field.
Plugin names (scorer, compressor, retriever, extractor) are checked against the
registry when a session is built, and an unknown name lists the registered
choices.

The defaults are the run of MuKV's authors (LLaVA-OneVision, 196 visual tokens
per frame): three levels of 49, 196 and 784 tokens, keep ratios 0.1 / 0.1 / 0.8,
attention weights alpha 0.5 / 0.7 / 0.8, final top-k 20 / 32 / 12, 2x
over-retrieval, segment-guided rerank with weight 0.3 and N = 5.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

_MODEL = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True)


class LevelConfig(BaseModel):
    """One granularity level: how its blocks are cut, compressed and retrieved."""

    model_config = _MODEL

    name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Name of the level, unique in a configuration ("patch", "frame", "segment")."""

    extractor: str
    """Registered granularity extractor that cuts a window of frames into blocks
    ("patch_raster", "patch_spatial", "frame", "segment")."""

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

    scorer: str | None = None
    """Registered token scorer for this level only; ``None`` uses ``scoring.scorer``."""

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

    scorer: str = "dual"
    """Registered token scorer used by every level without its own."""

    attention: str = "attention"
    """Scorer providing the attention signal of the dual score."""

    frequency: str = "frequency_fft"
    """Scorer providing the frequency signal of the dual score: "frequency_fft"
    (high-pass FFT over the token axis) or "frequency_diff" (norm of consecutive
    key differences)."""


class CompressionConfig(BaseModel):
    """How a block is compressed once scored."""

    model_config = _MODEL

    compressor: str = "topk"
    """Registered compressor."""

    dedup: bool = False
    """Drop near-duplicate tokens: over-select, then drop a candidate whose key is
    too similar to a better-scored kept one."""

    dedup_threshold: float = Field(default=0.9, gt=-1.0, le=1.0)
    """Cosine similarity of last-layer keys above which a candidate is a duplicate."""

    dedup_oversample: float = Field(default=1.2, ge=1.0, le=10.0)
    """Candidates considered by de-duplication, as a multiple of the kept count."""


class RetrievalConfig(BaseModel):
    """How blocks are retrieved for a question."""

    model_config = _MODEL

    retriever: str = "semi_hierarchical"
    """Registered retriever."""

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

    system_prompt: str | None = None
    """Text prefilled before every block and question; ``None`` uses the model
    adapter's default."""

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
    """Frames per vision-tower batch."""


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

    @model_validator(mode="before")
    @classmethod
    def _default_guide(cls, data: Any) -> Any:
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
    def from_policy(cls, name: str, *, under: dict[str, Any] | None = None, **overrides: Any) -> "MukvConfig":
        """The configuration of a registered policy ("mukv", "rekv", "uniform",
        "sliding_window", "full_context", ...) with optional overrides.

        ``under`` holds fields the policy and the overrides are applied over, in
        place of mukv's defaults: a model's own defaults
        (:attr:`~mukv.interfaces.ModelAdapter.default_config`, e.g. levels sized for
        its tokens per frame)."""
        from .registry import registry

        policy = registry().get("policies", name, field="policy")
        base = policy() if callable(policy) else policy
        return cls.build(merge(merge(dict(under or {}), dict(base)), overrides))

    def replace(self, **overrides: Any) -> "MukvConfig":
        """A copy with fields replaced (nested dicts merge), validated again."""
        return MukvConfig.build(self, **overrides)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``overrides`` into a copy of ``base`` (dicts merge, other values replace)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if isinstance(value, dict) and isinstance(out.get(key), (dict, BaseModel)):
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
