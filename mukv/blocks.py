"""The data that flows through the pipeline, one batch of blocks at a time.

Shape letters used throughout mukv:

* ``B`` blocks in a batch, ``L`` tokens per block before compression,
  ``K`` tokens per block after compression,
* ``Y`` layers of the language model, ``H`` key/value heads, ``D`` head dim,
* ``P`` tokens of the system prompt, ``V`` = ``H * D`` (vector dimension).

KV tensors are laid out ``[Y, 2, B, H, L, D]`` during ingest (``2`` = keys,
values) and ``[B, Y, 2, H, K, D]`` once stored (one contiguous row per block).
Keys are stored with RoPE already applied, at the positions recorded in
``positions``: one int64 position code per token, the position itself for 1D
RoPE, a packed ``(origin, dt, h, w)`` for M-RoPE models (see :mod:`mukv.rope`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .config import LevelConfig


#: Small host tensors (a batch's frame and time columns) go to a GPU through pinned memory,
#: without the device synchronisation a copy from pageable memory makes; switched off only to
#: measure what it saves (``benchmarks/accel_bench.py --ablate-async-metadata``).
ASYNC_METADATA = True


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. A host tensor bound for a CUDA device is copied from pinned memory
    without blocking: a copy from pageable memory waits for every kernel queued before it, so one
    per column and batch leaves the GPU idle while the host catches up. The pinned buffer is held
    by PyTorch's host allocator until the copy has run."""
    device = torch.device(device)
    if ASYNC_METADATA and t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class KVLayout:
    """Shape of a model's KV cache: what a backend needs to allocate storage.

    Attributes:
        num_layers: Y, decoder layers.
        num_kv_heads: H, key/value heads per layer.
        head_dim: D.
        dtype: storage dtype of keys and values.
        model_id: a string identifying the model family and shape; a store
            written with one layout refuses to open with another.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    model_id: str = ""

    @property
    def vector_dim(self) -> int:
        """V = H * D, dimension of block and query vectors."""
        return self.num_kv_heads * self.head_dim

    def token_bytes(self) -> int:
        """Bytes of KV per token over all layers (keys and values)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class PrefilledBlocks:
    """A batch of blocks of one level after the language model ran over them.

    Attributes:
        level: the level's configuration.
        kv: ``[Y, 2, B, H, L, D]`` keys and values of every layer (RoPE applied).
        attention: ``[B, L]`` attention each token receives from the block's own
            queries in the last layer, averaged over heads and summed over queries
            (system-prompt columns dropped); ``None`` if not computed.
        token_index: ``[B, L]`` index of each token inside its window of
            ``level.frames`` frames (frame-major, raster order within a frame).
        frame_start: ``[B]`` global index of the first frame of each block.
        frame_end: ``[B]`` one past the last frame of each block.
        positions: ``[B, L]`` position codes the keys were rotated with (1D RoPE:
            the positions; M-RoPE: see :mod:`mukv.rope`).
        grid: ``(h, w)`` visual tokens per frame as a grid.
    """

    level: LevelConfig
    kv: torch.Tensor
    attention: torch.Tensor | None
    token_index: torch.Tensor
    frame_start: torch.Tensor
    frame_end: torch.Tensor
    positions: torch.Tensor
    grid: tuple[int, int]

    @property
    def keys(self) -> torch.Tensor:
        """``[B, H, L, D]`` last-layer keys (a view)."""
        return self.kv[-1, 0]

    @property
    def num_blocks(self) -> int:
        """B."""
        return self.kv.shape[2]

    @property
    def block_len(self) -> int:
        """L."""
        return self.kv.shape[4]


@dataclass
class CompressedBlocks:
    """A batch of compressed blocks of one level, ready to be stored.

    Attributes:
        level: name of the level.
        kv: ``[B, Y, 2, H, K, D]`` kept keys and values, contiguous.
        vectors: ``[B, V]`` representative vector of each block (mean of kept
            last-layer keys, flattened over heads), float32.
        kept: ``[B, K]`` kept token indices inside the block, ascending.
        positions: ``[B, K]`` position codes of the kept keys (see :mod:`mukv.rope`).
        frame_start: ``[B]`` first frame of each block (global index).
        frame_end: ``[B]`` one past the last frame.
        t_start: ``[B]`` stream time (seconds) of the first frame, float64.
        t_end: ``[B]`` stream time of the last frame, float64.
        token_index: ``[B, K]`` kept tokens' index inside the block's window
            (frame-major), so a kept token maps back to a frame and a grid cell.
        layer_keys: ``[B, Y, V]`` each block's mean kept key in every layer, RoPE removed,
            float32 (only for levels with ``layer_keys``; else ``None``).
        finite: ``True`` when whoever made the batch has checked every value of ``kv`` finite
            (the cross-stream ingest batch checks a whole batch with one device synchronisation);
            a backend storing ``kv`` unconverted may then skip its own check. ``False`` (the
            default) asks every backend to check.
    """

    level: str
    kv: torch.Tensor
    vectors: torch.Tensor
    kept: torch.Tensor
    positions: torch.Tensor
    frame_start: torch.Tensor
    frame_end: torch.Tensor
    t_start: torch.Tensor
    t_end: torch.Tensor
    token_index: torch.Tensor
    layer_keys: torch.Tensor | None = None
    finite: bool = False

    def __len__(self) -> int:
        return self.kv.shape[0]

    def with_metadata_on(self, device: torch.device) -> "CompressedBlocks":
        """The same blocks with ``frame_start``, ``frame_end``, ``t_start`` and ``t_end`` on ``device``
        (the other tensors shared). From host to a GPU the four columns go through pinned memory
        without waiting for the device (:func:`to_device`)."""
        moved = {f: to_device(getattr(self, f), device) for f in ("frame_start", "frame_end", "t_start", "t_end")}
        return replace(self, **moved)

    def rows(self, start: int, end: int, level: str | None = None) -> "CompressedBlocks":
        """Blocks ``start .. end - 1`` of the batch (views), optionally under another level name: how a
        batch gathered from several streams is split back per stream."""
        return CompressedBlocks(
            level=self.level if level is None else level,
            **{f: getattr(self, f)[start:end] for f in ("kv", "vectors", "kept", "positions", "frame_start",
                                                         "frame_end", "t_start", "t_end", "token_index")},
            layer_keys=None if self.layer_keys is None else self.layer_keys[start:end],
            finite=self.finite,
        )


@dataclass
class EncodedKV:
    """A batch of blocks of one level as a KV codec stores them: one row per block.

    What a backend stores, checksums and pages in is ``rows``; only the
    codec that made it (:class:`mukv.interfaces.KVCodec`) reads inside a row.

    Attributes:
        rows: ``[B, *row_shape]``, one C-contiguous row per block: ``uint8 [B, S]``
            for the quantising codecs (payload and scales side by side, see each
            codec's byte layout), the KV itself ``[B, Y, 2, H, K, D]`` for "none".
        block_shape: ``(Y, 2, H, K, D)``, the shape of one decoded block.
        dtype: the dtype of the decoded KV (the model's KV dtype).
    """

    rows: torch.Tensor
    block_shape: tuple[int, ...]
    dtype: torch.dtype

    def __len__(self) -> int:
        return self.rows.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes stored for the batch."""
        return self.rows.numel() * self.rows.element_size()

    def with_rows(self, rows: torch.Tensor) -> "EncodedKV":
        """The same kind of rows (e.g. a subset, or a copy on another device)."""
        return EncodedKV(rows, self.block_shape, self.dtype)


@dataclass
class Hits:
    """Blocks of one level chosen by a retriever.

    Every layer of the model reads the same blocks, unless ``layer_ids`` says which
    blocks each layer reads (per-layer retrieval, ReKV's): then ``ids`` are the blocks
    read by any layer (paged in once) and each layer's context holds its own.

    Attributes:
        level: level name.
        ids: ``[k]`` block ids (per-level, in storage order), int64.
        scores: ``[k]`` retrieval scores (higher = better), float32, sorted descending.
        layer_ids: ``[Y, k']`` the block ids each layer reads (every row the same length,
            each id among ``ids``), or ``None``: every layer reads ``ids``.
    """

    level: str
    ids: torch.Tensor
    scores: torch.Tensor
    layer_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.ids.numel())


@dataclass
class Query:
    """A question, as the retriever sees it.

    Attributes:
        text: the question.
        vector: ``[V]`` last-layer key of the question's final token, float32.
        time: stream time (seconds) when it was asked.
        frames_seen: frames fed before it was asked.
        probe: computes :meth:`layer_queries` (set by the session).
    """

    text: str
    vector: torch.Tensor
    time: float
    frames_seen: int
    probe: "Callable[[], torch.Tensor] | None" = field(default=None, repr=False, compare=False)
    _queries: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def layer_queries(self, choose: "Callable[[int, torch.Tensor], list[Hits]] | None" = None) -> torch.Tensor:
        """``[Y, Hq, n, D]`` the question's queries in every layer, RoPE removed, float32.

        Without ``choose`` the question runs after the system prompt (computed on first use,
        then kept). With ``choose`` it runs through the memory, as ReKV's question pass does:
        at each layer ``choose(layer, queries [Hq, n, D])`` returns that layer's blocks
        (:class:`Hits` of the store's ids), and the question attends to them in that layer
        before the next layer's queries are formed.

        Raises:
            RetrievalError: the query was built without access to the model, or the layers'
                choices hold different numbers of tokens.
        """
        if self.probe is None:
            from .errors import RetrievalError

            raise RetrievalError("this query carries no per-layer queries (built without the model)")
        if choose is not None:
            return self.probe(choose)
        if self._queries is None:
            self._queries = self.probe()
        return self._queries


@dataclass(frozen=True)
class RetrievedBlock:
    """One block used to answer, for the application and for plots."""

    level: str
    block_id: int
    score: float
    frame_start: int
    frame_end: int
    t_start: float
    t_end: float
    tokens: int
    #: ISO 8601 wall-clock times of ``t_start`` / ``t_end`` when the stream keeps a wall-clock origin
    wall_start: str | None = None
    wall_end: str | None = None
    #: share of the model's layers that read this block (1.0 unless retrieval was per layer)
    layer_share: float = 1.0


@dataclass
class Answer:
    """What ``Session.ask`` returns.

    Attributes:
        question: the question asked.
        text: the generated answer.
        blocks: the retrieved blocks, in the order they were assembled.
        kv_tokens: KV tokens in the answer context (system prompt included).
        timings: seconds per stage ("query", "retrieve", "page_in", "prefill",
            "first_token", "generate", "total").
        notes: anything the caller should know (e.g. a top-k clamped to what
            is stored).
        window: ``(since, until)`` stream seconds the question was asked over, if a window was given.
    """

    question: str
    text: str
    blocks: list[RetrievedBlock] = field(default_factory=list)
    kv_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    window: tuple[float | None, float | None] | None = None

    def __str__(self) -> str:
        return self.text

    def levels(self) -> dict[str, int]:
        """Retrieved blocks per level."""
        out: dict[str, int] = {}
        for b in self.blocks:
            out[b.level] = out.get(b.level, 0) + 1
        return out
