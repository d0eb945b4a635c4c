"""Feeding a session from a frame source, with provenance.

:func:`feed_from` (``Session.feed_from`` / ``Session.ingest``) reads a registered source chunk by chunk;
each chunk is one transaction. The source is recorded in the stream (kind, location, size and SHA-256
of a file or folder, fps, frames read, the stream frames and times it produced, whether it was read to
its end), so that

* a file whose content the stream already holds is refused (:class:`AlreadyIngested`) unless
  ``force=True``;
* a file whose ingest was interrupted resumes at the first frame it had not stored.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import InputError
from .frames import check_fps
from .registry import registry

if TYPE_CHECKING:  # pragma: no cover
    from .session import Session

#: files larger than this are hashed too, just more slowly (about 1 GB/s)
_HASH_CHUNK = 1 << 20


class AlreadyIngested(InputError):
    """The stream already holds this source's content (``record``: its source record)."""

    def __init__(self, message: str, record: dict[str, Any]):
        super().__init__(message)
        self.record = record


def content_hash(path: Path) -> tuple[int, str]:
    """``(bytes, sha256 hex)`` of a file, or of a folder's files (names and contents, in name order)."""
    h = hashlib.sha256()
    size = 0
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(f.name.encode("utf-8", "surrogateescape") + b"\0")
        try:
            with open(f, "rb") as fh:
                while True:
                    block = fh.read(_HASH_CHUNK)
                    if not block:
                        break
                    h.update(block)
                    size += len(block)
        except OSError as exc:
            raise InputError(f"cannot read {f}: {exc.strerror or exc}") from None
    return size, h.hexdigest()


def _describe(location: Any) -> str:
    if isinstance(location, (str, Path)):
        return str(location)
    return f"<{type(location).__name__}>"


def _accepts(cls: type, name: str) -> bool:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def feed_from(session: "Session", source: str, location: Any, fps: float | None, background: bool,
              options: dict[str, Any]) -> "int | LiveFeed":
    """See :meth:`mukv.Session.feed_from`."""
    session._check_writable()
    options = dict(options)
    force = options.pop("force", False)
    resize = options.pop("resize", None)
    upsample = options.pop("upsample", False)
    on_chunk = options.pop("on_chunk", None)
    if on_chunk is not None and not callable(on_chunk):
        raise InputError("on_chunk must be a callable (frames, blocks) -> None")
    for name, v in (("force", force), ("upsample", upsample), ("background", background)):
        if not isinstance(v, bool):
            raise InputError(f"{name} must be True or False; got {v!r}")
    if resize is not None and not isinstance(resize, bool):
        raise InputError(f"resize must be True, False or None; got {resize!r}")
    from .errors import ConfigError
    from .specs import settings_model, split, validate_settings

    name, given, _ = split(source, "source")
    if name is None:
        raise ConfigError(f"source must be a registered source name (or one with options); got {source!r}")
    clash = sorted(set(given) & set(options))
    if clash:
        raise ConfigError(f"source options {clash} are given twice (in the source spec and as keywords)")
    options = {**given, **options}
    source = name
    fps = check_fps(session.config.stream.fps if fps is None else fps)
    reg = registry()
    source_cls = reg.get("sources", name, field="source")
    chunk = options.setdefault("chunk", session.config.stream.encode_batch_frames)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= 1 << 16:
        raise InputError(f"chunk must be a number of frames from 1 to 65536; got {chunk!r}")
    label = _describe(location)
    if len(label) > 8192:
        raise InputError("the source location is too long (more than 8192 characters)")
    record: dict[str, Any] = {"kind": source, "location": label, "fps": fps, "complete": False,
                              "started": time.time(), "consumed": 0}
    resume = 0
    if isinstance(location, (str, Path)) and "://" not in str(location) and "\x00" not in str(location):
        p = Path(location)
        if p.is_file() or p.is_dir():
            record["size"], record["sha256"] = content_hash(p)
            resume = _match(session, record, force)
    if resume and _accepts(source_cls, "start"):
        options["start"] = resume
        skip = 0
    else:
        skip = resume
    if upsample and _accepts(source_cls, "upsample"):
        options["upsample"] = True
    elif upsample:
        raise InputError(f"source {source!r} does not upsample")
    if settings_model(source_cls) is not None:  # typed options: validated, naming the source and its package
        settings = validate_settings("sources", name, source_cls, options, "source", reg.entries["sources"][name])
        options = {} if settings is None else {k: getattr(settings, k) for k in type(settings).model_fields}
    try:
        src = source_cls(location, fps=fps, **options)
    except TypeError as exc:  # an option the source does not take
        raise InputError(f"source {source!r}: {exc}") from None
    record["total"] = getattr(src, "total", None) if isinstance(getattr(src, "total", None), int) else None
    if background:
        return LiveFeed(session, src, record, resize, skip, on_chunk)
    return _feed_source(session, src, record, resize, skip, on_chunk=on_chunk)


def _match(session: "Session", record: dict[str, Any], force: bool) -> int:
    """Frames of the source to skip: those an interrupted ingest of the same content stored. Raises
    :class:`AlreadyIngested` for content the stream holds in full (unless ``force``)."""
    if force:
        return 0
    for prev in reversed(session._stream.sources):
        if prev.get("sha256") != record["sha256"] or prev.get("kind") != record["kind"]:
            continue
        if prev.get("complete"):
            a, b = prev["frames"]
            raise AlreadyIngested(
                f"{record['location']}: the stream already holds this content (ingested as {prev['location']}, "
                f"stream frames {a}..{b - 1}); pass force=True (--force) to add it again", prev)
        if prev.get("fps") == record["fps"] and prev["frames"][1] == session._stream.frames_seen:
            record["id"] = prev.get("id")
            record["consumed"] = int(prev.get("consumed", 0))
            return record["consumed"]
    return 0


class _NoBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def _progress(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="frame")


def _feed_source(session: "Session", src: Any, record: dict[str, Any], resize: bool | None, skip: int,
                 stop: threading.Event | None = None, on_chunk: Any = None) -> int:
    total = record.get("total")
    bar = _progress(total, f"ingest {Path(record['location']).name}", session.progress)
    stored = 0
    offset: float | None = None
    fps = float(record["fps"])
    ended = True
    try:
        for frames, times in src.chunks():
            if skip:  # a source that cannot seek: drop what an earlier ingest stored
                drop = min(skip, int(frames.shape[0]))
                frames, times, skip = frames[drop:], times[drop:], skip - drop
                if frames.shape[0] == 0:
                    continue
            with session._lock:
                session._check_writable()
                checked = session._checked(frames, resize, pin=session._pins_frames())
                if tuple(checked.shape[1:3]) != tuple(frames.shape[1:3]):
                    record["resized_from"] = [int(frames.shape[1]), int(frames.shape[2])]
                times = torch.as_tensor(times, dtype=torch.float64)
                if offset is None:
                    last = session._stream.last_time
                    offset = (0.0 if last is None else last + 1.0 / fps) - float(times[0])
                blocks = session._feed_batch(checked, times + offset, source=record)
                stored += blocks
            bar.update(int(frames.shape[0]))
            if on_chunk is not None:
                on_chunk(int(frames.shape[0]), blocks)
            if stop is not None and stop.is_set():
                ended = False
                break
        if ended and record.get("id") is not None:
            with session._lock:
                session._stream.finish_source(record)
    finally:
        bar.close()
    return stored


class LiveFeed:
    """A frame source feeding a session from a background thread.

    Attributes:
        blocks: blocks stored so far (updated when the feed ends).
        error: the exception that ended the feed, if any.
    """

    def __init__(self, session: "Session", source: Any, record: dict[str, Any], resize: bool | None, skip: int,
                 on_chunk: Any = None):
        from .session import Session

        if not isinstance(session, Session) or not isinstance(record, dict) or "location" not in record:
            raise InputError("LiveFeed is made by Session.feed_from(..., background=True); use that")
        self.session, self.source, self.label = session, source, record["location"]
        self.blocks = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(record, resize, skip, on_chunk),
                                        name=f"mukv-feed-{os.path.basename(self.label)[:40]}", daemon=True)
        self._thread.start()

    def _run(self, record: dict[str, Any], resize: bool | None, skip: int, on_chunk: Any) -> None:
        try:
            self.blocks = _feed_source(self.session, self.source, record, resize, skip, self._stop, on_chunk)
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
