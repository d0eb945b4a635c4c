"""One batched ingest over the frames of several streams of one model.

:class:`BatchIngest` stores the frames of many sessions (one :class:`FeedItem` each) as if each
session had been fed alone, with the GPU work of all of them done together::

    per stream: its transaction opens (Stream.begin)
    the vision tower over every stream's frames, encode_batch_frames at a time (frames of one size)
    per stream: its encoded frames join its Ingestor's pending frames
    per level kind (levels of streams whose blocks are made alike, mukv.level_kinds): the windows every stream
        completes, gathered across streams, prefill_batch_tokens at a time
        -> one prefill forward -> scores -> kept tokens -> KV gather (pipeline.prefill_rows,
           pipeline.compress_blocks: the single-stream path's own functions)
        -> split back per stream -> that stream's backend.add, its level cursor moves on
    per stream: its bookkeeping (times, source, thumbnails), then its own commit.

A block attends to the system prompt and to itself only, and every score and selection is per
block, so a block's KV, scores and kept tokens do not depend on the streams that shared its batch
(only floating-point rounding of batched matrix products may differ with the batch size, as it
does between feeds of one stream in chunks of other sizes).

Each stream commits or rolls back on its own: a stream whose backend fails to add or to commit
is rolled back (nothing of this feed is stored, its bookkeeping is as before) while the others
commit. A stream may also leave a running batch at a stage boundary (``withdraw``: a question
waits on it): its transaction is rolled back and its locks released there, so the question reads
the stream as last committed, and its result says ``withdrawn`` (the caller feeds its frames again). A failure of the shared work (the vision tower, a prefill, a scorer) rolls every
transaction of the batch back, and then (``isolate_failures``) each stream is fed again alone, so
that only the stream that causes it fails.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .errors import ConfigError, InputError
from .level_kinds import LevelKind, LevelKinds, same_component  # noqa: F401 - same_component: importable from here
from .pipeline import LevelPipeline, WindowRows, compress_blocks, prefill_rows
from .stream import Transaction


@dataclass
class FeedItem:
    """Frames of one session to store in a batch.

    Attributes:
        session: a writing :class:`~mukv.Session` (every item of a batch shares one model).
        frames: ``uint8 [n, H, W, 3]`` frames of the stream's size, a private copy (CPU).
        times: ``float64 [n]`` stream times, strictly increasing, after the stream's last.
        wall_origin: the wall-clock origin a new stream takes from these frames (``None``: none).
        source: a source record to note these frames under (``None``: a plain feed).
        thumbnails: keep thumbnails of these frames when the stream keeps thumbnails.
    """

    session: Any
    frames: torch.Tensor
    times: torch.Tensor
    wall_origin: float | None = None
    source: dict[str, Any] | None = None
    thumbnails: bool = True

    @classmethod
    def of(cls, session: Any, frames: Any, timestamps: Any = None, resize: bool | None = None,
           after: tuple[float | None, float | None, int] | None = None,
           frame_hw: tuple[int, int] | None = None) -> "FeedItem":
        """Frames and timestamps validated as :meth:`mukv.Session.feed` validates them (copied, resized
        if asked), timed after ``after`` (``(last time, wall-clock origin, frames)`` of frames queued
        but not fed yet; default: the stream as it is) and sized as ``frame_hw`` (the size of frames
        queued for a stream that has none yet).

        Raises:
            InputError: bad frames or timestamps.
            StoreError: a session that cannot be fed.
        """
        with session._lock if after is None else _nothing():
            session._check_writable()
            t = session._checked(frames, resize, want=frame_hw)
            ts, origin = session._stream_times(timestamps, int(t.shape[0]), after)
        return cls(session, t, ts, origin)


@dataclass
class FeedResult:
    """What a batch did to one item: ``blocks`` stored and committed, or the ``error`` that left
    the stream as it was (nothing of the item stored)."""

    session: Any
    frames: int
    blocks: int = 0
    error: BaseException | None = None
    #: the item was fed again alone after a failure of the shared work
    alone: bool = False
    #: the stream left the batch at a stage boundary (``BatchIngest.withdraw``): nothing of the item
    #: was stored, nothing failed; the caller feeds its frames again
    withdrawn: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.withdrawn


@dataclass
class BatchStats:
    """Counts of one batch (:meth:`BatchIngest.run`)."""

    streams: int = 0
    frames: int = 0
    blocks: int = 0
    encode_batches: int = 0
    prefill_batches: int = 0
    #: level kinds (groups of levels whose blocks are made alike) in the batch
    kinds: int = 0
    failed: int = 0
    #: the shared work failed and the streams were fed again one by one
    retried_alone: bool = False
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Live:
    item: FeedItem
    index: int
    tx: Transaction
    first: int = 0  # the stream's frame index of the item's first frame
    embeds: list[torch.Tensor] = field(default_factory=list)
    blocks: int = 0
    locks: list[Any] = field(default_factory=list)  # held for this stream, in acquisition order
    withdrawn: bool = False


@dataclass
class _Part:
    live: _Live
    lp: LevelPipeline
    first: int  # first frame of the part's first window
    windows: int


class BatchIngest:
    """Stores the frames of several sessions of one model in one batched pass (module docstring).

    Args:
        encode_batch_frames: frames per vision-tower batch (frames of several streams together).
        prefill_batch_tokens: most tokens of one prefill forward (windows of several streams together;
            at least one window).
        isolate_failures: when the shared work fails, feed every stream of the batch again alone so
            that only the stream causing the failure fails.
    """

    def __init__(self, encode_batch_frames: int = 64, prefill_batch_tokens: int = 16384, isolate_failures: bool = True):
        for name, v in (("encode_batch_frames", encode_batch_frames), ("prefill_batch_tokens", prefill_batch_tokens)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer; got {v!r}")
        self.encode_batch_frames = encode_batch_frames
        self.prefill_batch_tokens = prefill_batch_tokens
        self.isolate_failures = bool(isolate_failures)
        self._kinds = LevelKinds()
        #: Set to a dict to time the stages ("encode", "prefill", "score", "compress", "store", "commit")
        #: in seconds, summed over batches; each timed stage ends with a device synchronisation.
        self.stage_times: dict[str, float] | None = None
        #: Called between the stages of a batch (after each vision-tower batch of ``encode_batch_frames``,
        #: after each level kind's forwards), on the batch's thread, with the batch's streams locked and
        #: nothing committed: the scheduler lets questions on other streams use the model there.
        self.between_stages: Callable[[], None] | None = None
        #: Called at the stage boundaries a stream can still leave the batch at (after each
        #: vision-tower batch, after each level kind's forwards but the last), before ``between_stages``, with the
        #: sessions still in the batch; returns those to withdraw. Each is rolled back and unlocked
        #: there (a question on it may then run, on what it last committed) and its result is
        #: ``withdrawn``. The scheduler withdraws the streams that questions wait on.
        self.withdraw: Callable[[list[Any]], Any] | None = None

    # ------------------------------------------------------------------ the batch
    def run(self, items: list[FeedItem]) -> tuple[list[FeedResult], BatchStats]:
        """Store every item's frames, one transaction per stream (see the module docstring).

        Returns:
            ``(results, stats)``: one :class:`FeedResult` per item, in order.

        Raises:
            InputError: a session given twice (the items of a batch are one per stream).
            KeyboardInterrupt: after rolling back every transaction not yet committed.
        """
        t0 = time.perf_counter()
        seen: set[int] = set()
        for it in items:
            if id(it.session) in seen:
                raise InputError(f"stream {getattr(it.session, 'stream_id', '?')!r} is given twice in one batch; "
                                 "concatenate its frames into one item")
            seen.add(id(it.session))
        stats = BatchStats(streams=len(items), frames=sum(int(it.frames.shape[0]) for it in items))
        results = [FeedResult(it.session, int(it.frames.shape[0])) for it in items]
        model = items[0].session.model if items else None
        held: dict[int, list[Any]] = {}
        try:
            for it in sorted(items, key=lambda it: id(it.session)):  # one order: no deadlock between schedulers
                got = held.setdefault(id(it.session), [])
                for lock in (it.session._lock, it.session._stream.lock):
                    lock.acquire()
                    got.append(lock)
            live: list[_Live] = []
            for i, it in enumerate(items):
                try:
                    _check_item(it, model)
                    it.session._check_writable()
                    live.append(_Live(it, i, it.session._stream.begin(), locks=held[id(it.session)]))
                except Exception as exc:  # noqa: BLE001 - reported against this stream only
                    results[i].error = exc
            try:
                if live:
                    self._work(live, model, stats)
            except BaseException as exc:
                for lv in live:
                    lv.tx.rollback()
                if not isinstance(exc, Exception):
                    raise
                live = [lv for lv in live if not lv.withdrawn]
                if self.isolate_failures and len(live) > 1:
                    stats.retried_alone = True
                    for lv in live:
                        (alone,), _ = self.run([lv.item])
                        alone.alone = True
                        results[lv.index] = alone
                else:
                    for lv in live:
                        results[lv.index].error = exc
                live = []
            for lv in live:
                if lv.withdrawn:
                    results[lv.index].withdrawn = True
            self._commit([lv for lv in live if not lv.withdrawn], results)
        finally:
            for got in held.values():
                _release(got)
        stats.blocks = sum(r.blocks for r in results)
        stats.failed = sum(not r.ok for r in results)
        stats.seconds = time.perf_counter() - t0
        return results, stats

    def _commit(self, live: list[_Live], results: list[FeedResult]) -> None:
        """Each stream's own commit (its failure rolls it back alone)."""
        done = 0
        try:
            with self._stage("commit"):
                for lv in live:
                    try:
                        lv.tx.commit()
                        results[lv.index].blocks = lv.blocks
                    except Exception as exc:  # noqa: BLE001 - this stream is rolled back, the others go on
                        results[lv.index].error = exc
                    done += 1
        except BaseException:
            for lv in live[done:]:
                lv.tx.rollback()
            raise

    def _work(self, live: list[_Live], model: Any, stats: BatchStats) -> None:
        with self._stage("encode"):
            self._encode(live, model, stats)
        self._between(live, last=False)
        for lv in live:
            if lv.tx.error is not None:
                continue
            st = lv.item.session._stream
            st.start_feed(lv.item.wall_origin)
            ing = st.ingestor
            lv.first = ing.frames_seen
            embeds = lv.embeds[0] if len(lv.embeds) == 1 else torch.cat(lv.embeds)
            lv.embeds = []
            ing.append(embeds, lv.item.times)
        groups: dict[int, list[_Part]] = {}
        for lv in live:
            s = lv.item.session
            for lp in s.levels:
                if lp.level.local_window:  # a windowed level depends on its own stream's window: alone
                    if lv.tx.error is None:
                        try:
                            with self._stage("prefill"):
                                lv.blocks += s._stream.ingestor.run_level(lp)
                        except Exception as exc:  # noqa: BLE001 - this stream alone rolls back
                            lv.tx.error = exc
                    continue
                nw = s._stream.ingestor.ready_windows(lp)
                if nw > 0:
                    k = self._kinds.index(model, s.prefix, lp)
                    groups.setdefault(k, []).append(_Part(lv, lp, s._stream.ingestor.cursor[lp.level.name], nw))
        stats.kinds = len(groups)
        for i, (k, parts) in enumerate(groups.items()):
            self._run_kind(self._kinds[k], parts, stats)
            self._between(live, last=i == len(groups) - 1)
        for lv in live:
            if lv.tx.error is not None:
                continue
            st = lv.item.session._stream
            try:
                st.ingestor.trim()
                it = lv.item
                st.end_feed(lv.tx.files, it.frames, it.times, lv.first, it.source, it.thumbnails)
            except Exception as exc:  # noqa: BLE001 - this stream's own bookkeeping failed: it alone rolls back
                lv.tx.error = exc

    def _between(self, live: list[_Live], last: bool) -> None:
        if self.withdraw is not None and not last:
            staying = [lv for lv in live if lv.tx.error is None]
            if staying:
                out = {id(s) for s in (self.withdraw([lv.item.session for lv in staying]) or ())}
                for lv in staying:
                    if id(lv.item.session) in out:
                        self._withdraw(lv)
        if self.between_stages is not None:
            self.between_stages()

    @staticmethod
    def _withdraw(lv: _Live) -> None:
        """``lv``'s stream leaves the batch: rolled back (nothing of the item stored, its bookkeeping
        as before) and unlocked; the rest of the batch skips it."""
        lv.tx.error = _WITHDRAWN
        lv.withdrawn = True
        lv.embeds = []
        lv.blocks = 0
        try:
            lv.tx.rollback()
        finally:
            _release(lv.locks)

    def _encode(self, live: list[_Live], model: Any, stats: BatchStats) -> None:
        """The vision tower over the frames of every stream: frames of one size together,
        ``encode_batch_frames`` at a time (a batch may hold the frames of several streams)."""
        for i, pieces in enumerate(_vision_batches(live, self.encode_batch_frames)):
            if i:  # a stage boundary too: questions wait for one vision-tower batch, not for all of them
                self._between(live, last=False)
                pieces = [p for p in pieces if not p[0].withdrawn]
                if not pieces:
                    continue
            self._encode_pieces(pieces, model)
            stats.encode_batches += 1

    @staticmethod
    def _encode_pieces(pieces: list[tuple[_Live, int, int]], model: Any) -> None:
        frames = torch.cat([lv.item.frames[a:b] for lv, a, b in pieces]) if len(pieces) > 1 else \
            pieces[0][0].item.frames[pieces[0][1]:pieces[0][2]]
        out = model.encode_frames(frames)  # [n, T, E]
        o = 0
        for lv, a, b in pieces:
            lv.embeds.append(out[o : o + b - a])
            o += b - a

    def _run_kind(self, kind: LevelKind, parts: list[_Part], stats: BatchStats) -> None:
        """The windows of one level kind across streams, in prefill batches of whole windows."""
        lp = kind.lp
        per_window = lp.split.shape[0]
        cap = max(1, self.prefill_batch_tokens // max(1, per_window * lp.block_len))
        chunk: list[_Part] = []
        count = 0
        for p in parts:
            first, left = p.first, p.windows
            while left > 0:
                take = min(left, cap - count)
                chunk.append(_Part(p.live, p.lp, first, take))
                count += take
                first += take * lp.level.frames
                left -= take
                if count == cap:
                    self._run_chunk(kind, chunk, stats)
                    chunk, count = [], 0
        if chunk:
            self._run_chunk(kind, chunk, stats)

    def _run_chunk(self, kind: LevelKind, chunk: list[_Part], stats: BatchStats) -> None:
        chunk = [p for p in chunk if p.live.tx.error is None]
        if not chunk:
            return
        lp = kind.lp
        rows = WindowRows.cat([p.live.item.session._stream.ingestor.window_rows(p.lp, p.first, p.windows)
                               for p in chunk])
        with self._stage("prefill"):
            blocks = prefill_rows(kind.model, kind.prefix, lp, rows)
        compressed = compress_blocks(lp, blocks, rows.t_start, rows.t_end, self._stage, kind.model)
        del blocks
        stats.prefill_batches += 1
        # one finiteness check for the whole chunk (one device synchronisation, not one per stream's
        # store): a stream whose blocks hold NaN or inf is refused alone, the others store unchecked
        bad = (~torch.isfinite(compressed.kv).flatten(1).all(dim=1)).nonzero().flatten().tolist()
        compressed.finite = True
        with self._stage("store"):
            _store_chunk(chunk, compressed, lp.split.shape[0], bad)

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        times = self.stage_times
        if times is None:
            yield
            return
        device = self._kinds[0].model.device if self._kinds else None
        _sync(device)
        t0 = time.perf_counter()
        yield
        _sync(device)
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def _vision_batches(live: list[_Live], cap: int) -> list[list[tuple[_Live, int, int]]]:
    """The vision-tower batches of a batch's streams: pieces ``(stream, first, end)`` of their frames,
    frames of one size together, at most ``cap`` frames a batch."""
    by_size: dict[tuple[int, int], list[_Live]] = {}
    for lv in live:
        f = lv.item.frames
        by_size.setdefault((int(f.shape[1]), int(f.shape[2])), []).append(lv)
    batches: list[list[tuple[_Live, int, int]]] = []
    for group in by_size.values():
        pieces: list[tuple[_Live, int, int]] = []
        count = 0
        for lv in group:
            n, a = int(lv.item.frames.shape[0]), 0
            while a < n:
                b = min(n, a + cap - count)
                pieces.append((lv, a, b))
                count += b - a
                a = b
                if count == cap:
                    batches.append(pieces)
                    pieces, count = [], 0
        if pieces:
            batches.append(pieces)
    return batches


def _store_chunk(chunk: list[_Part], compressed: Any, per_window: int, bad: list[int]) -> None:
    """Each stream's rows of one prefill chunk's compressed blocks into its own backend (not committed);
    a stream whose blocks are not finite, or whose backend refuses them, is marked failed alone.
    ``bad``: the chunk's rows whose KV is not finite, checked once by the caller for the whole chunk."""
    placed = {compressed.frame_start.device: compressed}  # the metadata moved once per backend device
    o = 0
    for p in chunk:
        n = p.windows * per_window
        dev = getattr(p.live.item.session.backend, "metadata_device", None)
        src = compressed
        if isinstance(dev, torch.device):
            if dev not in placed:
                placed[dev] = compressed.with_metadata_on(dev)
            src = placed[dev]
        piece = src.rows(o, o + n, level=p.lp.level.name)
        rows = [r - o for r in bad if o <= r < o + n]
        o += n
        if rows:
            p.live.tx.error = InputError(
                f"KV of {len(rows)} block(s) of level {p.lp.level.name!r} (rows {rows[:8]}"
                f"{' ...' if len(rows) > 8 else ''} of this feed) holds NaN or infinite values; refused, "
                "nothing of this feed was stored (the model produced non-finite keys or values: in "
                "float16 usually an overflow)")
            continue
        try:
            p.live.item.session._stream.ingestor.store(p.lp, piece, p.windows)
            p.live.blocks += n
        except Exception as exc:  # noqa: BLE001 - this stream's backend refused: it alone rolls back
            p.live.tx.error = exc


class _Withdrawn(Exception):
    """Marks the transaction of a stream that left its batch (never raised to a caller)."""


_WITHDRAWN = _Withdrawn("withdrawn from the batch")


def _release(locks: list[Any]) -> None:
    """Release ``locks`` (acquired in this order), last first, and forget them."""
    while locks:
        locks.pop().release()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _check_item(it: FeedItem, model: Any) -> None:
    if it.session.model is not model:
        raise ConfigError(f"stream {it.session.stream_id!r} has another model than the batch's: a batch serves "
                          "sessions of one model (share one adapter: Session(model=adapter))")
    f, t = it.frames, it.times
    if not isinstance(f, torch.Tensor) or f.dtype != torch.uint8 or f.ndim != 4 or f.shape[0] < 1 or f.shape[3] != 3:
        raise InputError("a batch item's frames must be a uint8 tensor [n, H, W, 3] with n >= 1 (FeedItem.of "
                         "validates them)")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float64 or t.shape != (f.shape[0],):
        raise InputError(f"a batch item's times must be float64 [{f.shape[0]}] (FeedItem.of validates them)")
    last = it.session._stream.last_time
    if (last is not None and float(t[0]) <= last) or (t.numel() > 1 and not bool((t[1:] > t[:-1]).all())):
        raise InputError(f"stream {it.session.stream_id!r}: times must be strictly increasing and after the "
                         f"stream's last ({last}); got {float(t[0])} .. {float(t[-1])}")


def _sync(device: Any) -> None:
    if device is not None and getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)
