"""Typed configuration of ``mukv serve``: every field documented, unknown fields refused.

Built by the CLI from its flags (``mukv serve --help``) or by an application::

    from mukv.serve import ServeConfig, create_app
    app = create_app(ServeConfig(store="/data/cams.mukv", max_lag_s=5))
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError

#: Environment variable holding the bearer token (``--token`` wins over it).
TOKEN_ENV = "MUKV_SERVE_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServeConfig(BaseModel):
    """What a ``mukv serve`` process serves and its limits."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    store: str = Field(min_length=1)
    """The store: a local folder (created on first use) or an ``s3://bucket/prefix`` URI."""

    host: str = "127.0.0.1"
    """Address to bind. Anything but a loopback address needs :attr:`token`."""

    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port (0: any free port)."""

    model: str | None = None
    """A model preset or checkpoint directory. ``None``: the model the store's streams were
    written with, or ``mukv-tiny`` for a new store."""

    config: dict[str, Any] | None = None
    """Configuration fields (as ``mukv.Session(config=...)``) of streams this server creates;
    existing streams keep their own."""

    device: str | None = None
    """torch device of the model (default: CUDA if available)."""

    accelerations: tuple[str, ...] = ()
    """Accelerated forwards applied to the model at start (names of :data:`mukv.accel.KNOWN`, see
    :func:`mukv.accel.accelerate`), e.g. ``("fused_vision", "fused_llm", "fused_norms", "fused_residual",
    "fused_rope", "graph_prefill")``, the fastest set measured at 0.5B on an H100 (docs/gpu-results.md). They change the
    stored KV within floating-point differences; FP8, ``fused_mlp``, ``fused_rope`` and ``graph_prefill``
    need a CUDA GPU (the
    server then refuses to start elsewhere). Default: none, the plain path."""

    @field_validator("accelerations", mode="before")
    @classmethod
    def _known_accelerations(cls, value: Any) -> Any:
        from ..accel import acceleration_names

        if isinstance(value, str):  # the CLI's comma-separated list
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError("expected a list of acceleration names")
        try:
            return tuple(acceleration_names(value))
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    backend_options: dict[str, Any] = Field(default_factory=dict)
    """Options of the ``lancedb`` backend for every stream (e.g. ``storage_options`` of an
    ``s3://`` store, ``hot_bytes``, ``lease_ttl``)."""

    token: str | None = Field(default=None, min_length=16, max_length=512)
    """Bearer token every request but ``/healthz`` must carry (``Authorization: Bearer ...``).
    Default: ``$MUKV_SERVE_TOKEN``; required unless :attr:`host` is a loopback address."""

    max_lag_s: float = Field(default=10.0, gt=0.0, le=86400.0)
    """Seconds a pushed frame may wait for ingest. Older waiting frames are dropped and recorded
    as a gap of their stream: a stream that cannot keep up loses frames, never memory."""

    max_queue_bytes: int = Field(default=64 << 20, ge=1 << 16)
    """Bytes of frames one stream's queue may hold; past it the oldest waiting frames are dropped
    (recorded as a gap)."""

    max_batch_frames: int = Field(default=16, ge=1, le=4096)
    """Frames of one stream in one ingest step of the engine loop (a step batches the frames of many
    streams; this keeps one stream with a backlog from filling it)."""

    batch_frames: int = Field(default=256, ge=1, le=65536)
    """Frames of all streams in one ingest step: a step this full runs at once. Questions are answered
    between steps (a question on a stream the step does not hold also between the step's stages), so
    smaller steps answer sooner under load; larger ones use the GPU better."""

    encode_batch_frames: int = Field(default=64, ge=1, le=65536)
    """Frames of one vision-tower batch inside an ingest step (frames of several streams together).
    Each such batch ends a stage of the step, where waiting questions are answered
    (``answer_during_steps``): smaller ones let questions in sooner."""

    answer_during_steps: bool = True
    """Answer waiting questions at an ingest step's stage boundaries (after each vision-tower batch,
    after each level kind's forwards) rather than only between steps. A question on a stream of the
    running step first takes that stream out of the step (rolled back; its frames go back in front
    of its queue for the next step) and is answered on what the stream last committed. Off: every
    question waits for the running step's commit."""

    latency_target_s: float = Field(default=5.0, gt=0.0, le=86400.0)
    """Seconds from a frame's arrival to its blocks being searchable that the engine aims at: a step
    that is not full runs when its oldest frame would otherwise miss this (by the step time measured
    on the steps before). At most half of ``max_lag_s`` is used (frames waiting longer than ``max_lag_s``
    are dropped)."""

    questions_per_step: int = Field(default=4, ge=1, le=1024)
    """Questions answered in a row, at most, while frames wait: then one ingest step runs. Questions
    come first, but a stream of questions faster than the engine answers them cannot starve ingest."""

    max_waiting_questions: int = Field(default=256, ge=1)
    """Questions that may wait for the engine; more are refused (503) until some are answered."""

    max_upload_bytes: int = Field(default=64 << 20, ge=1024)
    """Largest request body accepted (frames of one push, a JSON body)."""

    max_frame_pixels: int = Field(default=4096 * 4096, ge=4)
    """Largest frame accepted (height x width); larger images are refused before decoding."""

    max_frames_per_push: int = Field(default=1024, ge=1)
    """Most frames one push may carry."""

    max_streams: int = Field(default=1024, ge=1)
    """Most streams this server holds."""

    max_question_chars: int = Field(default=4000, ge=1)
    """Longest question accepted (characters)."""

    thumbnails: int = Field(default=96, ge=0, le=1024)
    """Long side in pixels of the JPEG thumbnail kept for every stored frame (0: none)."""

    drain_s: float = Field(default=30.0, ge=0.0, le=3600.0)
    """On SIGTERM/SIGINT: seconds to go on ingesting frames already received before the streams are
    closed (what is left is recorded as a gap). Everything ingested is committed either way."""

    refresh_s: float = Field(default=2.0, gt=0.0, le=3600.0)
    """Seconds between looks at the store: streams other servers write are refreshed, new
    streams are found, and expired leases of dead servers are taken over."""

    def scheduler_config(self) -> Any:
        """The batching configuration of the engine's ingest steps (:class:`mukv.scheduler.SchedulerConfig`)."""
        from ..scheduler import SchedulerConfig

        target = min(self.latency_target_s, self.max_lag_s / 2)
        return SchedulerConfig(latency_target_s=target, max_batch_frames=self.batch_frames,
                               max_stream_frames=self.max_batch_frames,
                               encode_batch_frames=self.encode_batch_frames,
                               lend_between_stages=self.answer_during_steps,
                               withdraw_asked=self.answer_during_steps)

    @model_validator(mode="after")
    def _token_for_public_address(self) -> "ServeConfig":
        if self.token is None and not is_loopback(self.host):
            raise ValueError(f"binding {self.host!r} (not a loopback address) needs a bearer token: "
                             f"--token or ${TOKEN_ENV} (at least 16 characters)")
        return self

    @classmethod
    def build(cls, **fields: Any) -> "ServeConfig":
        """Validate ``fields`` (the token defaults to ``$MUKV_SERVE_TOKEN``) or raise :class:`ConfigError`."""
        if fields.get("token") is None and os.environ.get(TOKEN_ENV):
            fields["token"] = os.environ[TOKEN_ENV]
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                shown = "" if not loc or loc == "token" else f" (got {_short(err.get('input'))})"
                lines.append(f"{loc or 'serve'}: {msg}{shown}")  # never echo a token
            raise ConfigError("invalid serve option: " + "; ".join(lines)) from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
