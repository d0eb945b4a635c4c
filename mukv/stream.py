"""One stream's bookkeeping, moved only together with its blocks.

A :class:`Stream` owns what a stream knows about itself besides its blocks: frames seen, stream time,
the frames some level has not consumed yet (the :class:`~mukv.pipeline.Ingestor`'s pending frames),
each level's cursor, the frame size and wall-clock origin of its contract, where its frames came from
(sources), what was dropped (gaps). A session and its forks share one ``Stream``, so no copy of a
counter can drift from another.

Every change is a transaction (:meth:`Stream.transaction`): the blocks a feed completes are added to the
backend, then the new state values (and the small files that go with them: pending frames,
thumbnails) are committed in one :meth:`~mukv.interfaces.StorageBackend.commit`. If anything fails or
is interrupted before that commit, the backend rolls the blocks back and every field here returns to
what it was: a retried feed never stores a frame twice.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
import zlib
from contextlib import closing, contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from .encode_ahead import encoded_pieces
from .errors import InputError, StoreError
from .pipeline import Ingestor
from .signals import deferred
from .state import MAX_STREAM_TIME, SourceRecord, StreamValues

#: dtype names of pending frames on disk
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: gaps kept per stream (older adjacent ones merge)
MAX_GAPS = 10_000
#: Frames one :meth:`Stream.record_gap` call may record (a week at 1,000 fps is 6e8).
MAX_GAP_FRAMES = 1 << 40


def encode_pending(embeds: torch.Tensor) -> tuple[bytes, str]:
    """Raw little-endian bytes of encoded frames ``[n, T, E]`` and their dtype name."""
    cpu = embeds.detach().to("cpu").contiguous()
    name = {v: k for k, v in _DTYPES.items()}.get(cpu.dtype)
    if name is None:
        cpu, name = cpu.float(), "float32"
    raw = cpu.view(torch.int16) if cpu.dtype in (torch.bfloat16, torch.float16) else cpu
    return raw.numpy().tobytes(), name


def decode_pending(data: bytes, shape: list[int], dtype: str) -> torch.Tensor:
    """The inverse of :func:`encode_pending`."""
    torch_dtype = _DTYPES[dtype]
    if torch_dtype in (torch.bfloat16, torch.float16):
        arr = np.frombuffer(data, dtype=np.int16).reshape(shape).copy()
        return torch.from_numpy(arr).view(torch_dtype)
    return torch.from_numpy(np.frombuffer(data, dtype=np.float32).reshape(shape).copy())


def thumbnail_jpeg(frame: np.ndarray, side: int) -> bytes:
    """A JPEG of ``frame`` (uint8 ``[H, W, 3]``) whose long side is ``side`` pixels."""
    from PIL import Image

    im = Image.fromarray(frame)
    im.thumbnail((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


class Stream:
    """The state of one stream (see the module docstring).

    Args:
        ingestor: the ingest pipeline, already positioned at the stored cursors and pending frames.
        backend: the store.
        values: the stream's validated stored state values.
        contract: the contract values as stored (the ``"session"`` state value).
        writable: whether this process may feed the stream.
    """

    def __init__(self, ingestor: Ingestor, backend: Any, values: StreamValues, contract: dict[str, Any],
                 writable: bool):
        self.ingestor = ingestor
        self.backend = backend
        self.contract = dict(contract)
        self.writable = writable
        self.lock = threading.RLock()
        self.closed = False
        self.broken: str | None = None  # set when a failed feed could not be rolled back
        self.last_time: float | None = values.last_time
        self.first_time: float | None = values.first_time
        size = self.contract.get("frame_size")
        self.frame_hw: tuple[int, int] | None = tuple(size) if size else None  # type: ignore[assignment]
        self.sources: list[dict[str, Any]] = [s.model_dump() for s in values.sources]
        self.gaps: list[dict[str, Any]] = [g.model_dump() for g in values.gaps]
        self._pending_file: str | None = values.pending.file if values.pending else None
        self._pending_key: tuple[int, int] | None = (values.pending.start, values.pending.count) if values.pending else None
        self._pending_record: dict[str, Any] | None = values.pending.model_dump() if values.pending else None
        self._feed_record: str | None = None  # id of the source record of this process's plain feeds

    # -- what a stream knows -------------------------------------------------------------------
    @property
    def frames_seen(self) -> int:
        return self.ingestor.frames_seen

    @property
    def wall_origin(self) -> float | None:
        return self.contract.get("wall_origin")

    @property
    def thumbnails(self) -> int | None:
        return self.contract.get("thumbnails")

    # -- transactions -------------------------------------------------------------------------
    def _snapshot(self) -> tuple:
        return (self.ingestor.snapshot(), self.last_time, self.first_time, self.frame_hw, dict(self.contract),
                [dict(s) for s in self.sources], [dict(g) for g in self.gaps], self._pending_file,
                self._pending_key, self._feed_record)

    def _restore(self, snap: tuple) -> None:
        (ing, self.last_time, self.first_time, self.frame_hw, self.contract, self.sources, self.gaps, self._pending_file,
         self._pending_key, self._feed_record) = snap
        self.ingestor.restore(ing)

    @contextmanager
    def transaction(self) -> Iterator[dict[str, Any]]:
        """All or nothing: the body adds blocks and changes fields; on leaving, the state values and
        files (the yielded dict's ``"files"``) are committed with them. An exception (KeyboardInterrupt
        included) rolls the blocks back and restores every field, then propagates."""
        tx = self.begin()
        try:
            yield tx.extra
            tx.commit()
        except BaseException:  # the body failed, or an interrupt came on the way into the commit
            tx.rollback()  # nothing once the commit is recorded: then it stays, and the interrupt is raised
            raise

    def begin(self) -> "Transaction":
        """Open a transaction by hand (:meth:`transaction` is the usual way): what a batch over
        several streams uses, one transaction per stream, each committed or rolled back on its own."""
        return Transaction(self)

    def _values(self, files: dict[str, bytes]) -> tuple[dict[str, Any], dict[str, bytes]]:
        ing = self.ingestor
        values: dict[str, Any] = {
            "frames_seen": ing.frames_seen, "cursors": dict(ing.cursor), "last_time": self.last_time,
            "first_time": self.first_time,
            "session": self.contract, "sources": self.sources, "gaps": self.gaps,
        }
        files = dict(files)
        if getattr(self.backend, "persistent", False):
            values["pending"] = self._pending_value(files)
        return values, files

    def _pending_value(self, files: dict[str, bytes]) -> dict[str, Any] | None:
        """The pending-frames record to commit, writing its file into ``files`` when it changed."""
        pending = self.ingestor.pending_frames()
        key = None if pending is None else (pending[0], int(pending[1].shape[0]))
        if key == self._pending_key and self._pending_file is not None and pending is not None:
            return self._pending_record
        old = self._pending_file
        if pending is None:
            self._pending_key = self._pending_file = None
            self._pending_record = None
            if old:
                files[old] = b""
            return None
        start, emb, times = pending
        data, dtype = encode_pending(emb)
        name = f"pending.{start}.{start + emb.shape[0]}.bin"
        files[name] = data
        if old and old != name:
            files[old] = b""
        self._pending_key, self._pending_file = key, name
        self._pending_record = {"start": start, "count": int(emb.shape[0]), "file": name,
                                "crc32": zlib.crc32(data) & 0xFFFFFFFF, "shape": [int(s) for s in emb.shape],
                                "dtype": dtype, "times": [float(x) for x in times.tolist()]}
        return self._pending_record

    def check_writable(self) -> None:
        if self.closed:
            from .errors import MukvError

            raise MukvError("this session is closed")
        if self.broken:
            raise StoreError(self.broken)
        if not self.writable or getattr(self.backend, "read_only", False):
            raise StoreError("this stream is open read-only here (a reader, or a fork of a session): frames "
                             "cannot be fed through it; feed the session that writes the stream")

    # -- feeding --------------------------------------------------------------------------------
    def feed(self, frames: torch.Tensor, times: torch.Tensor, encode, source: dict[str, Any] | None = None,
             thumbnails: bool = True, wall_origin: float | None = None, piece_frames: int | None = None) -> int:
        """Encode ``frames`` (uint8 ``[n, H, W, 3]``, already copied and sized) at stream ``times``
        (float64 ``[n]``, validated), store every block they complete and commit, as one transaction.

        Args:
            encode: ``frames -> embeds [m, T, E]`` (the model's vision side) for one piece of at most
                ``piece_frames`` frames.
            source: the source record to create or update with this chunk (``None``: a plain feed).
            wall_origin: the wall-clock origin a new stream takes from these frames' timestamps.
            piece_frames: frames per vision batch (``None``: one batch); with
                :data:`mukv.encode_ahead.ENCODE_AHEAD` on a GPU, each batch is prefilled on its own
                while the next ones are encoded.
        """
        n = int(frames.shape[0])
        with self.transaction() as tx:
            self.start_feed(wall_origin)
            first = self.ingestor.frames_seen
            stored = 0
            with closing(encoded_pieces(encode, frames, piece_frames or n, self.ingestor.model.device)) as done:
                for a, b, embeds in done:
                    stored += self.ingestor.add_frames(embeds, times[a:b])
            self.end_feed(tx["files"], frames, times, first, source, thumbnails)
            return stored

    def start_feed(self, wall_origin: float | None) -> None:
        """The first step of a feed, inside its transaction: a new stream fed wall-clock times takes
        its wall-clock origin from them (part of its contract from now on)."""
        if wall_origin is not None and self.wall_origin is None:
            self.contract = {**self.contract, "wall_origin": wall_origin}

    def end_feed(self, files: dict[str, bytes], frames: torch.Tensor, times: torch.Tensor, first: int,
                 source: dict[str, Any] | None = None, thumbnails: bool = True) -> None:
        """The last step of a feed, inside its transaction, once its blocks are added: the stream's
        times, frame size, source record and thumbnails (into ``files``) follow the frames
        ``first .. first + n - 1`` fed."""
        n = int(frames.shape[0])
        self.last_time = float(times[-1])
        if self.first_time is None:
            self.first_time = float(times[0])
        if self.frame_hw is None:
            self.frame_hw = (int(frames.shape[1]), int(frames.shape[2]))
            self.contract = {**self.contract, "frame_size": list(self.frame_hw)}
        self._note_source(source, first, n, times)
        if thumbnails and self.thumbnails:
            arr = frames.numpy()
            for i in range(n):
                files[f"thumbs/{first + i:09d}.jpg"] = thumbnail_jpeg(arr[i], self.thumbnails)

    def _note_source(self, source: dict[str, Any] | None, first: int, n: int, times: torch.Tensor) -> None:
        end = first + n
        t0, t1 = float(times[0]), float(times[-1])
        if source is None:  # plain feeds of this process share one record while they follow each other
            rec = self._find(self._feed_record)
            if rec is not None and rec["frames"][1] == first:
                rec.update(frames=[rec["frames"][0], end], consumed=rec["consumed"] + n, times=[rec["times"][0], t1])
                return
            rec = {"kind": "feed", "location": "Session.feed", "consumed": 0, "complete": False, "started": time.time()}
        else:
            rec = self._find(source.get("id"))
            if rec is not None:
                rec.update(frames=[rec["frames"][0], end], times=[rec["times"][0], t1], consumed=rec["consumed"] + n)
                return
            rec = dict(source)
        rec.setdefault("id", uuid.uuid4().hex[:16])
        rec.update(frames=[first, end], times=[t0, t1], consumed=rec.get("consumed", 0) + n)
        rec = SourceRecord.model_validate(rec).model_dump()  # every field, as a reopened stream has it
        self.sources.append(rec)
        if source is None:
            self._feed_record = rec["id"]
        else:
            source["id"] = rec["id"]
            self._feed_record = None

    def _find(self, rec_id: Any) -> dict[str, Any] | None:
        if rec_id is None:
            return None
        for rec in reversed(self.sources):
            if rec.get("id") == rec_id:
                return rec
        return None

    def finish_source(self, source: dict[str, Any]) -> None:
        """Mark a source read to its end (committed as a transaction without blocks)."""
        if self._find(source.get("id")) is None:
            return
        with self.transaction():
            self._find(source.get("id"))["complete"] = True

    def record_gap(self, t_start: float, t_end: float, frames: int, reason: str = "dropped") -> None:
        """Record frames that arrived but were not stored (committed at once)."""
        if not isinstance(frames, int) or isinstance(frames, bool) or not 1 <= frames <= MAX_GAP_FRAMES:
            raise InputError(f"a gap needs a positive number of frames, at most {MAX_GAP_FRAMES:,}; got {frames!r}"[:200])
        for name, v in (("t_start", t_start), ("t_end", t_end)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not abs(float(v)) <= MAX_STREAM_TIME:
                raise InputError(f"gap {name} must be a finite stream time in seconds; got {v!r}")
        if float(t_end) < float(t_start):
            raise InputError(f"gap ends ({t_end}) before it starts ({t_start})")
        if not isinstance(reason, str) or len(reason) > 200:
            raise InputError("gap reason must be a string of at most 200 characters")
        with self.transaction():
            gap = {"t_start": float(t_start), "t_end": float(t_end), "frames": frames,
                   "after_frame": self.frames_seen, "reason": reason}
            last = self.gaps[-1] if self.gaps else None
            if last is not None and last["after_frame"] == gap["after_frame"] and last["reason"] == reason:
                last.update(t_end=max(last["t_end"], gap["t_end"]), frames=last["frames"] + frames)
            else:
                self.gaps.append(gap)
            if len(self.gaps) > MAX_GAPS:  # merge the two oldest
                a, b = self.gaps[0], self.gaps[1]
                self.gaps[:2] = [{**a, "t_end": b["t_end"], "frames": a["frames"] + b["frames"]}]


class Transaction:
    """One stream's transaction (see :meth:`Stream.transaction`): opened with :meth:`Stream.begin`,
    ended by exactly one of :meth:`commit` or :meth:`rollback` (a second call does nothing).

    Attributes:
        extra: ``{"files": {...}}``: small files to commit with the state values.
        error: set by whoever decides this transaction must not commit (it is rolled back instead).
    """

    def __init__(self, stream: Stream):
        if not isinstance(stream, Stream):
            raise StoreError(f"a transaction is opened on a Stream (Stream.transaction()); got {type(stream).__name__}")
        stream.check_writable()
        self.stream = stream
        self.extra: dict[str, Any] = {"files": {}}
        self.error: BaseException | None = None
        self.done = False
        self._snap = stream._snapshot()

    @property
    def files(self) -> dict[str, bytes]:
        return self.extra["files"]

    def commit(self) -> None:
        """Commit the blocks added since :meth:`Stream.begin` with the stream's state values and files;
        if that fails (or :attr:`error` is set) everything is rolled back and the error raised."""
        if self.done:
            return
        # a signal arriving during the commit waits until the commit has been handed over and is
        # recorded: it is raised after, never into the rollback of a transaction already committed
        held = deferred()
        held.__enter__()
        try:
            if self.error is not None:
                raise self.error
            values, files = self.stream._values(self.files)
            self.stream.backend.commit(values, files)
        except BaseException:
            try:
                self.rollback()
            finally:
                held.__exit__(None, None, None)
            raise
        self.done = True
        held.__exit__(None, None, None)  # an interrupt that came during the commit: the feed is committed

    def rollback(self) -> None:
        """Forget the blocks added since :meth:`Stream.begin` and restore every field of the stream."""
        if self.done:
            return
        self.done = True
        st = self.stream
        with deferred():
            st._restore(self._snap)
            try:
                st.backend.rollback()
            except BaseException as exc:  # noqa: BLE001 - the stream is unusable, say why on every call
                st.broken = (f"a failed feed could not be rolled back ({exc}); what was committed before "
                             "is intact: reopen the stream to continue")


def pending_file_problem(data: bytes | None, p: Any) -> str | None:
    """What is wrong with the bytes ``data`` of the pending frames file that state record ``p``
    (:class:`~mukv.state.PendingFrames`) describes (``None``: the file is missing), or ``None`` if nothing:
    its CRC-32 and its size (``shape`` x the dtype's bytes). Used by reopening and by ``verify_store``."""
    if data is None:
        return f"the pending frames file {p.file} is missing"
    if zlib.crc32(data) & 0xFFFFFFFF != p.crc32:
        return f"the pending frames file {p.file} fails its checksum"
    elem = 4 if p.dtype == "float32" else 2
    if len(data) != p.shape[0] * p.shape[1] * p.shape[2] * elem:
        return f"the pending frames file {p.file} has the wrong size"
    return None


def load_pending(backend: Any, values: StreamValues, tokens_per_frame: int, hidden: int
                 ) -> tuple[tuple[int, torch.Tensor, torch.Tensor] | None, str | None]:
    """The stored pending frames of a stream, checked (crc, shape, model); ``(None, why)`` if they cannot
    be used (the levels waiting for them then resume at the next frame fed)."""
    p = values.pending
    if p is None:
        return None, None
    data = backend.read_file(p.file)
    why = pending_file_problem(data, p)
    if why:
        return None, why
    if p.shape[1] != tokens_per_frame or p.shape[2] != hidden:
        return None, f"the pending frames were encoded by another model (shape {p.shape})"
    emb = decode_pending(data, list(p.shape), p.dtype)
    return (p.start, emb, torch.tensor(p.times, dtype=torch.float64)), None
