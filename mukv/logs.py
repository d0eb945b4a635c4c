"""The question log: every question asked of a stream, with its answer, kept in the store.

Opt-in (``mukv.Session(..., log_questions=True)``, ``mukv ask --log-questions``, or
``question_log = true`` in the user configuration). Each answer becomes one small
JSON object, written whole (a local temp file + rename, or one object PUT)::

    <store>/logs/<stream>/<UTC time>-<random>.json     one record
    <store>/logs/<stream>/configs/<hash>.json          each configuration a record names

A record holds the question, the answer, the retrieved blocks (level, id, score,
frame and time span, tokens), the timings per stage, the KV tokens at answer time,
the model, the stream time when it was asked, the wall-clock time, and the hash of
the session's configuration (the configuration itself is kept once per hash).

No lock is taken: every record is its own object with a unique name, so a session
that opened the stream read-only (another process writes it) logs too, on a local
disk or on ``s3://`` alike, and records from before a reopen stay. ``mukv logs
STORE`` reads them (:meth:`QuestionLog.records`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import logging
import os
import time
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, Iterable

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from .errors import ConfigError, InputError, StoreError
from .state import FiniteNumber

log = logging.getLogger(__name__)

#: Folder of the question logs in a store.
LOG_DIR = "logs"
#: Version of the record format.
RECORD_VERSION = 1


class _Block(BaseModel):
    """A retrieved block of a record, as far as :func:`format_record` reads it."""

    model_config = ConfigDict(extra="allow")
    level: StrictStr
    block_id: StrictInt
    t_start: FiniteNumber
    score: FiniteNumber


class _Record(BaseModel):
    """A question-log record, as far as the filters and :func:`format_record` read it (fields it does not
    know are kept)."""

    model_config = ConfigDict(extra="allow")
    question: StrictStr
    answer: StrictStr
    unix_time: FiniteNumber
    stream_time: FiniteNumber = 0.0
    time: StrictStr = "?"
    stream_id: StrictStr = "?"
    model: StrictStr = "?"
    config_hash: StrictStr = "?"
    kv_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    blocks: list[_Block] = []
    timings: dict[StrictStr, FiniteNumber] = {}
    notes: list[StrictStr] = []


def check_record(rec: Any) -> dict[str, Any]:
    """``rec`` if it is a question-log record that :func:`format_record` and the filters can read
    (fields of the right types, times and scores finite numbers; fields it does not know are kept);
    :class:`InputError` naming the first wrong field otherwise."""
    if not isinstance(rec, dict):
        raise InputError(f"a question-log record must be a JSON object; got {type(rec).__name__}")
    try:
        _Record.model_validate(rec)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "record"
        raise InputError(f"not a question-log record: {where}: {err.get('msg', 'invalid')}"[:300]) from None
    return rec


class QuestionLog:
    """The question log of one stream of a store (a local directory or an ``s3://`` URI).

    Args:
        root: the store (or any directory or URI to keep the log in).
        stream_id: the stream.
        storage_options: object-store credentials and endpoint (as the disk backend's).

    Raises:
        StoreError: an invalid stream id, or an object store that cannot be opened.
    """

    def __init__(self, root: str, stream_id: str = "default", storage_options: dict[str, Any] | None = None):
        from .backends.disk.files import Files, check_stream_id

        if not isinstance(root, (str, os.PathLike)):
            raise ConfigError(f"QuestionLog: root must be the store's path or URL; got {type(root).__name__}")
        if storage_options is not None and not isinstance(storage_options, dict):
            raise ConfigError(f"QuestionLog: storage_options must be a dict; got {type(storage_options).__name__}")
        self.stream_id = check_stream_id(stream_id)
        self.files = Files(str(root), storage_options=storage_options)
        self.folder = f"{LOG_DIR}/{self.stream_id}"
        self._configs_written: set[str] = set()

    # -- writing ------------------------------------------------------------------------
    def record(self, answer: Any, config: Any, model: str = "", stream_time: float = 0.0) -> str | None:
        """Keep one answered question; returns the record's id.

        A record that cannot be written does not lose the answer: the failure is
        logged as a warning and added to ``answer.notes``, and ``None`` is returned.
        """
        from . import __version__
        from .specs import config_hash, json_safe

        now = time.time()
        stamp = datetime.fromtimestamp(now, timezone.utc)
        rid = f"{stamp.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}"
        chash = config_hash(config)
        record = {
            "version": RECORD_VERSION,
            "id": rid,
            "time": stamp.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "unix_time": now,
            "stream_id": self.stream_id,
            "stream_time": float(stream_time),
            "model": model,
            "question": answer.question,
            "answer": answer.text,
            "kv_tokens": int(answer.kv_tokens),
            "blocks": [dataclasses.asdict(b) for b in answer.blocks],
            "timings": {k: float(v) for k, v in answer.timings.items()},
            "notes": list(answer.notes),
            "config_hash": chash,
            "mukv_version": __version__,
        }
        try:
            if chash not in self._configs_written:
                rel = f"{self.folder}/configs/{chash}.json"
                if self.files.read(rel) is None:
                    self.files.write_json(rel, {"config_hash": chash, "config": json_safe(config.model_dump())})
                self._configs_written.add(chash)
            self.files.write_json(f"{self.folder}/{rid}.json", record)
        except (StoreError, OSError) as exc:
            message = f"question log: the record could not be written ({exc})"
            log.warning("%s", message)
            answer.notes.append(message)
            return None
        log.debug("question log: wrote %s/%s.json", self.folder, rid)
        return rid

    # -- reading ------------------------------------------------------------------------
    def ids(self) -> list[str]:
        """Record ids, oldest first."""
        return sorted(n[:-5] for n in self.files.listing(self.folder)
                      if n.endswith(".json") and not n.startswith("."))

    def read(self, rid: str) -> dict[str, Any] | None:
        """One record (``None``: missing or unreadable, with a warning)."""
        try:
            value = self.files.read_json(f"{self.folder}/{rid}.json")
            return None if value is None else check_record(value)
        except (StoreError, InputError) as exc:
            log.warning("question log: skipping %s (%s)", rid, exc)
            return None

    def config(self, chash: str) -> dict[str, Any] | None:
        """The configuration a record's ``config_hash`` names (``None`` if not kept)."""
        try:
            value = self.files.read_json(f"{self.folder}/configs/{chash}.json")
        except StoreError:
            return None
        return None if value is None else value.get("config")

    def records(self, count: int | None = None, query: str | None = None, model: str | None = None,
                config_hash: str | None = None, since: float | None = None, until: float | None = None,
                ) -> list[dict[str, Any]]:
        """Records matching every filter given, oldest first; the newest ``count`` of them
        (``None`` or 0: all).

        Args:
            count: how many of the newest matching records.
            query: a text the question or the answer contains (case-insensitive).
            model: the model's name.
            config_hash: a prefix of the configuration hash.
            since, until: wall-clock time bounds (Unix seconds, inclusive).

        Raises:
            InputError: a negative count.
        """
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
            raise InputError(f"count must be a non-negative integer; got {count!r}")
        q = query.lower() if query else None
        picked: list[dict[str, Any]] = []
        for rid in reversed(self.ids()):  # newest first, so -n stops early
            rec = self.read(rid)
            if not isinstance(rec, dict) or not _matches(rec, q, model, config_hash, since, until):
                continue
            picked.append(rec)
            if count and len(picked) >= count:
                break
        return picked[::-1]


def _matches(rec: dict[str, Any], q: str | None, model: str | None, chash: str | None, since: float | None,
             until: float | None) -> bool:
    if q is not None and q not in str(rec.get("question", "")).lower() and q not in str(rec.get("answer", "")).lower():
        return False
    if model is not None and rec.get("model") != model:
        return False
    if chash is not None and not str(rec.get("config_hash", "")).startswith(chash):
        return False
    t = rec.get("unix_time")
    if not isinstance(t, (int, float)):
        return since is None and until is None
    if since is not None and t < since:
        return False
    if until is not None and t > until:
        return False
    return True


def format_record(rec: dict[str, Any], per_level: int = 3) -> str:
    """A record as text: time, model and configuration, question, answer, blocks, timings.

    Raises:
        InputError: ``rec`` is not a record (:func:`check_record`).
    """
    from .plots import format_time

    check_record(rec)

    lines = [f"## {rec.get('time', '?')}  (stream {rec.get('stream_id', '?')!r} at "
             f"{format_time(float(rec.get('stream_time') or 0))}, model {rec.get('model', '?')}, "
             f"config {rec.get('config_hash', '?')})", "",
             f"Q: {rec.get('question', '')}", f"A: {rec.get('answer', '') or '(empty)'}"]
    blocks = [b for b in rec.get("blocks", []) if isinstance(b, dict)]
    counts: dict[str, int] = {}
    for b in blocks:
        counts[str(b.get("level"))] = counts.get(str(b.get("level")), 0) + 1
    if blocks:
        lines.append("retrieved: " + ", ".join(f"{n} {lv}" for lv, n in counts.items())
                     + f" blocks; {rec.get('kv_tokens', 0):,} KV tokens")
        for level in counts:
            best = sorted((b for b in blocks if str(b.get("level")) == level), key=lambda b: -float(b.get("score", 0)))
            shown = "  ".join(f"#{b.get('block_id')} {format_time(float(b.get('t_start', 0)))} "
                              f"({float(b.get('score', 0)):.3f})" for b in best[:per_level])
            lines.append(f"  {level:<8} best: {shown}")
    t = rec.get("timings") or {}
    keys = [k for k in ("query", "retrieve", "page_in", "first_token", "total") if k in t]
    if keys:
        lines.append("timings: " + ", ".join(f"{k} {float(t[k]) * 1000:.1f} ms" for k in keys))
    for note in rec.get("notes", []) or []:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def parse_time(text: str, flag: str = "time") -> float:
    """Unix seconds of an ISO 8601 date or time (``2026-11-21``, ``2026-11-21T10:00``; UTC unless it
    says otherwise), or of a number of Unix seconds.

    Raises:
        InputError: neither.
    """
    if not isinstance(text, str):
        raise InputError(f"{flag}: expected an ISO date/time or Unix seconds as text; got {type(text).__name__}")
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise InputError(f"{flag}: Unix seconds must be a finite number; got {text!r}")
        return value
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"{flag}: expected an ISO date/time (e.g. 2026-11-21T10:00) or Unix seconds; "
                         f"got {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def dumps(records: Iterable[dict[str, Any]]) -> str:
    """Records as a JSON array."""
    return json.dumps(list(records), indent=1)
