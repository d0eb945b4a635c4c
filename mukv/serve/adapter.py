"""The one place where the service meets :class:`mukv.Session` and the store.

Everything the engine needs from mukv's public API goes through these functions: opening a
stream's writer (or a reader, when another server writes it), feeding frames as one transaction,
recording dropped frames as gaps, asking over a time window with streamed tokens, thumbnails, and
the store's streams (:mod:`mukv.streams`). The engine never touches a session's internals.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np

from ..errors import MukvError, StoreError

BACKEND = "lancedb"


class NotSupported(MukvError):
    """A request this mukv cannot serve (HTTP 501)."""


# ------------------------------------------------------------------ opening sessions
def open_writer(store: str, stream_id: str, model: Any, backend_options: dict[str, Any],
                config: dict[str, Any] | None = None, thumbnails: int = 0, create: bool = False):
    """The stream's writer session, or a read-only one when another process writes it.

    Args:
        model: a loaded :class:`~mukv.interfaces.ModelAdapter` (shared by every stream).
        thumbnails: long side of the thumbnails a new stream keeps (0: none).
        create: create the stream if it is not in the store (else :class:`StoreError`).
    """
    from ..session import Session

    kwargs: dict[str, Any] = {"backend": BACKEND, "stream_id": stream_id, "model": model,
                              "backend_options": dict(backend_options)}
    if exists(store, stream_id, backend_options):
        try:
            return Session.open(store, **kwargs)
        except StoreError as exc:
            if "being written" not in str(exc) and "lease" not in str(exc):
                raise
            return open_reader(store, stream_id, model, backend_options)
    if not create:
        raise StoreError(f"no stream {stream_id!r} in {store}")
    return Session(path=store, config=config, thumbnails=thumbnails or None, **kwargs)


def open_reader(store: str, stream_id: str, model: Any, backend_options: dict[str, Any]):
    """A read-only session over a stream another process writes (never blocks that writer)."""
    from ..session import Session

    return Session.open(store, stream_id=stream_id, backend=BACKEND, model=model, read_only=True,
                        backend_options=dict(backend_options))


def is_writer(session: Any) -> bool:
    """Whether the session may feed frames."""
    return not session.read_only


def writer_of(session: Any) -> str | None:
    """For a reader over an object store: the server holding the stream's lease."""
    files = getattr(session.backend, "files", None)
    if files is None or not files.remote:
        return None
    try:
        state = files.read_json(f"streams/{session.stream_id}.json") or {}
    except StoreError:
        return None
    return (state.get("lease") or {}).get("owner")


def lease_lost(session: Any) -> bool:
    """Whether a writer lost its stream to another server (it must become a reader)."""
    lease = getattr(session.backend, "lease", None)
    return lease is not None and lease.lost is not None


def refresh(session: Any) -> None:
    """A reader catches up with what the writer has committed."""
    session.refresh()


# ------------------------------------------------------------------ feeding
def feed(session: Any, frames: np.ndarray, timestamps: np.ndarray | None, thumbnails: int = 0) -> int:
    """Feed ``uint8 [n, H, W, 3]`` frames as one transaction (with their thumbnails, when the stream
    keeps them)."""
    return session.feed(frames, timestamps=timestamps)


def feed_item(session: Any, frames: np.ndarray, timestamps: np.ndarray | None) -> Any:
    """``uint8 [n, H, W, 3]`` frames of a stream validated (as :func:`feed` would) for a batch over
    several streams (:class:`mukv.batching.FeedItem`; thumbnails kept when the stream keeps them)."""
    from ..batching import FeedItem

    return FeedItem.of(session, frames, timestamps)


def record_gap(session: Any, t_start: float, t_end: float, frames: int) -> None:
    """Record dropped frames in the stream (committed at once)."""
    session.record_gap(t_start, t_end, frames)


def gaps(session: Any) -> list[dict[str, Any]]:
    """Gaps recorded in the stream."""
    return list(session.stats()["gaps"])


def frames_stored(session: Any) -> int:
    return int(session.stats()["frames"])


def last_time(session: Any) -> float | None:
    t = session.stats().get("last_time")
    return None if t is None else float(t)


def stream_numbers(session: Any) -> dict[str, Any]:
    """Frames, time span and bytes of a stream (hot tier and disk)."""
    from ..clock import iso

    st = session.stats()
    tiers = session.backend.tier_stats() if hasattr(session.backend, "tier_stats") else {}
    first = session._stream.first_time
    origin = st.get("wall_origin")
    return {
        "frames": int(st["frames"]),
        "t_start": first,
        "t_end": st.get("last_time"),
        "wall_start": iso(first, origin),
        "wall_end": iso(st.get("last_time"), origin),
        "bytes": int(st.get("bytes", 0)),
        "hot_bytes": int(tiers.get("hot", {}).get("used_bytes", 0)),
        "disk_bytes": int(tiers.get("disk", {}).get("kv_bytes", 0)),
    }


# ------------------------------------------------------------------ asking
def ask(session: Any, question: str, since: Any = None, until: Any = None, max_new_tokens: int | None = None,
        top_k: dict[str, int] | None = None, on_token: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Answer a question; returns the answer as a JSON-ready dict (see ``protocol.AnswerBody``)."""
    answer = session.ask(question, top_k=top_k, max_new_tokens=max_new_tokens, since=since, until=until,
                         on_token=on_token)
    return answer_dict(answer)


def answer_dict(answer: Any) -> dict[str, Any]:
    blocks = []
    for b in answer.blocks:
        blocks.append({"level": b.level, "block_id": b.block_id, "score": b.score, "frame_start": b.frame_start,
                       "frame_end": b.frame_end, "t_start": b.t_start, "t_end": b.t_end,
                       "wall_start": b.wall_start, "wall_end": b.wall_end, "tokens": b.tokens})
    return {"question": answer.question, "text": answer.text, "blocks": blocks, "kv_tokens": answer.kv_tokens,
            "timings": dict(answer.timings), "notes": list(answer.notes)}


# ------------------------------------------------------------------ thumbnails
def thumbnail(session: Any, index: int) -> bytes:
    """The JPEG thumbnail of stored frame ``index``.

    Raises:
        InputError: no such frame.
        StoreError: the stream keeps no thumbnails.
    """
    return session.thumbnail(index)


# ------------------------------------------------------------------ the store
def _files(store: str, backend_options: dict[str, Any]):
    from ..backends.disk.files import Files

    return Files(store, (backend_options or {}).get("storage_options"))


def exists(store: str, stream_id: str, backend_options: dict[str, Any]) -> bool:
    """Whether the store holds a stream ``stream_id`` (with its contract)."""
    try:
        return _peek(store, stream_id, backend_options) is not None
    except StoreError:
        return False


def _peek(store: str, stream_id: str, backend_options: dict[str, Any]) -> Any:
    from ..backends.disk import TieredBackend

    return TieredBackend.peek_state(store, stream_id, "session", **(backend_options or {}))


def store_model(store: str, backend_options: dict[str, Any]) -> Any:
    """The model recorded by the store's streams (the first one found), if any."""
    for info in list_streams(store, backend_options):
        if info.get("model"):
            return info["model"]
    return None


def stream_ids(store: str, backend_options: dict[str, Any]) -> list[str]:
    """Ids of the streams in the store (names of their state files; cheap: one listing)."""
    from ..backends.disk.streams import stream_ids as ids

    files = _files(store, backend_options)
    if not files.remote and not files.local.is_dir():
        return []
    return ids(files)


def list_streams(store: str, backend_options: dict[str, Any]) -> list[dict[str, Any]]:
    """The store's streams: id, frames, t_start, t_end, wall_start, wall_end, bytes, model, sources, gaps."""
    from .. import streams

    files = _files(store, backend_options)
    if not files.remote and not files.local.is_dir():
        return []
    return [s for s in streams.list_streams(store, backend_options=backend_options or None) if "error" not in s]


def delete_stream(store: str, stream_id: str, backend_options: dict[str, Any]) -> None:
    """Delete a stream and reclaim its disk.

    Raises:
        StoreError: no such stream, or another process writes it.
    """
    from .. import streams

    streams.delete_stream(store, stream_id, backend_options=backend_options or None)


def describe(exc: BaseException) -> str:
    """One line for an error."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def to_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
