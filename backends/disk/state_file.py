"""A stream's state file (``streams/<id>.json``): the commit point of every transaction.

::

    {"format_version": 2, "stream_id": "cam1", "txn": 41,
     "counts": {"patch": 480, "frame": 120, "segment": 30},
     "levels": {"frame": {"tokens": 19, "block_shape": [Y, 2, H, K, D]}, ...},
     "values": {"session": {...the stream's contract...}, "frames_seen": 120, "cursors": {...},
                "last_time": 238.0, "pending": {...}, "sources": [...], "gaps": [...]},
     "updated": 1764950000.0}

The writer writes a transaction's KV, then its index rows (each row carries the transaction's number
``txn``), then its files, then this file (one atomic replace). So a block counts as stored exactly when
this file counts it; index rows with a larger ``txn`` are what a killed writer left, and rows with a
``txn`` this file has committed but does not count mean the file disagrees with the data.

:func:`read_state` validates every field (types, ranges, consistency with the store's KV layout and
with the stream id the file is named after) before anything trusts it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError, model_validator

from mukv.errors import StoreError
from mukv.state import StreamValues, validate_values

from .files import FORMAT_VERSION, Files

Count = Annotated[StrictInt, Field(ge=0, le=1 << 62)]
Level = Annotated[StrictStr, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


class LevelInfo(BaseModel):
    """Shape of a level's stored blocks."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    tokens: Annotated[StrictInt, Field(ge=1, le=1 << 24)]
    """K, tokens kept per block."""
    block_shape: Annotated[list[Annotated[StrictInt, Field(ge=1, le=1 << 24)]], Field(min_length=5, max_length=5)]
    """``[Y, 2, H, K, D]`` of one block's KV."""

    @model_validator(mode="after")
    def _k(self) -> "LevelInfo":
        if self.block_shape[3] != self.tokens or self.block_shape[1] != 2:
            raise ValueError(f"block_shape {self.block_shape} does not hold {self.tokens} tokens of keys and values")
        return self


class StateFile(BaseModel):
    """The whole state file, validated."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    format_version: Annotated[StrictInt, Field(ge=1, le=FORMAT_VERSION)] = 1
    stream_id: StrictStr | None = None
    txn: Count = 0
    """Number of the last committed transaction (0 for streams written before transactions were numbered)."""
    counts: dict[Level, Count] = {}
    levels: dict[Level, LevelInfo] = {}
    values: dict[str, Any] = {}
    updated: StrictFloat | StrictInt | None = None

    @model_validator(mode="after")
    def _levels(self) -> "StateFile":
        for lv, n in self.counts.items():
            if n and lv not in self.levels:
                raise ValueError(f"level {lv!r} counts {n} blocks but has no block shape")
        return self


def validate_state(raw: Any, where: str, stream_id: str, layout: dict[str, Any] | None = None
                   ) -> tuple[StateFile, StreamValues]:
    """Validate a parsed state file; :class:`StoreError` naming the first bad fields."""
    if not isinstance(raw, dict):
        raise StoreError(f"{where}: invalid stream state: not a JSON object")
    try:
        state = StateFile.model_validate(raw)
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:8]:
            loc = ".".join(str(p) for p in err["loc"])
            got = repr(err.get("input"))
            parts.append(f"{loc}: {err['msg']} (got {got if len(got) <= 60 else got[:57] + '...'})" if loc
                         else err["msg"])
        raise StoreError(f"{where}: invalid stream state: " + "; ".join(parts)) from None
    if state.stream_id is not None and state.stream_id != stream_id:
        raise StoreError(f"{where}: invalid stream state: it belongs to stream {state.stream_id!r}, not {stream_id!r}")
    if layout is not None:
        for lv, info in state.levels.items():
            y, two, h, k, d = info.block_shape
            expect = (layout["num_layers"], 2, layout["num_kv_heads"], k, layout["head_dim"])
            if (y, two, h, k, d) != expect:
                raise StoreError(f"{where}: invalid stream state: level {lv!r} block shape {info.block_shape} does "
                                 f"not match the store's KV layout {list(expect)}")
    return state, validate_values(state.values, where)


def read_state(files: Files, stream_id: str, layout: dict[str, Any] | None = None
               ) -> tuple[StateFile, StreamValues] | None:
    """The validated state of ``stream_id`` (``None`` if the stream has no state file)."""
    rel = f"streams/{stream_id}.json"
    raw = files.read_json(rel)
    if raw is None:
        return None
    return validate_state(raw, files.uri(rel), stream_id, layout)


def stored_pending_problem(files: Files, stream_id: str, pending: Any) -> str | None:
    """What is wrong with the pending frames file that ``pending`` (a
    :class:`~mukv.state.PendingFrames` record of the stream's state) names in the stream's folder, or
    ``None``: missing, unreadable, of the wrong size or failing its CRC-32
    (:func:`mukv.stream.pending_file_problem`). Used by ``verify_store`` and ``mukv repair``."""
    from mukv.stream import pending_file_problem

    try:
        data = files.read(f"streams/{stream_id}/{pending.file}")
    except StoreError as exc:
        return f"the pending frames file {pending.file} cannot be read ({exc})"
    return pending_file_problem(data, pending)


class LayoutRecord(BaseModel):
    """The KV layout a store was created for (manifest field ``layout``)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    num_layers: Annotated[StrictInt, Field(ge=1, le=4096)]
    num_kv_heads: Annotated[StrictInt, Field(ge=1, le=4096)]
    head_dim: Annotated[StrictInt, Field(ge=1, le=65536)]
    dtype: StrictStr = Field(pattern=r"^(float32|float16|bfloat16)$")
    model_id: StrictStr | None = None


class Manifest(BaseModel):
    """``mukv.json``: what the store is."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    format: StrictStr
    format_version: Annotated[StrictInt, Field(ge=1)]
    layout: LayoutRecord
    created: StrictFloat | StrictInt | None = None


def validate_manifest(raw: Any, where: str, format_name: str) -> Manifest:
    """Validate a parsed manifest: a mukv store of a format version this mukv reads, with a valid layout."""
    if not isinstance(raw, dict):
        raise StoreError(f"{where}: not a mukv store (the manifest is not a JSON object)")
    if raw.get("format") != format_name:
        raise StoreError(f"{where}: not a mukv store (format {raw.get('format')!r})")
    version = raw.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise StoreError(f"{where}: store format {version} is newer than this mukv ({FORMAT_VERSION}); upgrade mukv")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        got = repr(err.get("input"))
        raise StoreError(f"{where}: invalid manifest: {loc}: {err['msg']} "
                         f"(got {got if len(got) <= 60 else got[:57] + '...'})") from None
