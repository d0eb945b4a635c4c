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

Bookkeeping (cursors, times) stays here; byte movement is in the backend.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterator

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
            self._trim()
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
        if self._pending is None:
            self._pending = embeds
        else:
            self._pending = torch.cat([self._pending, embeds])
        self._times = torch.cat([self._times, times.to(torch.float64)])
        self.frames_seen += embeds.shape[0]
        stored = 0
        for lp in self.levels:
            stored += self._run_level(lp)
        self._trim()
        return stored

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

    def _trim(self) -> None:
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

    def _run_level(self, lp: LevelPipeline) -> int:
        name, frames = lp.level.name, lp.level.frames
        windows = (self.frames_seen - self.cursor[name]) // frames
        if windows <= 0:
            return 0
        per_window = lp.split.shape[0]
        # one batch = whole windows, at most prefill_batch_tokens tokens (at least one window)
        wb = max(1, self.config.stream.prefill_batch_tokens // max(1, per_window * lp.block_len))
        stored = 0
        done = 0
        while done < windows:
            first = self.cursor[name]
            # a windowed level: one window per forward, so that every block is laid out the same way
            # (system prompt, its window, itself) however the frames were fed
            nw = 1 if lp.level.local_window else min(wb, windows - done)
            done += nw
            with self._stage("prefill"):
                blocks = self._prefill(lp, first, nw)
            compressed = self._compress(lp, blocks)
            with self._stage("store"):
                self.backend.add(compressed)
            if self.on_stored is not None:
                self.on_stored(compressed)
            self.cursor[name] = first + nw * frames
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

    def _prefill(self, lp: LevelPipeline, first: int, nw: int) -> PrefilledBlocks:
        frames, tpf = lp.level.frames, self.model.tokens_per_frame
        off = first - self._pending_start
        window_tokens = self._pending[off : off + nw * frames].reshape(nw, frames * tpf, -1)  # [nw, F*T, E]
        split = lp.split.to(window_tokens.device)
        per_window = split.shape[0]
        if lp.is_identity_split and per_window * lp.block_len == frames * tpf:  # consecutive runs: a view, no copy
            embeds = window_tokens.reshape(nw * per_window, lp.block_len, -1)  # [B, L, E]
        else:
            embeds = window_tokens[:, split].reshape(nw * per_window, lp.block_len, -1)  # [B, L, E]
        token_index = split.repeat(nw, 1)  # [B, L]
        if lp.level.local_window:
            kv, attention, positions = self._window_of(lp).encode(embeds, token_index, attention=lp.needs_attention)
        else:
            kv, attention, positions = self.model.prefill_blocks(self.prefix, embeds, attention=lp.needs_attention,
                                                                 token_index=token_index)
        start = torch.arange(nw).repeat_interleave(per_window) * frames + first
        b = embeds.shape[0]
        return PrefilledBlocks(
            level=lp.level, kv=kv, attention=attention,
            token_index=token_index, frame_start=start, frame_end=start + frames,
            positions=positions.expand(b, -1), grid=self.model.grid,
        )

    def _compress(self, lp: LevelPipeline, blocks: PrefilledBlocks) -> CompressedBlocks:
        b, length = blocks.num_blocks, blocks.block_len
        device = blocks.kv.device
        with self._stage("score"):
            if lp.kept >= length:
                kept = torch.arange(length, device=device).expand(b, -1)
                scores = None
            else:
                scores = lp.scorer.score(blocks)
                if scores.shape != (b, length):
                    raise RuntimeError(
                        f"scorer for level {lp.level.name!r} returned shape {tuple(scores.shape)}; expected {(b, length)}"
                    )
        with self._stage("compress"):
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
        frame_start = blocks.frame_start
        frame_end = blocks.frame_end
        positions = blocks.positions.to(device).gather(1, kept)
        layer_keys = None
        if lp.level.layer_keys:
            from .local_window import unrotated_mean_keys

            layer_keys = unrotated_mean_keys(self.model, kv, positions)
        return CompressedBlocks(
            level=lp.level.name, kv=kv, vectors=vectors, kept=kept,
            positions=positions,
            frame_start=frame_start, frame_end=frame_end,
            t_start=self.time_of(frame_start), t_end=self.time_of(frame_end - 1),
            token_index=blocks.token_index.to(device).gather(1, kept),
            layer_keys=layer_keys,
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
