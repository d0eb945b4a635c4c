"""The interfaces every component implements: one abstract method each.

=====================  ==========================================  ===================
role                   abstract method                             registered by hook
=====================  ==========================================  ===================
GranularityExtractor   ``split(level, grid) -> [n_blocks, L]``     mukv_register_extractors
TokenScorer            ``score(blocks) -> [B, L]``                 mukv_register_scorers
Compressor             ``select(blocks, scores) -> [B, K]``        mukv_register_compressors
Retriever              ``retrieve(query, index, top_k) -> hits``   mukv_register_retrievers
ModelAdapter           ``encode_frames(frames) -> [n, T, E]``      mukv_register_models
StorageBackend         see its docstring (a store has a few)       mukv_register_backends
=====================  ==========================================  ===================

Everything else a component needs is derived in these base classes. Shapes
follow :mod:`mukv.blocks`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import torch

from .blocks import CompressedBlocks, Hits, PrefilledBlocks, Query
from .config import LevelConfig, MukvConfig
from .errors import singular

if TYPE_CHECKING:  # pragma: no cover
    pass


class Component(ABC):
    """Base of every registered component class."""

    @classmethod
    def from_config(cls, config: MukvConfig) -> "Component":
        """Build the component for a session. The default calls ``cls()``;
        override to read options from the configuration."""
        return cls()


# --------------------------------------------------------------------------- extractors
class GranularityExtractor(Component):
    """Cuts a window of ``level.frames`` frames into the blocks of one level."""

    @abstractmethod
    def split(self, level: LevelConfig, grid: tuple[int, int]) -> torch.Tensor:
        """Token indices of each block of a window.

        Args:
            level: the level (``level.frames`` frames per window, ``level.tokens``
                tokens per block inside one frame, if set).
            grid: ``(h, w)``, the frame's visual tokens as a raster grid;
                ``T = h * w`` tokens per frame.

        Returns:
            ``LongTensor[n_blocks, L]`` of indices into the window's
            ``level.frames * T`` tokens (frame-major, raster order in a frame).
            Every block has the same length ``L``; the indices of one block are
            ascending (time order).
        """


# --------------------------------------------------------------------------- scorers
class TokenScorer(Component):
    """Scores every token of a batch of prefilled blocks; higher means keep."""

    @abstractmethod
    def score(self, blocks: PrefilledBlocks) -> torch.Tensor:
        """Return ``Tensor[B, L]`` of token scores (any scale; higher = keep).

        Args:
            blocks: ``blocks.keys`` is ``[B, H, L, D]`` (last layer),
                ``blocks.attention`` ``[B, L]`` or ``None``, ``blocks.kv`` every layer.
        """


class FunctionScorer(TokenScorer):
    """Wraps a plain function ``f(blocks) -> Tensor[B, L]`` as a scorer."""

    def __init__(self, fn: Callable[[PrefilledBlocks], torch.Tensor]):
        self.fn = fn

    def score(self, blocks: PrefilledBlocks) -> torch.Tensor:
        return self.fn(blocks)


def minmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Min-max normalise along ``dim`` to [0, 1] (a constant row becomes zeros)."""
    x = x.float()
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


# --------------------------------------------------------------------------- compressors
class Compressor(Component):
    """Chooses which tokens of each block to keep, given their scores."""

    @abstractmethod
    def select(self, blocks: PrefilledBlocks, scores: torch.Tensor) -> torch.Tensor:
        """Return ``LongTensor[B, K]``: kept token indices per block, ascending.

        ``K`` must equal :meth:`kept_count` ``(blocks.level, blocks.block_len)``
        so that every block of a level has the same compressed size.
        """

    @staticmethod
    def kept_count(level: LevelConfig, block_len: int) -> int:
        """K = floor(L * keep_ratio), at least 1 and at most L."""
        return max(1, min(block_len, math.floor(block_len * level.keep_ratio + 1e-9)))


# --------------------------------------------------------------------------- storage
@dataclass
class BlockMeta:
    """Metadata of some blocks of one level, as ``[n]`` tensors."""

    frame_start: torch.Tensor
    frame_end: torch.Tensor
    t_start: torch.Tensor
    t_end: torch.Tensor


class BlockIndex(ABC):
    """The read side of a store, as retrievers see it.

    Block ids are per level, assigned in storage order (0, 1, 2 ...), which is
    also stream-time order.
    """

    @abstractmethod
    def count(self, level: str) -> int:
        """Blocks stored for ``level``."""

    @abstractmethod
    def search(
        self, level: str, query: torch.Tensor, k: int, within: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine-similarity search.

        Args:
            level: level name.
            query: ``[V]`` query vector.
            k: maximum number of results (fewer if fewer blocks qualify).
            within: optional ``LongTensor[R, 2]`` of frame ranges ``[start, end)``;
                only blocks lying inside one of them are searched.

        Returns:
            ``(ids [k'], scores [k'])``, best first.
        """

    @abstractmethod
    def vectors(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        """``[n, V]`` representative vectors of blocks ``ids`` (float32)."""

    @abstractmethod
    def metadata(self, level: str, ids: torch.Tensor) -> BlockMeta:
        """Frame range and time span of blocks ``ids``."""

    def layer_keys(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        """``[n, Y, V]`` each block's mean key in every layer, RoPE removed (float32), for
        levels stored with ``layer_keys``.

        Raises:
            RetrievalError: the level was stored without per-layer keys, or this index keeps none.
        """
        from .errors import RetrievalError

        raise RetrievalError(f"{type(self).__name__} keeps no per-layer keys (level {level!r})")

    def layer_scores(self, level: str, queries: torch.Tensor, chunk: int = 65536,
                     layers: list[int] | None = None) -> torch.Tensor:
        """Inner products of per-layer queries with every stored block's per-layer keys.

        Args:
            level: level name.
            queries: ``[Y', V]`` one query per layer (heads flattened as the keys'): every layer,
                or the ``layers`` named.
            chunk: blocks read at once.
            layers: the layers ``queries`` are for (default: every layer, in order).

        Returns:
            ``[Y', N]`` float32 scores of the ``N`` stored blocks, in id order.
        """
        n = self.count(level)
        q = queries.float()
        out = torch.empty(q.shape[0], n, dtype=torch.float32, device=q.device)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            keys = self.layer_keys(level, torch.arange(a, b)).to(q.device, torch.float32)  # [c, Y, V]
            if layers is not None:
                keys = keys[:, layers]
            out[:, a:b] = torch.einsum("yv,cyv->yc", q, keys)
        return out


class StorageBackend(BlockIndex):
    """Where compressed blocks live: KV, vectors and metadata per level.

    A backend is built with ``cls(layout=KVLayout, path=str | None,
    device=torch.device, **options)``. Besides the :class:`BlockIndex` methods
    it stores (:meth:`add`) and pages in (:meth:`load_kv`). ``add`` of a batch
    is atomic: after an error nothing of the batch is visible and everything
    stored before is intact.
    """

    name: ClassVar[str] = "backend"

    @abstractmethod
    def add(self, blocks: CompressedBlocks) -> torch.Tensor:
        """Store a batch of blocks of one level; return their ids ``[B]``."""

    @abstractmethod
    def load_kv(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        """``[n, Y, 2, H, K, D]`` KV of blocks ``ids`` on the session's device."""

    @abstractmethod
    def positions(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        """``[n, K]`` RoPE positions the stored keys of ``ids`` were rotated with."""

    def token_index(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        """``[n, K]`` kept tokens' index inside their window (for pictures)."""
        raise NotImplementedError(f"{type(self).__name__} does not keep token indices")

    def stats(self) -> dict[str, Any]:
        """Blocks, tokens and bytes held, per level."""
        return {}

    def set_state(self, key: str, value: Any) -> None:
        """Persist a small JSON-able value of session state (e.g. the frame cursor)."""

    def get_state(self, key: str, default: Any = None) -> Any:
        """Read back a value stored with :meth:`set_state`."""
        return default

    @classmethod
    def peek_state(cls, path: str, stream_id: str, key: str, **options: Any) -> Any:
        """Read a value stored with :meth:`set_state` without opening the store for
        writing (``None`` if the store or the key does not exist). Used by
        ``Session.open`` to learn the model and configuration of a stream.
        ``options`` are the backend options the session was given (e.g. the
        credentials of a remote store)."""
        return None

    def flush(self) -> None:
        """Make everything added so far durable (no-op for memory backends)."""

    def close(self) -> None:
        """Release resources; the backend must not be used afterwards."""


# --------------------------------------------------------------------------- retrievers
class Retriever(Component):
    """Chooses the stored blocks that answer a question."""

    @abstractmethod
    def retrieve(self, query: Query, index: BlockIndex, top_k: dict[str, int]) -> list[Hits]:
        """Return one :class:`Hits` per level with a non-zero budget.

        Args:
            query: the question (its vector ``[V]`` and stream time).
            index: the store's search side.
            top_k: final number of blocks per level, already clamped to what is
                stored.
        """


# --------------------------------------------------------------------------- models
class ModelAdapter(ABC):
    """Connects a Video-LLM to mukv.

    The one abstract method turns frames into visual-token embeddings; the
    language-model side (prefill of blocks after the system prompt, the query
    vector, assembly and greedy decoding) is implemented once for transformers
    decoders in :class:`mukv.model.HFVideoLLM`, which concrete adapters subclass.
    """

    #: ``config.model_type`` values of checkpoints this adapter loads.
    model_types: ClassVar[tuple[str, ...]] = ()

    #: Configuration fields the model was trained or tuned with (e.g. levels sized for its
    #: tokens per frame), read from the checkpoint's ``mukv_config.json`` (:func:`mukv.model.read_model_defaults`).
    #: :class:`mukv.Session` applies them under the policy's and the caller's configuration.
    default_config: dict[str, Any] = {}

    @abstractmethod
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Visual tokens of frames.

        Args:
            frames: ``uint8 [n, H, W, 3]`` RGB frames (any size; the adapter
                resizes and normalises).

        Returns:
            ``[n, T, E]`` input embeddings of the language model (``E`` its
            hidden size), ``T = grid[0] * grid[1]`` tokens per frame in raster order.
        """


# --------------------------------------------------------------------------- tiers
@dataclass
class HotBlocks:
    """Blocks currently in the hot tier, as eviction policies see them (``[n]`` tensors).

    Attributes:
        level: level name of each block (a list of n strings).
        ids: block ids (per level).
        segment: index of the segment window each block belongs to.
        nbytes: bytes each block occupies in the hot tier.
        last_used: a logical clock value of each block's last retrieval (or storage).
        stored_at: the logical clock value when the block was stored.
    """

    level: list[str]
    ids: torch.Tensor
    segment: torch.Tensor
    nbytes: torch.Tensor
    last_used: torch.Tensor
    stored_at: torch.Tensor


class EvictionPolicy(Component):
    """Decides which hot blocks leave fast memory when the budget is exceeded."""

    @abstractmethod
    def victims(self, candidates: HotBlocks, need_bytes: int) -> torch.Tensor:
        """Return ``LongTensor[m]``: positions in ``candidates`` to evict, in
        eviction order, freeing at least ``need_bytes`` if possible."""


class VectorIndex(ABC):
    """A nearest-neighbour index over block vectors (cosine similarity).

    Built as ``cls(dim=V, device=...)``. :meth:`add` appends vectors whose ids
    are their insertion order; :meth:`search` is the one method subclasses must
    make fast.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = dim
        self.device = torch.device(device)

    @abstractmethod
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries [Q, V]`` -> ``(scores [Q, k'], ids [Q, k'])``, best first."""

    def add(self, vectors: torch.Tensor) -> None:
        """Append ``[n, V]`` vectors (ids continue from the current size)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return 0


# --------------------------------------------------------------------------- sources
class FrameSource(ABC):
    """A live or recorded source of frames, read in chunks."""

    @abstractmethod
    def chunks(self) -> "Iterator[tuple[torch.Tensor, torch.Tensor]]":
        """Yield ``(frames uint8 [n, H, W, 3], times [n] seconds, float64)`` until the
        source ends (a camera may never end)."""


def build_component(role: str, component: Any, config: MukvConfig, base: type[Component]) -> Any:
    """Turn a registered component (class, instance or function) into an object."""
    if isinstance(component, type):
        if not issubclass(component, base):
            raise TypeError(f"registered {singular(role)} {component!r} is not a subclass of {base.__name__}")
        return component.from_config(config)
    if isinstance(component, base):
        return component
    if base is TokenScorer and callable(component):
        return FunctionScorer(component)
    raise TypeError(f"registered {singular(role)} {component!r} is neither a {base.__name__} subclass nor an instance")
