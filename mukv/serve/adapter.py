"""The one place where the service meets :class:`mukv.Session` and the store.

Everything the engine needs from mukv's public API goes through these functions, written
against the API of issue 15 (stream management, readers beside writers, time windows, gaps,
thumbnails). Where this mukv does not have a call yet, the function says so and does the
nearest thing the current API allows (marked "until issue 15"): wiring the new API in means
editing this module only.

Waiting for issue 15:

* ``Session.open(path, stream_id=..., backend="lancedb", read_only=True)`` and
  ``Session.refresh()``: used when present; until then ``backend_options={"read_only": True}``
  and ``session.backend.refresh()``.
* ``Session.ask(..., since=, until=)``: used when present; until then a question with a time
  window is refused with :class:`NotSupported` (HTTP 501).
* ``Session.record_gap(t_start, t_end, frames)``: used when present; until then the gaps go into
  the stream's state (``set_state("gaps", ...)``, committed with the next feed).
* ``Session(..., thumbnails=96)`` / ``Session.thumbnail(i)``: used when present; until then the
  thumbnails are JPEG files ``thumbs/<stream>/<frame>.jpg`` in the store, written before the
  frames are fed.
* ``mukv.streams.list_streams`` / ``delete_stream``: used when present; until then read from the
  stream state files, and deleted here (state file first: the stream is gone once it is).
* ``Answer`` blocks with ``wall_start``/``wall_end``: passed on when present, else ``None``.
"""

from __future__ import annotations

import inspect
import io
import json
import warnings
from typing import Any, Callable

import numpy as np

from ..errors import InputError, MukvError, StoreError

BACKEND = "lancedb"
#: until issue 15: gaps kept in a stream's state (the newest)
MAX_GAPS_KEPT = 1000


class NotSupported(MukvError):
    """A request this mukv cannot serve yet (HTTP 501)."""


def _has(name: str, param: str | None = None) -> bool:
    from ..session import Session

    fn = getattr(Session, name, None)
    if fn is None:
        return False
    return param is None or param in inspect.signature(fn).parameters


def _streams_api():
    try:
        from .. import streams  # issue 15

        return streams
    except ImportError:
        return None


# ------------------------------------------------------------------ opening sessions
def open_writer(store: str, stream_id: str, model: Any, backend_options: dict[str, Any],
                config: dict[str, Any] | None = None, thumbnails: int = 0, create: bool = False):
    """The stream's writer session, or a read-only one when another process writes it.

    Args:
        model: a loaded :class:`~mukv.interfaces.ModelAdapter` (shared by every stream).
        create: create the stream if it is not in the store (else :class:`StoreError`).
    """
    from ..session import Session

    kwargs: dict[str, Any] = {"backend": BACKEND, "stream_id": stream_id, "model": model,
                              "backend_options": dict(backend_options)}
    if thumbnails and _has("thumbnail"):
        kwargs["thumbnails"] = thumbnails
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "opened read-only": the caller looks at the session's role
        if exists(store, stream_id, backend_options):
            return Session.open(store, **kwargs)
        if not create:
            raise StoreError(f"no stream {stream_id!r} in {store}")
        return Session(path=store, config=config, **kwargs)


def open_reader(store: str, stream_id: str, model: Any, backend_options: dict[str, Any]):
    """A read-only session over a stream another process writes (never blocks that writer)."""
    from ..session import Session

    if _has("open", "read_only"):
        return Session.open(store, stream_id=stream_id, backend=BACKEND, model=model, read_only=True,
                            backend_options=dict(backend_options))
    return Session.open(store, stream_id=stream_id, backend=BACKEND, model=model,
                        backend_options={**backend_options, "read_only": True})


def is_writer(session: Any) -> bool:
    """Whether the session may feed frames."""
    return not getattr(session.backend, "read_only", False)


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
    if _has("refresh"):
        session.refresh()
        return
    session.backend.refresh()
    # until issue 15: the session's own view of the stream follows the backend's state
    session._ingestor.frames_seen = int(session.backend.get_state("frames_seen", 0) or 0)
    session._last_time = session.backend.get_state("last_time", None)


# ------------------------------------------------------------------ feeding
def feed(session: Any, frames: np.ndarray, timestamps: np.ndarray | None, thumbnails: int = 0) -> int:
    """Feed ``uint8 [n, H, W, 3]`` frames as one transaction; keep their thumbnails."""
    first = frames_stored(session)
    if thumbnails and not _has("thumbnail"):  # until issue 15: thumbnails kept here
        _save_thumbnails(session, frames, first, thumbnails)
    return session.feed(frames, timestamps=timestamps)


def record_gap(session: Any, t_start: float, t_end: float, frames: int) -> None:
    """Record dropped frames in the stream (committed with the next feed)."""
    if _has("record_gap"):
        session.record_gap(t_start, t_end, frames)
        return
    gaps = list(session.backend.get_state("gaps", None) or [])
    gaps.append({"t_start": float(t_start), "t_end": float(t_end), "frames": int(frames)})
    session.backend.set_state("gaps", gaps[-MAX_GAPS_KEPT:])


def gaps(session: Any) -> list[dict[str, Any]]:
    """Gaps recorded in the stream."""
    if hasattr(session, "gaps"):
        return list(session.gaps() if callable(session.gaps) else session.gaps)
    return list(session.backend.get_state("gaps", None) or [])


def frames_stored(session: Any) -> int:
    return int(session.stats()["frames"])


def last_time(session: Any) -> float | None:
    t = session.stats().get("last_time")
    return None if t is None else float(t)


def stream_numbers(session: Any) -> dict[str, Any]:
    """Frames, time span and bytes of a stream (hot tier and disk)."""
    st = session.stats()
    tiers = session.backend.tier_stats() if hasattr(session.backend, "tier_stats") else {}
    wall = getattr(session, "wall_span", None)
    return {
        "frames": int(st["frames"]),
        "t_start": st.get("first_time", 0.0 if st["frames"] else None),
        "t_end": st.get("last_time"),
        "wall_start": wall[0] if wall else None,
        "wall_end": wall[1] if wall else None,
        "bytes": int(st.get("bytes", 0)),
        "hot_bytes": int(tiers.get("hot", {}).get("used_bytes", 0)),
        "disk_bytes": int(tiers.get("disk", {}).get("kv_bytes", 0)),
    }


# ------------------------------------------------------------------ asking
def ask(session: Any, question: str, since: Any = None, until: Any = None, max_new_tokens: int | None = None,
        top_k: dict[str, int] | None = None, on_token: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Answer a question; returns the answer as a JSON-ready dict (see ``protocol.AnswerBody``)."""
    kwargs: dict[str, Any] = {"top_k": top_k, "max_new_tokens": max_new_tokens}
    if since is not None or until is not None:
        if not _has("ask", "since"):
            raise NotSupported("questions over a time window (since/until) need Session.ask(since=, until=) "
                               "(mukv issue 15); ask without them")
        kwargs.update(since=since, until=until)
    if on_token is not None:
        kwargs["on_token"] = on_token
    return answer_dict(session.ask(question, **kwargs))


def answer_dict(answer: Any) -> dict[str, Any]:
    blocks = []
    for b in answer.blocks:
        blocks.append({"level": b.level, "block_id": b.block_id, "score": b.score, "frame_start": b.frame_start,
                       "frame_end": b.frame_end, "t_start": b.t_start, "t_end": b.t_end,
                       "wall_start": getattr(b, "wall_start", None), "wall_end": getattr(b, "wall_end", None),
                       "tokens": b.tokens})
    return {"question": answer.question, "text": answer.text, "blocks": blocks, "kv_tokens": answer.kv_tokens,
            "timings": dict(answer.timings), "notes": list(answer.notes)}


# ------------------------------------------------------------------ thumbnails
def _thumb_rel(stream_id: str, index: int) -> str:
    return f"thumbs/{stream_id}/{int(index)}.jpg"


def encode_thumbnail(frame: np.ndarray, size: int) -> bytes:
    """A JPEG of ``frame`` (``uint8 [H, W, 3]``) whose long side is ``size`` pixels."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(frame), "RGB")
    scale = size / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _save_thumbnails(session: Any, frames: np.ndarray, first: int, size: int) -> None:
    files = session.backend.files
    for i, frame in enumerate(frames):
        files.write(_thumb_rel(session.stream_id, first + i), encode_thumbnail(frame, size))


def thumbnail(session: Any, index: int) -> bytes:
    """The JPEG thumbnail of stored frame ``index``.

    Raises:
        InputError: no such frame (or no thumbnail kept for it).
    """
    if _has("thumbnail"):
        return session.thumbnail(index)
    n = frames_stored(session)
    if not 0 <= index < n:
        raise InputError(f"no frame {index}: the stream holds frames 0 to {n - 1}" if n else "the stream holds no frames")
    data = session.backend.files.read(_thumb_rel(session.stream_id, index))
    if data is None:
        raise InputError(f"no thumbnail was kept for frame {index}")
    return data


# ------------------------------------------------------------------ the store
def _files(store: str, backend_options: dict[str, Any]):
    from ..backends.disk.files import Files

    return Files(store, (backend_options or {}).get("storage_options"))


def exists(store: str, stream_id: str, backend_options: dict[str, Any]) -> bool:
    from ..backends.disk.files import check_stream_id

    check_stream_id(stream_id)
    files = _files(store, backend_options)
    if not files.remote and not files.local.is_dir():
        return False
    return files.read(f"streams/{stream_id}.json") is not None


def store_model(store: str, backend_options: dict[str, Any]) -> str | None:
    """The model recorded by the store's streams (the first one found), if any."""
    for info in list_streams(store, backend_options):
        if info.get("model"):
            return info["model"]
    return None


def stream_ids(store: str, backend_options: dict[str, Any]) -> list[str]:
    """Ids of the streams in the store (names of their state files; cheap: one listing)."""
    from ..backends.disk.files import check_stream_id

    files = _files(store, backend_options)
    if not files.remote and not files.local.is_dir():
        return []
    out = []
    for name in files.listing("streams"):
        if name.endswith(".json") and not name.startswith("."):
            try:
                out.append(check_stream_id(name[: -len(".json")]))
            except StoreError:
                continue
    return out


def list_streams(store: str, backend_options: dict[str, Any]) -> list[dict[str, Any]]:
    """The store's streams: id, frames, t_start, t_end, wall_start, wall_end, bytes, model, sources, gaps."""
    api = _streams_api()
    if api is not None and hasattr(api, "list_streams"):
        return api.list_streams(store, backend_options=backend_options or None)
    from ..backends.disk.files import check_stream_id

    files = _files(store, backend_options)
    if not files.remote and not files.local.is_dir():
        return []
    manifest = files.read_json("mukv.json") or {}
    lay = manifest.get("layout", {})
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(lay.get("dtype"), 2)
    token_bytes = int(lay.get("num_layers", 0)) * 2 * int(lay.get("num_kv_heads", 0)) * int(lay.get("head_dim", 0)) * itemsize
    out = []
    for name in files.listing("streams"):
        if not name.endswith(".json") or name.startswith("."):
            continue
        sid = name[: -len(".json")]
        try:
            check_stream_id(sid)
            state = files.read_json(f"streams/{name}") or {}
        except StoreError:
            continue
        values = state.get("values", {})
        if not (values.get("session") or {}).get("model"):
            continue  # a stream being created (its state holds no session yet), or not mukv's
        levels = state.get("levels", {})
        nbytes = sum(int(n) * int(levels.get(lv, {}).get("tokens", 0)) * token_bytes
                     for lv, n in state.get("counts", {}).items())
        frames = int(values.get("frames_seen", 0) or 0)
        out.append({"id": sid, "frames": frames, "t_start": 0.0 if frames else None,
                    "t_end": values.get("last_time"), "wall_start": None, "wall_end": None, "bytes": nbytes,
                    "model": (values.get("session") or {}).get("model"), "sources": values.get("sources", []),
                    "gaps": values.get("gaps", [])})
    return sorted(out, key=lambda d: d["id"])


def delete_stream(store: str, stream_id: str, backend_options: dict[str, Any]) -> None:
    """Delete a stream and reclaim its disk.

    Raises:
        StoreError: no such stream, or another process writes it.
    """
    api = _streams_api()
    if api is not None and hasattr(api, "delete_stream"):
        api.delete_stream(store, stream_id, backend_options=backend_options or None)
        return
    from ..backends.disk.files import WriterLock, check_stream_id
    from ..backends.disk.lance_index import BlockTable
    from ..backends.disk.lease import StreamLease

    check_stream_id(stream_id)
    files = _files(store, backend_options)
    rel = f"streams/{stream_id}.json"
    if files.read(rel) is None:
        raise StoreError(f"no stream {stream_id!r} in {store}")
    owner: Any
    if files.remote:
        o = backend_options or {}
        owner = StreamLease(files, rel, o.get("lease_ttl", 30.0), o.get("lease_owner"), o.get("clock_skew", 10.0))
        owner.acquire()
    else:
        owner = WriterLock(files.local / "streams" / f"{stream_id}.lock")
        if not owner.acquire():
            raise StoreError(f"stream {stream_id!r} is being written by another process (pid {owner.holder()})")
    try:
        _delete_path(files, rel)  # the commit point: the stream is gone once its state is
        manifest = files.read_json("mukv.json") or {}
        lay = manifest.get("layout", {})
        dim = int(lay.get("num_kv_heads", 0)) * int(lay.get("head_dim", 0))
        if dim:
            BlockTable(files, dim).delete_uncounted(stream_id, {})
        _delete_tree(files, f"kv/{stream_id}")
        _delete_tree(files, f"thumbs/{stream_id}")
    finally:
        owner.release()
        if not files.remote:
            try:
                (files.local / "streams" / f"{stream_id}.lock").unlink()
            except OSError:
                pass


def _delete_path(files: Any, rel: str) -> None:
    if files.remote:
        import obstore

        obstore.delete(files.object_store, rel)
    else:
        (files.local / rel).unlink(missing_ok=True)


def _delete_tree(files: Any, rel: str) -> None:
    if files.remote:
        import obstore

        paths = [o["path"] for batch in obstore.list(files.object_store, prefix=rel + "/") for o in batch]
        if paths:
            obstore.delete(files.object_store, paths)
    else:
        import shutil

        shutil.rmtree(files.local / rel, ignore_errors=True)


def describe(exc: BaseException) -> str:
    """One line for an error."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def to_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
