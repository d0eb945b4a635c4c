"""Request and response bodies of the HTTP API, in one place (the OpenAPI schema at ``/docs``).

Times: ``t_start``/``t_end`` are stream seconds; ``wall_start``/``wall_end`` ISO 8601 times
when the stream has a wall-clock origin (else ``null``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_STRICT = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    """Every error: a status code and one line naming the problem."""

    error: str
    """The error's kind (``InputError``, ``StoreError``, ``NotFound``, ...)."""
    detail: str
    """What was wrong, in words."""


class SourceSpec(BaseModel):
    """Where a stream pulls its frames from (one of the registered frame sources)."""

    model_config = _STRICT

    kind: Literal["video", "images", "stream"] | None = None
    """``video`` (a file), ``images`` (a folder), ``stream`` (a camera or an RTSP/HTTP URL);
    default: guessed from ``location`` (a URL or device: stream, a folder: images, else video)."""
    location: str = Field(min_length=1, max_length=4096)
    """A path on the server's machine, a URL (``rtsp://``, ``http://``...), or a device."""
    fps: float | None = Field(default=None, gt=0, le=1000)
    """Frames sampled per second (default: the stream's configuration, 0.5)."""
    live: bool | None = None
    """Live sources drop frames that wait longer than the server's ``max_lag_s``; others are read
    as fast as ingest takes them. Default: live for ``stream``, else not."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Options of the source (e.g. ``{"format": "v4l2"}``, ``{"options": {"rtsp_transport": "tcp"}}``)."""


class StreamCreate(BaseModel):
    """``POST /v1/streams``."""

    model_config = _STRICT

    id: str = Field(min_length=1, max_length=128)
    """Stream id: 1-128 characters of ``[A-Za-z0-9_.-]``, starting with a letter, digit or ``_``."""
    source: SourceSpec | None = None
    """Pull frames from here (else frames are pushed to ``/v1/streams/{id}/frames``)."""
    fps: float | None = Field(default=None, gt=0, le=1000)
    """Frames per second of pushed frames without timestamps (default: the configuration's)."""


class Gap(BaseModel):
    """Frames dropped because ingest fell behind, recorded in the stream."""

    t_start: float
    t_end: float
    frames: int


class StreamStatus(BaseModel):
    """``GET /v1/streams/{id}``: a stream as this server sees it."""

    id: str
    role: Literal["writer", "reader", "closed"]
    """``writer``: this server ingests the stream; ``reader``: another server writes it (this
    one answers questions about it); ``closed``: stopped."""
    state: str
    """``idle``, ``ingesting``, ``pulling`` (a source), ``source ended``, ``failed: ...``."""
    frames: int
    """Frames stored."""
    received: int
    """Frames received by this server (pushed or pulled) since it started."""
    dropped: int
    """Frames this server dropped (waited longer than ``max_lag_s``, or the queue was full)."""
    queued: int
    """Frames waiting for ingest."""
    lag_s: float
    """Seconds the oldest waiting frame has waited (0: nothing waits)."""
    t_start: float | None
    t_end: float | None
    wall_start: str | None = None
    wall_end: str | None = None
    bytes: int
    """KV bytes stored (all levels)."""
    hot_bytes: int
    """Bytes of the stream's hot tier in use."""
    disk_bytes: int
    """KV bytes on disk."""
    gaps: list[Gap]
    source: str | None = None
    """The source pulled, if any."""
    owner: str | None = None
    """For a reader: the server writing the stream (object stores)."""
    error: str | None = None
    """The last ingest or source error, if any."""


class StreamList(BaseModel):
    """``GET /v1/streams``."""

    streams: list[StreamStatus]


class PushResult(BaseModel):
    """``POST /v1/streams/{id}/frames``: what happened to the pushed frames."""

    accepted: int
    """Frames queued for ingest."""
    queued: int
    """Frames of the stream waiting now."""
    dropped: int
    """Frames of the stream dropped so far (this push may have made room by dropping older ones)."""
    t_start: float
    t_end: float
    """Stream times given to the pushed frames."""


class AskRequest(BaseModel):
    """``POST /v1/streams/{id}/ask``."""

    model_config = _STRICT

    question: str = Field(min_length=1)
    since: float | str | None = None
    """Only moments from this stream time on: seconds, or an ISO 8601 time for a stream with a
    wall-clock origin."""
    until: float | str | None = None
    """Only moments up to this stream time."""
    max_new_tokens: int | None = Field(default=None, ge=1, le=4096)
    """Answer length budget (default: the stream's configuration)."""
    top_k: dict[str, int] | None = None
    """Blocks per level, overriding the configuration (``{"frame": 16}``)."""
    stream: bool = False
    """Stream the answer as server-sent events: ``token`` events (``{"text": piece}``), then one
    ``answer`` event (the :class:`AnswerBody`), or an ``error`` event (:class:`ErrorBody`)."""

    @field_validator("since", "until")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be a finite number of seconds or an ISO 8601 time")
        return v


class Block(BaseModel):
    """A retrieved block: one moment the answer used."""

    level: str
    block_id: int
    score: float
    frame_start: int
    frame_end: int
    """One past the block's last frame."""
    t_start: float
    t_end: float
    wall_start: str | None = None
    wall_end: str | None = None
    tokens: int


class AnswerBody(BaseModel):
    """An answer: the fields of :class:`mukv.blocks.Answer`."""

    question: str
    text: str
    blocks: list[Block]
    kv_tokens: int
    timings: dict[str, float]
    """Seconds per stage (``query``, ``retrieve``, ``page_in``, ``first_token``, ``total``, and
    ``wait``: time the question waited for the engine)."""
    notes: list[str]
    frames: int = 0
    """Frames the stream held when the question was answered (the answer saw no later frame)."""
    t_end: float | None = None
    """Stream time of the newest frame the stream held then."""


class Health(BaseModel):
    """``GET /healthz``."""

    status: Literal["ok", "starting", "stopping"]
    model: str | None
    streams: int
    server: str
    """This server's name in leases (``host:pid``)."""
