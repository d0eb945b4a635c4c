"""The in-memory backend: every block in one growing contiguous buffer per level.

Per level it keeps the stored rows of the blocks' KV (``[N, Y, 2, H, K, D]`` with
the "none" codec, ``uint8 [N, S]`` with a quantising one: see
:class:`~mukv.interfaces.KVCodec`), ``vectors [N, V]`` (float32,
plus unit-normalised copies for search) and metadata columns, all on the
session's device. Buffers grow by doubling, so adding blocks is amortised
O(1) and a search is one matrix-vector product over a contiguous view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import mukv
from mukv.blocks import CompressedBlocks, EncodedKV, KVLayout
from mukv.errors import ConfigError, RetrievalError, StoreError
from mukv.interfaces import BlockMeta, KVCodec, StorageBackend


@dataclass
class _Level:
    n: int = 0
    rows: torch.Tensor | None = None  # [cap, *row_shape]: the codec's rows (the KV itself for "none")
    block_shape: tuple[int, ...] | None = None  # (Y, 2, H, K, D)
    vectors: torch.Tensor | None = None  # [cap, V] float32
    unit: torch.Tensor | None = None  # [cap, V] float32, L2-normalised
    positions: torch.Tensor | None = None  # [cap, K]
    token_index: torch.Tensor | None = None  # [cap, K]
    layer_keys: torch.Tensor | None = None  # [cap, Y, V] float16, for levels stored with per-layer keys
    meta: dict[str, torch.Tensor] = field(default_factory=dict)  # frame_start/end int64, t_start/end float64


#: Bytes a level's first buffer may take beyond the blocks it is made for: at most 16 rows, fewer when
#: rows are big (a segment block of a 0.5B model is ~8 MB), so that a store of one block does not hold
#: 16 blocks' worth of GPU memory (hundreds of streams on one GPU each start one).
FIRST_BUFFER_BYTES = 1 << 20


def _grow(buf: torch.Tensor | None, like: torch.Tensor, need: int) -> torch.Tensor:
    if buf is not None and buf.shape[0] >= need:
        return buf
    if buf is None:
        row = max(1, like[0].numel() * like.element_size()) if like.shape[0] else 1
        cap = max(need, min(16, FIRST_BUFFER_BYTES // row))
    else:
        cap = max(need, 2 * buf.shape[0])
    new = torch.empty((cap, *like.shape[1:]), dtype=like.dtype, device=like.device)
    if buf is not None:
        new[: buf.shape[0]] = buf
    return new


class MemoryBackend(StorageBackend):
    """Blocks in RAM (CPU sessions) or GPU memory (CUDA sessions); nothing persists.

    Args:
        layout: the model's KV layout.
        path: unused (must be ``None``).
        device: where buffers live.
        codec: how KV is kept (the session's ``kv_codec``; default "none": as it is). Blocks
            are encoded when added and decoded on ``device`` at :meth:`load_kv`, so a codec's
            effect on answers can be measured without a disk.
    """

    name = "memory"
    accepts_codec = True

    def __init__(self, layout: KVLayout, path: str | None = None, device: torch.device | str = "cpu",
                 codec: KVCodec | None = None, **options: Any):
        if path is not None:
            raise StoreError("the memory backend keeps nothing on disk; pass path=None or choose a disk backend")
        if options:
            raise StoreError(f"the memory backend takes no options; got {sorted(options)}")
        from mukv.kvcodec import codec_or_none

        if not isinstance(layout, KVLayout):
            raise ConfigError(f"the memory backend needs the model's KVLayout; got {type(layout).__name__}")
        from mukv.loading import check_device

        device = check_device(device)
        self.codec = codec_or_none(codec)
        self.layout = layout
        self.device = device
        self._levels: dict[str, _Level] = {}
        self._state: dict[str, Any] = {}
        self._files: dict[str, bytes] = {}
        self._committed: dict[str, int] = {}  # blocks per level as of the last commit

    @property
    def metadata_device(self) -> torch.device:
        return self.device

    def _level(self, level: str) -> _Level:
        return self._levels.setdefault(level, _Level())

    # -- writing ------------------------------------------------------------------------
    def add(self, blocks: CompressedBlocks) -> torch.Tensor:
        b = len(blocks)
        lay = self.layout
        expect = (lay.num_layers, 2, lay.num_kv_heads, blocks.kv.shape[4], lay.head_dim)
        if tuple(blocks.kv.shape[1:]) != expect:
            raise StoreError(f"block KV shape {tuple(blocks.kv.shape[1:])} does not match the store's layout {expect}")
        st = self._level(blocks.level)
        if st.block_shape is not None and st.block_shape[3] != blocks.kv.shape[4]:
            raise StoreError(
                f"level {blocks.level!r} stores {st.block_shape[3]} tokens per block; got {blocks.kv.shape[4]}"
            )
        start, end = st.n, st.n + b
        dev = self.device
        kv = blocks.kv.to(dev, lay.dtype)
        # refuses NaN/inf (nothing stored) unless the batch was checked and is stored unconverted
        rows = self.codec.encode_blocks(kv, known_finite=blocks.finite and kv is blocks.kv).rows
        vec = blocks.vectors.to(dev, torch.float32)
        columns = {
            "frame_start": blocks.frame_start.to(dev, torch.int64),
            "frame_end": blocks.frame_end.to(dev, torch.int64),
            "t_start": blocks.t_start.to(dev, torch.float64),
            "t_end": blocks.t_end.to(dev, torch.float64),
        }
        # allocate everything first, then write: a failure leaves n unchanged
        st.rows = _grow(st.rows, rows, end)
        st.vectors = _grow(st.vectors, vec, end)
        st.unit = _grow(st.unit, vec, end)
        lk = None
        if blocks.layer_keys is not None:
            lk = blocks.layer_keys.to(dev, torch.float16)
            if tuple(lk.shape) != (b, lay.num_layers, lay.vector_dim):
                raise StoreError(f"per-layer keys of shape {tuple(lk.shape)}; expected {(b, lay.num_layers, lay.vector_dim)}")
            if start and st.layer_keys is None:
                raise StoreError(f"level {blocks.level!r} was stored without per-layer keys")
            st.layer_keys = _grow(st.layer_keys, lk, end)
        elif st.layer_keys is not None:
            raise StoreError(f"level {blocks.level!r} stores per-layer keys; this batch has none")
        st.positions = _grow(st.positions, blocks.positions.to(dev, torch.int64), end)
        st.token_index = _grow(st.token_index, blocks.token_index.to(dev, torch.int64), end)
        for key, col in columns.items():
            st.meta[key] = _grow(st.meta.get(key), col, end)
        st.rows[start:end] = rows
        st.block_shape = tuple(int(x) for x in blocks.kv.shape[1:])
        st.vectors[start:end] = vec
        st.unit[start:end] = F.normalize(vec, dim=-1)
        st.positions[start:end] = blocks.positions
        st.token_index[start:end] = blocks.token_index
        if lk is not None:
            st.layer_keys[start:end] = lk
        for key, col in columns.items():
            st.meta[key][start:end] = col
        st.n = end
        return torch.arange(start, end)

    def set_state(self, key: str, value: Any) -> None:
        self.commit({key: value})

    def get_state(self, key: str, default: Any = None) -> Any:
        return self._state.get(key, default)

    # -- transactions -------------------------------------------------------------------
    def commit(self, state: dict[str, Any], files: dict[str, bytes] | None = None) -> None:
        """Make the blocks added since the last commit part of the stream, with ``state`` and ``files``."""
        for name, data in (files or {}).items():
            if not isinstance(data, (bytes, bytearray)):
                raise StoreError(f"file {name!r}: expected bytes, got {type(data).__name__}")
        self._state.update(state)
        for name, data in (files or {}).items():
            if data:
                self._files[name] = bytes(data)
            else:
                self._files.pop(name, None)
        self._committed = {name: st.n for name, st in self._levels.items()}

    def rollback(self) -> None:
        """Forget the blocks added since the last commit (the buffers keep their capacity)."""
        for name, st in self._levels.items():
            st.n = min(st.n, self._committed.get(name, 0))

    def read_file(self, name: str) -> bytes | None:
        return self._files.get(name)

    # -- reading ------------------------------------------------------------------------
    def count(self, level: str) -> int:
        st = self._levels.get(level)
        return 0 if st is None else st.n

    def _ids(self, level: str, ids: torch.Tensor) -> tuple[_Level, torch.Tensor]:
        st = self._levels.get(level)
        n = 0 if st is None else st.n
        ids = torch.as_tensor(ids, dtype=torch.int64, device=self.device).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise RetrievalError(f"level {level!r}: block ids out of range (stored: {n})")
        return st, ids

    def search(self, level: str, query: torch.Tensor, k: int, within: torch.Tensor | None = None):
        n = self.count(level)
        empty = torch.empty(0, dtype=torch.int64, device=self.device), torch.empty(0, device=self.device)
        if n == 0 or k <= 0:
            return empty
        st = self._levels[level]
        q = F.normalize(query.to(self.device, torch.float32).reshape(-1), dim=0)
        sims = st.unit[:n] @ q  # [N]
        if within is not None:
            within = within.to(self.device).reshape(-1, 2)
            fs, fe = st.meta["frame_start"][:n], st.meta["frame_end"][:n]
            ok = ((fs[:, None] >= within[None, :, 0]) & (fe[:, None] <= within[None, :, 1])).any(dim=1)
            sims = sims.masked_fill(~ok, float("-inf"))
            k = min(k, int(ok.sum()))
            if k == 0:
                return empty
        scores, ids = sims.topk(min(k, n))
        return ids, scores

    def vectors(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        st, ids = self._ids(level, ids)
        return st.vectors.index_select(0, ids) if ids.numel() else torch.empty(0, self.layout.vector_dim)

    def metadata(self, level: str, ids: torch.Tensor) -> BlockMeta:
        st, ids = self._ids(level, ids)
        cols = {k: v.index_select(0, ids) for k, v in st.meta.items()} if st is not None else {}
        if not cols:
            z = torch.empty(0, dtype=torch.int64)
            return BlockMeta(z, z, z.double(), z.double())
        return BlockMeta(cols["frame_start"], cols["frame_end"], cols["t_start"], cols["t_end"])

    def load_kv(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        st, ids = self._ids(level, ids)
        if st is None or st.rows is None:
            return torch.empty(0, dtype=self.layout.dtype, device=self.device)
        rows = st.rows.index_select(0, ids)
        return self.codec.decode_blocks(EncodedKV(rows, st.block_shape, self.layout.dtype), self.device)

    def layer_keys(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        st, ids = self._ids(level, ids)
        if st is None or st.layer_keys is None:
            return super().layer_keys(level, ids)
        return st.layer_keys.index_select(0, ids).float()

    def layer_scores(self, level: str, queries: torch.Tensor, chunk: int = 65536,
                     layers: list[int] | None = None) -> torch.Tensor:
        st = self._levels.get(level)
        if st is None or st.n == 0:
            return torch.empty(queries.shape[0], 0, device=self.device)
        if st.layer_keys is None:
            return super().layer_keys(level, torch.empty(0, dtype=torch.int64))
        q = queries.to(self.device, torch.float32)
        out = torch.empty(q.shape[0], st.n, dtype=torch.float32, device=self.device)
        for a in range(0, st.n, chunk):
            b = min(st.n, a + chunk)
            keys = st.layer_keys[a:b] if layers is None else st.layer_keys[a:b, layers]
            out[:, a:b] = torch.einsum("yv,cyv->yc", q, keys.float())
        return out

    def positions(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        st, ids = self._ids(level, ids)
        return st.positions.index_select(0, ids)

    def token_index(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        st, ids = self._ids(level, ids)
        return st.token_index.index_select(0, ids)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, st in self._levels.items():
            k = 0 if st.block_shape is None else st.block_shape[3]
            row = 0 if st.rows is None else st.rows[0].numel() * st.rows.element_size()
            out[name] = {"blocks": st.n, "tokens": st.n * k, "bytes": st.n * row}  # bytes as kept (encoded)
        return out

    def close(self) -> None:
        self._levels.clear()


@mukv.hookimpl
def mukv_register_backends(register):
    register("memory", MemoryBackend)
