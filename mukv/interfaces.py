"""The interfaces every component implements: one abstract method each.

=====================  ===============================================  =========================
role                   abstract method                                  registered by hook
=====================  ===============================================  =========================
GranularityExtractor   ``split(level, grid) -> [n_blocks, L]``          ``mukv_register_extractors``
TokenScorer            ``score(blocks) -> [B, L]``                      ``mukv_register_scorers``
Compressor             ``select(blocks, scores) -> [B, K]``             ``mukv_register_compressors``
Retriever              ``retrieve(query, index, top_k) -> [Hits]``      ``mukv_register_retrievers``
ModelAdapter           ``encode_frames(frames) -> [n, T, E]``           ``mukv_register_models``
StorageBackend         see its docstring (a store has a few)            ``mukv_register_backends``
EvictionPolicy         ``victims(candidates, need_bytes) -> [m]``       ``mukv_register_evictors``
VectorIndex            ``search(queries, k) -> (scores, ids)``          ``mukv_register_indexes``
FrameSource            ``chunks() -> (frames, times), ...``             ``mukv_register_sources``
KVCodec                ``encode(kv)`` / ``decode(encoded)`` (a pair:    ``mukv_register_codecs``
                       the two directions of one format)
=====================  ===============================================  =========================

Everything else a component needs is derived in these base classes. Shapes
follow :mod:`mukv.blocks`. A component that takes settings declares them as a
pydantic model (its ``Settings``, see :mod:`mukv.specs`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import torch
from pydantic import BaseModel

from pydantic import BaseModel, ConfigDict, ValidationError

from .blocks import CompressedBlocks, EncodedKV, Hits, PrefilledBlocks, Query
from .config import LevelConfig, MukvConfig, format_validation_error
from .errors import ConfigError, InputError, singular

if TYPE_CHECKING:  # pragma: no cover
    pass


class Component(ABC):
    """Base of every registered component class.

    A component that takes settings declares them as a pydantic model, its
    ``Settings`` attribute (a :class:`mukv.specs.PluginSettings` subclass with a
    docstring and a default per field); the configuration then selects it as
    ``{"name": NAME, setting: value, ...}`` and the validated values are
    :attr:`settings`.
    """

    #: The component's settings model (``None``: it takes no settings).
    Settings: ClassVar[type[BaseModel] | None] = None

    @classmethod
    def from_config(cls, config: MukvConfig, settings: BaseModel | None = None) -> "Component":
        """Build the component for a session.

        Args:
            config: the session's configuration.
            settings: the validated settings (an instance of :attr:`Settings`), or
                ``None`` when the component declares none.

        The default calls ``cls()`` and attaches ``settings``; override to read
        options from the configuration or to pass the settings to ``__init__``.
        """
        obj = cls()
        if settings is not None:
            obj.settings = settings
        return obj

    @classmethod
    def from_settings(cls, **values: Any) -> "Component":
        """An instance with these settings (the rest at their defaults), built without a
        session configuration: ``KeyNormScorer.from_settings(invert=True)`` can be
        given wherever the configuration names a scorer.

        Raises:
            ConfigError: an invalid setting, or the component takes none.
        """
        from .specs import _accepts_settings, validate_settings

        settings = validate_settings(_role_of(cls), cls.__name__, cls, values, cls.__name__)
        if settings is None:
            return cls.from_config(MukvConfig())
        if _accepts_settings(cls.from_config):
            obj = cls.from_config(MukvConfig(), settings=settings)
        else:  # a from_config written before settings existed
            obj = cls.from_config(MukvConfig())
        obj.settings = settings
        return obj

    @property
    def settings(self) -> Any:
        """The component's validated settings (defaults when it was built without any;
        ``None`` when it declares no :attr:`Settings`)."""
        value = self.__dict__.get("_settings")
        if value is None and self.Settings is not None:
            value = self.Settings()
            self.__dict__["_settings"] = value
        return value

    @settings.setter
    def settings(self, value: Any) -> None:
        self.__dict__["_settings"] = value


def _role_of(cls: type) -> str:
    for base, role in ((GranularityExtractor, "extractors"), (TokenScorer, "scorers"), (Compressor, "compressors"),
                       (Retriever, "retrievers"), (EvictionPolicy, "evictors")):
        if issubclass(cls, base):
            return role
    return "components"


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

    def id_range(self, level: str) -> tuple[int, int]:
        """``[lo, hi)``: the block ids of ``level`` a retriever may choose from. The whole level
        (``(0, count)``), unless the question is asked over a time window
        (:class:`mukv.window.WindowedIndex`); query-independent retrievers (uniform sampling, a
        sliding window) pick inside it, searches are restricted to it already."""
        return 0, self.count(level)

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
    it stores (:meth:`add`) and pages in (:meth:`load_kv`).

    Writing is transactional: a session :meth:`add`-s the batches of every level
    that a feed completes, then calls :meth:`commit` with the stream's state values
    (frames seen, cursors, times), or :meth:`rollback` if anything failed. Readers see
    committed blocks only once the transaction commits; after a rollback nothing of
    the transaction is left and everything committed before is intact. ``add`` of
    one batch is atomic too.
    """

    name: ClassVar[str] = "backend"
    #: Whether the backend keeps streams across processes (a session then also keeps the frames no
    #: level has consumed yet, so a reopened stream continues every level without a gap).
    persistent: ClassVar[bool] = False
    #: Whether the backend opened the stream for reading only (feeds are refused before any work).
    read_only: bool = False

    #: Whether the backend stores KV through a :class:`KVCodec`: it is then built with
    #: ``codec=KVCodec`` (the session's ``kv_codec``), encodes in :meth:`add` and decodes
    #: in :meth:`load_kv`. A backend that leaves it False stores KV as given and is
    #: refused with any codec but "none".
    accepts_codec: ClassVar[bool] = False

    @property
    def metadata_device(self) -> torch.device | None:
        """Where :meth:`add` keeps the blocks' ``frame_start``, ``frame_end``, ``t_start`` and ``t_end``
        (``None``: on the host, the default). A batch of many streams' blocks moves them there once
        for all its streams rather than each backend copying its own few (each copy from host memory
        waits for the device)."""
        return None

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
        """Persist a small JSON-able value of session state now (one :meth:`commit` of that value)."""
        self.commit({key: value})

    def get_state(self, key: str, default: Any = None) -> Any:
        """Read back a value stored with :meth:`set_state` or :meth:`commit`."""
        return self._state_values().get(key, default)

    # -- transactions: a feed is all or nothing ----------------------------------------------
    def commit(self, state: dict[str, Any], files: dict[str, bytes] | None = None) -> None:
        """End a transaction: the blocks :meth:`add`-ed since the last commit, the JSON-able
        ``state`` values and the small ``files`` become visible (and, for a persistent backend,
        durable) together, or none of them does.

        Args:
            state: state values to set (keys not named keep their values).
            files: small files kept with the stream (e.g. the frames some level has not consumed
                yet, thumbnails), by name relative to the stream (``[A-Za-z0-9_.-/]``); ``b""``
                deletes a file. Read back with :meth:`read_file`.

        The base implementation suits backends that keep nothing across processes: it sets the
        values in memory and refuses files.
        """
        if files:
            raise NotImplementedError(f"{type(self).__name__} keeps no files")
        for key, value in state.items():
            self._state_values()[key] = value

    def rollback(self) -> None:
        """Abort the transaction: forget every block :meth:`add`-ed since the last :meth:`commit`
        (their ids are handed out again). Everything committed stays as it was.

        Raises:
            StoreError: the backend cannot roll back (the session then refuses further feeds).
        """
        from .errors import StoreError

        raise StoreError(f"{type(self).__name__} cannot roll back a failed feed; reopen the stream")

    def read_file(self, name: str) -> bytes | None:
        """A file committed with :meth:`commit` (``None`` if there is none)."""
        return None

    def _state_values(self) -> dict[str, Any]:
        if not hasattr(self, "_base_state"):
            self._base_state: dict[str, Any] = {}
        return self._base_state

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


# --------------------------------------------------------------------------- codecs
class CodecSettings(BaseModel):
    """Settings of a codec that takes none; a codec with settings subclasses it (one field per
    setting, each with a docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class KVCodec(Component):
    """How stored KV is encoded: a level's compressed KV becomes one row per block, and back.

    ``encode`` runs on the device the KV is on (the session's) when blocks are
    stored; ``decode`` runs on the session's device for a whole selection at
    page-in (one call per level and question). A codec is built with its
    settings, ``cls(**settings)``, checked by its :attr:`Settings` model. A
    store records per array what :meth:`record` returns, and reads the array
    with the codec built again from that record, whatever codec the session
    writes with.

    The two abstract methods are one pair: the two directions of one byte
    layout. A subclass documents that layout (rows are stored, checksummed and
    paged in as opaque bytes by the backends) and states its error bound.
    """

    #: The pydantic model of the codec's settings (``extra="forbid"``).
    Settings: ClassVar[type[BaseModel]] = CodecSettings
    #: Version of the byte layout; a store written by a newer version is refused.
    version: ClassVar[int] = 1

    def __init__(self, **settings: Any):
        try:
            self.settings = self.Settings(**settings)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc).replace(
                "invalid mukv configuration", f"invalid settings of KV codec {type(self).__name__}")) from None
        #: the name the codec is registered as (set when it is built from the registry)
        self.name = type(self).__name__

    @abstractmethod
    def encode(self, kv: torch.Tensor) -> EncodedKV:
        """Encode blocks.

        Args:
            kv: ``[B, Y, 2, H, K, D]`` keys and values of ``B`` blocks (float32,
                float16 or bfloat16, finite), on any device.

        Returns:
            An :class:`~mukv.blocks.EncodedKV` whose ``rows`` are
            ``[B, *row_shape]`` of the dtype :meth:`row_layout` names, C-contiguous,
            on the same device, ``block_shape = (Y, 2, H, K, D)``, ``dtype = kv.dtype``.
        """

    @abstractmethod
    def decode(self, encoded: EncodedKV, device: torch.device | str) -> torch.Tensor:
        """Decode rows made by :meth:`encode` (of this codec and settings).

        Args:
            encoded: ``rows [n, *row_shape]`` on any device.
            device: where the KV is wanted (the rows are moved there first, so the
                arithmetic runs on the session's device).

        Returns:
            ``[n, Y, 2, H, K, D]`` of ``encoded.dtype`` on ``device``.
        """

    # -- derived -------------------------------------------------------------------------
    def row_layout(self, block_shape: tuple[int, ...], dtype: torch.dtype) -> tuple[tuple[int, ...], torch.dtype]:
        """``(row_shape, row_dtype)`` of one stored block of ``block_shape`` ``(Y, 2, H, K, D)``.

        The default encodes one block of zeros; a codec overrides it with its formula.

        Raises:
            ConfigError: the codec cannot store blocks of this shape (e.g. a group
                size that does not divide the head dimension).
        """
        enc = self.encode(torch.zeros((1, *block_shape), dtype=dtype))
        return tuple(enc.rows.shape[1:]), enc.rows.dtype

    def record(self) -> dict[str, Any]:
        """What a store keeps to read rows of this codec again: ``{"name", "version", "settings"}``. A subclass
        may leave out settings that change only which rows its encoder writes, not how rows read (kivi4's
        ``range_search``): arrays written with and without them are then one format, read alike."""
        settings = getattr(self, "settings", None)  # a subclass may build itself without KVCodec.__init__
        return {"name": getattr(self, "name", type(self).__name__), "version": int(self.version),
                "settings": settings.model_dump(mode="json") if isinstance(settings, BaseModel) else {}}

    def encode_blocks(self, kv: torch.Tensor, known_finite: bool = False) -> EncodedKV:
        """:meth:`encode` with its contract checked: non-finite KV is refused before anything is
        encoded, and the rows must have the layout :meth:`row_layout` names.

        Args:
            kv: ``[B, Y, 2, H, K, D]`` blocks to encode.
            known_finite: the caller has already checked these very values finite
                (:attr:`mukv.blocks.CompressedBlocks.finite`): the check, one device
                synchronisation per call, is skipped.

        Raises:
            InputError: ``kv`` holds NaN or infinite values (naming the blocks).
        """
        if kv.ndim != 6 or kv.shape[2] != 2:
            raise InputError(f"KV to encode must be [B, Y, 2, H, K, D]; got {tuple(kv.shape)}")
        if not kv.dtype.is_floating_point:
            raise InputError(f"KV to encode must be floating point; got {kv.dtype}")
        bad = None if known_finite else ~torch.isfinite(kv).flatten(1).all(dim=1)
        if bad is not None and bool(bad.any()):
            which = torch.nonzero(bad).flatten().tolist()
            raise InputError(f"KV of {len(which)} block(s) of the batch (rows {which[:8]}"
                             f"{' ...' if len(which) > 8 else ''}) holds NaN or infinite values; refused, nothing "
                             "of the batch was stored (the model produced non-finite keys or values: in float16 "
                             "usually an overflow)")
        enc = self.encode(kv)
        shape, dtype = self._layout(tuple(kv.shape[1:]), kv.dtype)
        if not isinstance(enc, EncodedKV) or tuple(enc.rows.shape) != (kv.shape[0], *shape) \
                or enc.rows.dtype != dtype or not enc.rows.is_contiguous():
            got = f"{tuple(enc.rows.shape)} {enc.rows.dtype}" if isinstance(enc, EncodedKV) else type(enc).__name__
            raise TypeError(f"KV codec {self.name!r} encoded {kv.shape[0]} blocks as {got}; its row_layout says "
                            f"contiguous {(kv.shape[0], *shape)} {dtype}")
        return enc

    def _layout(self, block_shape: tuple[int, ...], dtype: torch.dtype) -> tuple[tuple[int, ...], torch.dtype]:
        """:meth:`row_layout`, computed once per block shape and dtype."""
        cache = self.__dict__.setdefault("_layouts", {})
        key = (tuple(block_shape), dtype)
        if key not in cache:
            cache[key] = self.row_layout(tuple(block_shape), dtype)
        return cache[key]

    def decode_blocks(self, encoded: EncodedKV, device: torch.device | str) -> torch.Tensor:
        """:meth:`decode` with its contract checked (shape, dtype and device of the result)."""
        device = torch.device(device)
        kv = self.decode(encoded, device)
        want = (len(encoded), *encoded.block_shape)
        if tuple(kv.shape) != want or kv.dtype != encoded.dtype or kv.device.type != device.type:
            raise TypeError(f"KV codec {self.name!r} decoded {tuple(kv.shape)} {kv.dtype} on {kv.device}; "
                            f"expected {want} {encoded.dtype} on {device}")
        return kv


# --------------------------------------------------------------------------- retrievers
class Retriever(Component):
    """Chooses the stored blocks that answer a question."""

    #: True for a retriever that reads each block's per-layer keys (:meth:`BlockIndex.layer_scores`):
    #: a session refuses it over a level it searches (``top_k`` > 0) that is stored without
    #: ``layer_keys``, unless the stream was already written with it (a stored stream always opens).
    needs_layer_keys: ClassVar[bool] = False

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

    #: True for a model built with random weights (a preset of a real architecture's shape): its
    #: answers are meaningless, and :class:`mukv.Session` logs a warning saying so.
    random_weights: bool = False

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
        from .loading import check_device

        self.dim = dim
        self.device = check_device(device)

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
    """Turn a registered component (class, instance or function) into an object.

    Kept for callers that looked the component up themselves; :func:`mukv.specs.build`
    takes a configuration's spec (a name, a name with settings, or an object) instead."""
    if isinstance(component, type):
        if not issubclass(component, base):
            raise TypeError(f"registered {singular(role)} {component!r} is not a subclass of {base.__name__}")
        return component.from_config(config)
    if isinstance(component, base):
        return component
    if base is TokenScorer and callable(component):
        return FunctionScorer(component)
    raise TypeError(f"registered {singular(role)} {component!r} is neither a {base.__name__} subclass nor an instance")
