"""The offline side of MuKV: frames in, compressed blocks of every level stored.

For each level the :class:`LevelPipeline` holds its resolved components
(extractor split, scorer, compressor). :class:`Ingestor` keeps the encoded
frames that some level has not consumed yet and, when a feed completes
windows, runs each level batched:

    windows -> blocks [B, L, E] -> prefill (one pass per batch, sdpa, last-layer
    column sums) -> scores [B, L] -> kept [B, K] -> KV gather [B, Y, 2, H, K, D]
    + vectors [B, V] -> backend.add

A level with a ``local_window`` (ReKV's sliding-window encoding) prefills its
blocks in stream order instead, each after the window of blocks before it
(:func:`mukv.local_window.prefill_window`); the window's KV stays here between feeds
and, when a stored stream is reopened, is read back from the store (levels that
keep every token). A level with ``layer_keys`` also stores each block's
per-layer mean key (RoPE removed) for per-layer retrieval.

The three steps of a level are functions of a batch of blocks (:class:`WindowRows` in,
:func:`prefill_rows`, :func:`compress_blocks`), so that one batch may gather the windows of
several streams (:mod:`mukv.batching`) and split the compressed blocks back per stream: a
block's KV, scores and kept tokens depend on its own tokens only, never on its batch. A
windowed level depends on its stream's window, so it is never batched across streams.

Bookkeeping (cursors, times) stays here; byte movement is in the backend.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Iterator

import torch

from .blocks import CompressedBlocks, PrefilledBlocks
from .config import LevelConfig, MukvConfig
from .interfaces import Compressor, StorageBackend, TokenScorer
from .model import HFVideoLLM, PrefixKV


@dataclass
class LevelPipeline:
    """A level with its components resolved for one model.

    Attributes:
        level: the level's configuration.
        split: ``LongTensor[n_blocks, L]`` token indices of each block in a window.
        scorer: token scorer.
        compressor: compressor.
        kept: K, tokens kept per block.
    """

    level: LevelConfig
    split: torch.Tensor
    scorer: TokenScorer
    compressor: Compressor
    kept: int

    @property
    def block_len(self) -> int:
        return self.split.shape[1]

    @cached_property
    def is_identity_split(self) -> bool:
        """Whether the blocks are consecutive runs of the window's tokens (frame,
        segment and raster-patch levels), so that cutting them is a view."""
        n = self.split.numel()
        return bool(torch.equal(self.split.reshape(-1), torch.arange(n, device=self.split.device)))

    @property
    def needs_attention(self) -> bool:
        return self.kept < self.block_len and getattr(self.scorer, "needs_attention", False)

    def split_on(self, device: torch.device) -> torch.Tensor:
        """:attr:`split` on ``device``, copied there once (a copy from host memory per window cut
        would wait for the device each time)."""
        if self.split.device == device:
            return self.split
        cache = self.__dict__.setdefault("_split_on", {})
        got = cache.get(device)
        if got is None or got[0] is not self.split:  # (the split copied, its copy): a new split is copied again
            got = cache[device] = (self.split, self.split.to(device))
        return got[1]


@dataclass
class WindowRows:
    """The blocks of whole windows of one level, cut from a stream's encoded frames: the input
    of one batched prefill. Rows of several streams concatenate (:meth:`cat`).

    Attributes:
        embeds: ``[B, L, E]`` input embeddings of each block's tokens.
        token_index: ``[B, L]`` each token's index in its window (frame-major).
        frame_start: ``[B]`` the stream's index of each block's first frame (int64).
        t_start: ``[B]`` stream time of each block's first frame (float64).
        t_end: ``[B]`` stream time of each block's last frame (float64).
    """

    embeds: torch.Tensor
    token_index: torch.Tensor
    frame_start: torch.Tensor
    t_start: torch.Tensor
    t_end: torch.Tensor

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    @staticmethod
    def cat(parts: "list[WindowRows]") -> "WindowRows":
        """The rows of ``parts`` one after the other (a single part is returned as it is)."""
        if len(parts) == 1:
            return parts[0]
        return WindowRows(*(torch.cat([getattr(p, f) for p in parts]) for f in
                            ("embeds", "token_index", "frame_start", "t_start", "t_end")))


def prefill_rows(model: HFVideoLLM, prefix: PrefixKV, lp: LevelPipeline, rows: WindowRows) -> PrefilledBlocks:
    """One batched prefill of ``rows`` (blocks of level ``lp``) after the system prompt ``prefix``:
    every block attends to the prompt and causally to itself only, so a block's KV and column
    sums do not depend on the other rows of the batch."""
    kv, attention, positions = model.prefill_blocks(prefix, rows.embeds, attention=lp.needs_attention,
                                                    token_index=rows.token_index)
    b = len(rows)
    frames = lp.level.frames
    return PrefilledBlocks(
        level=lp.level, kv=kv, attention=attention, token_index=rows.token_index,
        frame_start=rows.frame_start, frame_end=rows.frame_start + frames,
        positions=positions.expand(b, -1), grid=model.grid,
    )


@contextmanager
def _no_stage(name: str) -> Iterator[None]:
    yield


def compress_blocks(lp: LevelPipeline, blocks: PrefilledBlocks, t_start: torch.Tensor, t_end: torch.Tensor,
                    stage: Callable[[str], Any] = _no_stage, model: HFVideoLLM | None = None) -> CompressedBlocks:
    """Score and compress prefilled blocks of level ``lp``: ``[B, L]`` scores, ``[B, K]`` kept tokens,
    the KV gathered into the stored layout ``[B, Y, 2, H, K, D]`` and ``[B, V]`` vectors. Every step
    is per block (a scorer scores a block from its own KV and attention).

    Args:
        t_start, t_end: ``[B]`` stream times of each block's first and last frame (float64).
        stage: a context manager factory timing the "score" and "compress" stages.
        model: the model (needed by a level with ``layer_keys``: each block's per-layer mean keys
            without RoPE).

    Raises:
        RuntimeError: a scorer or compressor returned the wrong shape.
    """
    b, length = blocks.num_blocks, blocks.block_len
    device = blocks.kv.device
    with stage("score"):
        if lp.kept >= length:
            kept = torch.arange(length, device=device).expand(b, -1)
            scores = None
        else:
            scores = lp.scorer.score(blocks)
            if scores.shape != (b, length):
                raise RuntimeError(
                    f"scorer for level {lp.level.name!r} returned shape {tuple(scores.shape)}; expected {(b, length)}"
                )
    with stage("compress"):
        if scores is not None:
            kept = lp.compressor.select(blocks, scores.to(device))
            if kept.shape != (b, lp.kept):
                raise RuntimeError(
                    f"compressor returned shape {tuple(kept.shape)} for level {lp.level.name!r}; "
                    f"expected {(b, lp.kept)}"
                )
        kept = kept.to(device)
        y, _, _, h, _, d = blocks.kv.shape
        # one gather over every layer, straight into the stored layout:
        # [Y, 2, B, H, L, D] viewed as [B, Y, 2, H, L, D] -> [B, Y, 2, H, K, D], contiguous
        idx = kept[:, None, None, None, :, None].expand(b, y, 2, h, lp.kept, d)
        kv = torch.gather(blocks.kv.permute(2, 0, 1, 3, 4, 5), 4, idx)
        last_keys = kv[:, -1, 0]  # [B, H, K, D]
        vectors = last_keys.float().mean(dim=2).reshape(b, h * d)  # mean over kept tokens, flattened over heads
    positions = blocks.positions.to(device).gather(1, kept)
    layer_keys = None
    if lp.level.layer_keys:
        if model is None:
            raise RuntimeError(f"level {lp.level.name!r} stores per-layer keys: compress_blocks needs the model")
        from .local_window import unrotated_mean_keys

        layer_keys = unrotated_mean_keys(model, kv, positions)
    return CompressedBlocks(
        level=lp.level.name, kv=kv, vectors=vectors, kept=kept, positions=positions,
        frame_start=blocks.frame_start, frame_end=blocks.frame_end,
        t_start=t_start, t_end=t_end,
        token_index=blocks.token_index.to(device).gather(1, kept),
        layer_keys=layer_keys,
    )


class Ingestor:
    """Turns a growing sequence of encoded frames into stored blocks.

    Args:
        model: the model adapter.
        prefix: the system prompt's KV.
        levels: resolved levels.
        backend: the store.
        config: session configuration.
    """

    def __init__(self, model: HFVideoLLM, prefix: PrefixKV, levels: list[LevelPipeline], backend: StorageBackend,
                 config: MukvConfig, start_frame: int = 0, cursors: dict[str, int] | None = None,
                 pending: "tuple[int, torch.Tensor, torch.Tensor] | None" = None):
        self.model = model
        self.prefix = prefix
        self.levels = levels
        self.backend = backend
        self.config = config
        self.frames_seen = start_frame
        self.cursor = {lp.level.name: start_frame for lp in levels}
        #: Frames a level never covered: when a stream is reopened, the encoded
        #: frames of an unfinished window (e.g. 3 of a segment's 4) are gone, so
        #: that level resumes at the next frame fed.
        self.uncovered = {lp.level.name: 0 for lp in levels}
        self._pending = None  # [n, T, E] encoded frames from frame index self._pending_start
        self._pending_start = start_frame
        self._times = torch.empty(0, dtype=torch.float64)  # times of frames from self._times_start
        self._times_start = start_frame
        # the encoded frames a stored stream had not consumed at every level (see pending_frames())
        if pending is not None and pending[0] + pending[1].shape[0] == start_frame and pending[1].shape[0]:
            self._pending_start, self._pending, self._times = pending[0], pending[1], pending[2].to(torch.float64)
            self._times_start = pending[0]
        for name, cur in (cursors or {}).items():
            if name in self.cursor:
                cur = int(cur)
                if self._pending is not None and cur >= self._pending_start:
                    self.cursor[name] = cur  # resumes exactly: its frames are pending
                else:
                    self.uncovered[name] = max(0, start_frame - cur)
                    self.cursor[name] = max(cur, start_frame)
        if self._pending is not None:  # levels without a cursor start at the first pending frame
            for name in self.cursor:
                if name not in (cursors or {}):
                    self.cursor[name] = self._pending_start
            self.trim()
        self.on_stored: Callable[[CompressedBlocks], None] | None = None
        #: Set to a dict to time the stages ("prefill", "score", "compress",
        #: "store") in seconds, summed over calls. Each timed stage ends with a
        #: device synchronisation, so leave it ``None`` when throughput matters.
        self.stage_times: dict[str, float] | None = None
        #: per windowed level: the KV of the blocks the next block attends to
        self._window: dict[str, object] = {}

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        times = self.stage_times
        if times is None:
            yield
            return
        _sync(self.model.device)
        t0 = time.perf_counter()
        yield
        _sync(self.model.device)
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------------------
    def add_frames(self, embeds: torch.Tensor, times: torch.Tensor) -> int:
        """Append encoded frames ``[n, T, E]`` with their times ``[n]`` and store
        every block they complete. Returns the number of blocks stored."""
        self.append(embeds, times)
        stored = 0
        for lp in self.levels:
            stored += self.run_level(lp)
        self.trim()
        return stored

    def append(self, embeds: torch.Tensor, times: torch.Tensor) -> None:
        """Append encoded frames ``[n, T, E]`` with their times ``[n]`` (no block is made yet:
        :meth:`ready_windows`, :meth:`window_rows` and :meth:`store` do that, then :meth:`trim`)."""
        if self._pending is None:
            self._pending = embeds
        else:
            self._pending = torch.cat([self._pending, embeds])
        self._times = torch.cat([self._times, times.to(torch.float64)])
        self.frames_seen += embeds.shape[0]

    def ready_windows(self, lp: LevelPipeline) -> int:
        """Whole windows of level ``lp`` its pending frames complete (from its cursor on)."""
        return max(0, (self.frames_seen - self.cursor[lp.level.name]) // lp.level.frames)

    def store(self, lp: LevelPipeline, blocks: CompressedBlocks, windows: int) -> None:
        """Add the compressed blocks of the next ``windows`` windows of level ``lp`` to the backend
        (inside the stream's transaction) and move the level's cursor past them."""
        with self._stage("store"):
            dev = getattr(self.backend, "metadata_device", None)
            if isinstance(dev, torch.device) and blocks.frame_start.device != dev:
                blocks = blocks.with_metadata_on(dev)  # no device wait per column (see to_device)
            self.backend.add(blocks)
        if self.on_stored is not None:
            self.on_stored(blocks)
        self.cursor[lp.level.name] += windows * lp.level.frames

    # -- transactions ------------------------------------------------------------------
    def snapshot(self) -> tuple:
        """Everything :meth:`add_frames` changes, to :meth:`restore` if its transaction fails
        (tensors are never changed in place, so references suffice)."""
        return (self.frames_seen, dict(self.cursor), dict(self.uncovered), self._pending, self._pending_start,
                self._times, self._times_start)

    def restore(self, snap: tuple) -> None:
        (self.frames_seen, cursor, uncovered, self._pending, self._pending_start, self._times,
         self._times_start) = snap
        self.cursor, self.uncovered = dict(cursor), dict(uncovered)
        # a windowed level's encoder may have moved past what the store holds: it reads its window back
        # from the store (what was committed) at its next use
        self._window.clear()

    def pending_frames(self) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """``(first index, embeds [n, T, E], times [n])`` of the frames some level has not consumed
        (``None`` if every level is caught up)."""
        low = min(self.cursor.values()) if self.cursor else self.frames_seen
        n = self.frames_seen - low
        if n <= 0 or self._pending is None:
            return None
        off = low - self._pending_start
        emb = self._pending[off : off + n]
        toff = low - self._times_start
        return low, emb, self._times[toff : toff + n]

    def time_of(self, frames: torch.Tensor) -> torch.Tensor:
        """Stream times of global frame indices (float64)."""
        return self._times[(frames - self._times_start).clamp_min(0)]

    def last_time(self) -> float | None:
        return float(self._times[-1]) if self._times.numel() else None

    def trim(self) -> None:
        """Forget the encoded frames every level has consumed (keeping the newest frame's time)."""
        low = min(self.cursor.values())
        drop = low - self._pending_start
        if drop > 0 and self._pending is not None:
            self._pending = self._pending[drop:]
            self._pending_start = low
        # keep times of frames still pending, plus the newest one (for timestamps)
        keep_from = min(low, self.frames_seen - 1)
        tdrop = keep_from - self._times_start
        if tdrop > 0:
            self._times = self._times[tdrop:]
            self._times_start = keep_from

    def run_level(self, lp: LevelPipeline) -> int:
        """Prefill, compress and store every whole window of level ``lp`` its pending frames complete,
        this stream alone (in batches of ``prefill_batch_tokens``; a windowed level one window per
        forward). Returns the number of blocks stored."""
        windows = self.ready_windows(lp)
        if windows <= 0:
            return 0
        per_window = lp.split.shape[0]
        # one batch = whole windows, at most prefill_batch_tokens tokens (at least one window)
        wb = max(1, self.config.stream.prefill_batch_tokens // max(1, per_window * lp.block_len))
        stored = 0
        done = 0
        while done < windows:
            # a windowed level: one window per forward, so that every block is laid out the same way
            # (system prompt, its window, itself) however the frames were fed
            nw = 1 if lp.level.local_window else min(wb, windows - done)
            done += nw
            rows = self.window_rows(lp, self.cursor[lp.level.name], nw)
            with self._stage("prefill"):
                blocks = self._prefill(lp, rows)
            compressed = compress_blocks(lp, blocks, rows.t_start, rows.t_end, self._stage, self.model)
            self.store(lp, compressed, nw)
            stored += len(compressed)
        return stored

    def _window_of(self, lp: LevelPipeline):
        """The level's :class:`~mukv.local_window.WindowEncoder`; after a reopened stream, its window is read
        back from the store (only where blocks keep every token: a compressed block cannot stand for
        its tokens; otherwise the window starts empty)."""
        from .local_window import WindowEncoder

        name = lp.level.name
        enc = self._window.get(name)
        if enc is not None:
            return enc
        enc = WindowEncoder(self.model, self.prefix, lp.level.local_window, lp.block_len, lp.split.shape[0])
        stored = self.backend.count(name)
        if stored and lp.kept == lp.block_len:
            ids = torch.arange(max(0, stored - lp.level.local_window), stored)
            enc.restore(self.backend.load_kv(name, ids).to(self.model.device),
                        self.backend.positions(name, ids).to(self.model.device))
        self._window[name] = enc
        return enc

    def _prefill(self, lp: LevelPipeline, rows: WindowRows) -> PrefilledBlocks:
        """:func:`prefill_rows`, or for a windowed level its encoder (each block after its window)."""
        if not lp.level.local_window:
            return prefill_rows(self.model, self.prefix, lp, rows)
        kv, attention, positions = self._window_of(lp).encode(rows.embeds, rows.token_index,
                                                              attention=lp.needs_attention)
        b = len(rows)
        return PrefilledBlocks(
            level=lp.level, kv=kv, attention=attention, token_index=rows.token_index,
            frame_start=rows.frame_start, frame_end=rows.frame_start + lp.level.frames,
            positions=positions.expand(b, -1), grid=self.model.grid,
        )

    def window_rows(self, lp: LevelPipeline, first: int, nw: int) -> WindowRows:
        """The blocks of ``nw`` windows of level ``lp`` from frame ``first`` on (pending frames), cut
        by the level's split: ``B = nw * blocks per window`` rows."""
        frames, tpf = lp.level.frames, self.model.tokens_per_frame
        off = first - self._pending_start
        window_tokens = self._pending[off : off + nw * frames].reshape(nw, frames * tpf, -1)  # [nw, F*T, E]
        split = lp.split_on(window_tokens.device)
        per_window = split.shape[0]
        if lp.is_identity_split and per_window * lp.block_len == frames * tpf:  # consecutive runs: a view, no copy
            embeds = window_tokens.reshape(nw * per_window, lp.block_len, -1)  # [B, L, E]
        else:
            embeds = window_tokens[:, split].reshape(nw * per_window, lp.block_len, -1)  # [B, L, E]
        token_index = split.repeat(nw, 1)  # [B, L]
        start = torch.arange(nw).repeat_interleave(per_window) * frames + first
        return WindowRows(embeds, token_index, start, self.time_of(start), self.time_of(start + frames - 1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
