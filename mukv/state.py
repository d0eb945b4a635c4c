"""What a stream records about itself, typed and validated field by field.

A stream's state is the bookkeeping that must never drift from its blocks: how many frames it has
seen, its stream time, the frames a level has not consumed yet, each level's cursor, where its frames
came from, and the *contract* fixed when it was created (model, levels and compression, frame size,
wall-clock origin). A backend persists it as JSON values beside the blocks and commits both in one
transaction (:meth:`mukv.interfaces.StorageBackend.commit`); this module says what a valid record is.

Every reader of a stored state goes through :func:`validate_values` (and the disk tier's
:func:`validate_state_file`): a garbled count, a float where an integer belongs, a cursor past the
frames seen, a negative time are errors naming the field, never silently truncated numbers.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import StoreError

#: Largest stream time accepted, in seconds (about 317 years): times stay exact to microseconds.
MAX_STREAM_TIME = 1e10
#: Timestamps at or above this are read as Unix epoch seconds (2001-09-09) when a stream keeps wall-clock time.
EPOCH_THRESHOLD = 1e9

_LEVEL = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
Count = Annotated[StrictInt, Field(ge=0, le=1 << 62)]
Level = Annotated[StrictStr, Field(pattern=_LEVEL)]
_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)
_OPEN = ConfigDict(extra="allow", frozen=True, strict=True)  # later mukv versions may add fields


def _finite(v: float | int | None, lo: float = -MAX_STREAM_TIME, hi: float = MAX_STREAM_TIME) -> Any:
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"must be a finite number in [{lo:g}, {hi:g}]")
    return v


Time = Annotated[StrictFloat | StrictInt, Field()]


def finite_number(v: Any) -> float:
    """``v`` as a float: an int or float (not a bool) that is finite; ``ValueError`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"must be a finite number; got {v!r}"[:120])
    return float(v)


#: A field holding a finite number (int or float, never a bool, NaN or infinity), read as a float.
FiniteNumber = Annotated[float, BeforeValidator(finite_number)]


class Contract(BaseModel):
    """Fixed when a stream is created; every later session of the stream must agree with it
    (stored as the state value ``"session"``)."""

    model_config = _OPEN

    model: StrictStr | dict[str, Any]
    """The model the stream was created with: a preset name or a checkpoint path, or either with
    settings (``{"name": ..., **settings}``)."""

    model_id: StrictStr | None = None
    """The model's identity (its KV layout's ``model_id``): a session of another model is refused."""

    config: dict[str, Any]
    """The :class:`~mukv.config.MukvConfig` (JSON) the blocks were made with. Levels, scoring,
    compression and stream settings are fixed; retrieval, assembly and generation may differ per session."""

    tokens_per_frame: Annotated[StrictInt, Field(ge=1, le=1 << 20)] | None = None
    """T, the model's visual tokens per frame (how long a frame or segment block is before compression)."""

    frame_size: Annotated[list[Count], Field(min_length=2, max_length=2)] | None = None
    """``(height, width)`` of the frames, fixed by the first feed; other sizes are refused unless resized."""

    wall_origin: Time | None = None
    """Unix time (seconds) of stream time 0, when the stream keeps wall-clock time; ``None`` otherwise."""

    thumbnails: Annotated[StrictInt, Field(ge=16, le=1024)] | None = None
    """Long side in pixels of the JPEG thumbnail kept of every frame; ``None``: no thumbnails."""

    created: Time | None = None
    """Unix time the stream was created."""

    @field_validator("wall_origin", "created")
    @classmethod
    def _times(cls, v: Any) -> Any:
        return _finite(v, 0.0, 1e11)

    @field_validator("model")
    @classmethod
    def _model(cls, v: Any) -> Any:
        name = v.get("name") if isinstance(v, dict) else v
        if not isinstance(name, str) or not 1 <= len(name) <= 4096:
            raise ValueError("must be a model name or path (1 to 4096 characters), or {\"name\": ..., **settings}")
        return v

    @field_validator("frame_size")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if v is not None and (v[0] < 2 or v[1] < 2 or v[0] > 65536 or v[1] > 65536):
            raise ValueError("height and width must be 2 to 65536 pixels")
        return v


class PendingFrames(BaseModel):
    """Encoded frames that some level has not consumed yet (e.g. 3 of a segment's 4), kept in a
    file beside the state so that a reopened stream continues every level without a gap."""

    model_config = _STRICT

    start: Count
    """Stream index of the first pending frame."""
    count: Annotated[StrictInt, Field(ge=1, le=1 << 20)]
    """Frames in the file."""
    file: StrictStr = Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    """File name, inside the stream's folder."""
    crc32: Annotated[StrictInt, Field(ge=0, lt=1 << 32)]
    """CRC-32 of the file's bytes."""
    shape: Annotated[list[Count], Field(min_length=3, max_length=3)]
    """``[count, T, E]`` of the encoded frames."""
    dtype: StrictStr = Field(pattern=r"^(float32|float16|bfloat16)$")
    """Their torch dtype."""
    times: list[Time]
    """Stream times of the pending frames (seconds)."""

    @model_validator(mode="after")
    def _check(self) -> "PendingFrames":
        if len(self.shape) != 3 or self.shape[0] != self.count or min(self.shape) < 1:
            raise ValueError(f"shape {list(self.shape)} is not [count={self.count}, T, E]")
        if len(self.times) != self.count:
            raise ValueError(f"{len(self.times)} times for {self.count} frames")
        for t in self.times:
            _finite(t)
        return self


class SourceRecord(BaseModel):
    """Where a run of the stream's frames came from (one record per ingest or ``feed_from`` call)."""

    model_config = _OPEN

    kind: StrictStr = Field(min_length=1, max_length=64)
    """Source name ("video", "images", "stream", "iterator", "feed")."""
    id: StrictStr | None = Field(default=None, pattern=r"^[0-9a-f]{1,32}$")
    """The record's id."""
    location: StrictStr = Field(max_length=8192)
    """Path, URL or a description of the iterable."""
    size: Count | None = None
    """Bytes of the file (files only)."""
    sha256: StrictStr | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """SHA-256 of the file's content (files only): a second ingest of the same content is detected."""
    fps: Time | None = None
    """Sampling rate (frames per second)."""
    consumed: Count = 0
    """Frames of the source read so far (an interrupted ingest resumes here)."""
    total: Count | None = None
    """Frames the source yields in all, when known."""
    frames: Annotated[list[Count], Field(min_length=2, max_length=2)]
    """``[first, end)`` stream frame indices this source produced."""
    times: Annotated[list[Time], Field(min_length=2, max_length=2)] | None = None
    """Stream times of its first and last frame."""
    complete: StrictBool = False
    """Whether the source was read to its end."""
    resized_from: Annotated[list[Count], Field(min_length=2, max_length=2)] | None = None
    """``(height, width)`` of the source's frames when they were resized to the stream's size."""
    started: Time | None = None
    """Unix time the ingest started."""


class GapRecord(BaseModel):
    """Frames that arrived but were dropped (e.g. a service that fell behind)."""

    model_config = _STRICT

    t_start: Time
    """Stream time of the first dropped frame."""
    t_end: Time
    """Stream time of the last dropped frame."""
    frames: Annotated[StrictInt, Field(ge=1, le=1 << 62)]
    """How many frames were dropped."""
    after_frame: Count
    """Stream index of the frame before the gap (frames stored so far)."""
    reason: StrictStr = Field(default="dropped", max_length=200)
    """Why."""


class StreamValues(BaseModel):
    """The state values of a stream that mukv itself reads (others are kept as they are)."""

    model_config = _OPEN

    session: Contract | None = None
    frames_seen: Count = 0
    """Frames fed to the stream so far (the next frame's index)."""
    cursors: dict[Level, Count] | None = None
    """Per level: the first frame no block of the level covers yet."""
    last_time: Time | None = None
    """Stream time of the last frame fed."""
    first_time: Time | None = None
    """Stream time of the first frame fed."""
    pending: PendingFrames | None = None
    sources: list[SourceRecord] = []
    gaps: list[GapRecord] = []

    @field_validator("last_time", "first_time")
    @classmethod
    def _time(cls, v: Any) -> Any:
        return _finite(v)

    @model_validator(mode="after")
    def _consistent(self) -> "StreamValues":
        n = self.frames_seen
        if self.first_time is not None and self.last_time is not None and self.first_time > self.last_time:
            raise ValueError(f"first_time = {self.first_time} is after last_time = {self.last_time}")
        for lv, c in (self.cursors or {}).items():
            if c > n:
                raise ValueError(f"cursors.{lv} = {c} is past frames_seen = {n}")
        p = self.pending
        if p is not None:
            if p.start + p.count != n:
                raise ValueError(f"pending frames {p.start}..{p.start + p.count - 1} do not end at frames_seen = {n}")
            if self.last_time is not None and p.times[-1] != self.last_time:
                raise ValueError("the last pending frame's time is not last_time")
        for s in self.sources:
            if s.frames[1] > n or s.frames[0] > s.frames[1]:
                raise ValueError(f"source {s.location!r} claims frames {list(s.frames)} of {n} seen")
        return self


def _format(exc: ValidationError, where: str, prefix: str = "") -> str:
    lines = []
    for err in exc.errors()[:8]:
        loc = ".".join(str(p) for p in err["loc"])
        got = repr(err.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        lines.append(f"{prefix}{loc}: {err['msg']} (got {got})" if loc else f"{prefix}{err['msg']}")
    return f"{where}: invalid stream state: " + "; ".join(lines)


def validate_values(values: Any, where: str) -> StreamValues:
    """Validate a stream's state values; :class:`StoreError` naming every bad field."""
    if not isinstance(values, dict):
        raise StoreError(f"{where}: invalid stream state: values must be an object")
    try:
        return StreamValues.model_validate(values)
    except ValidationError as exc:
        raise StoreError(_format(exc, where, "values.")) from None
