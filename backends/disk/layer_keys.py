"""Per-layer block keys of the disk tier (ReKV's retrieval reads them per layer).

A level stored with ``layer_keys`` has, per block, its mean key in every layer
(RoPE removed): ``[Y, V]`` float16. They are index data, like the block vectors:
small beside the KV (``Y x V x 2`` bytes per block against ``Y x 2 x K x V x 2``),
searched in full at every question. So they live twice:

* on disk, in ``layerkeys/<stream>/<level>.zarr`` (an array ``[N, Y, V]`` of
  the same sharded format as the KV, :class:`LayerKeyArchive`), written by the
  offload writer in the same commit as the blocks' KV, before their index rows
  and the state file: a block counts as stored only once its keys are on disk;
  a reopened writer cuts rows beyond the committed counts;
* in RAM (:class:`LayerKeyMirror`), appended when a block is added, read back
  whole when a stream is opened: ``Y x V x 2`` bytes per block (1 KiB for
  mukv-tiny, 6 KiB for LLaVA-OneVision-0.5B; ReKV keeps the same on the GPU,
  with its keys repeated for every query head).
"""

from __future__ import annotations

import numpy as np
import torch

from mukv.errors import RetrievalError, StoreError

from .zarr_kv import KVArchive


class LayerKeyArchive(KVArchive):
    """The per-layer keys of one stream, one array per level (float16 rows ``[Y, V]``)."""

    folder = "layerkeys"


class LayerKeyMirror:
    """The per-layer keys of every block in RAM, per level: ``[n, Y, V]`` float16, grown by doubling."""

    def __init__(self, num_layers: int, dim: int):
        self.shape = (num_layers, dim)
        self._data: dict[str, torch.Tensor] = {}
        self._n: dict[str, int] = {}

    def levels(self) -> list[str]:
        return list(self._data)

    def count(self, level: str) -> int:
        return self._n.get(level, 0)

    def has(self, level: str) -> bool:
        return level in self._data

    def check(self, level: str, first: int, keys: torch.Tensor | None, b: int) -> np.ndarray | None:
        """Validate a batch of ``b`` blocks starting at id ``first``; its keys as float16 numpy rows.

        Raises:
            StoreError: keys of the wrong shape, or a level that has them for some blocks only.
        """
        if keys is None:
            if self.has(level):
                raise StoreError(f"level {level!r} stores per-layer keys; this batch has none")
            return None
        if tuple(keys.shape) != (b, *self.shape):
            raise StoreError(f"per-layer keys of shape {tuple(keys.shape)}; expected {(b, *self.shape)}")
        if first and not self.has(level):
            raise StoreError(f"level {level!r} was stored without per-layer keys")
        return keys.detach().to("cpu", torch.float16).numpy()

    def append(self, level: str, first: int, rows: np.ndarray) -> None:
        """Blocks ``first ..`` of ``level`` (``rows [b, Y, V]`` float16); ``first`` must be the count."""
        n = self._n.get(level, 0)
        if first != n:
            raise StoreError(f"per-layer keys of {level} blocks from {first}; {n} are held")
        data = self._data.get(level)
        end = n + rows.shape[0]
        if data is None or data.shape[0] < end:
            grown = torch.empty((max(end, 16 if data is None else 2 * data.shape[0]), *self.shape),
                                dtype=torch.float16)
            if data is not None:
                grown[:n] = data[:n]
            self._data[level] = data = grown
        data[n:end] = torch.from_numpy(rows)
        self._n[level] = end

    def truncate(self, level: str, n: int) -> None:
        if level in self._n:
            self._n[level] = min(self._n[level], n)

    def get(self, level: str, ids: np.ndarray) -> torch.Tensor:
        """``[n, Y, V]`` float32 keys of ``ids``.

        Raises:
            RetrievalError: the level keeps no per-layer keys.
        """
        if not self.has(level):
            raise RetrievalError(f"level {level!r} was stored without per-layer keys (levels.layer_keys): ask it with "
                                 "another retriever, e.g. config {\"retrieval\": {\"retriever\": \"semi_hierarchical\"}}")
        return self._data[level][torch.from_numpy(np.asarray(ids, dtype=np.int64))].float()

    def scores(self, level: str, queries: torch.Tensor, chunk: int = 65536,
               layers: list[int] | None = None) -> torch.Tensor:
        """``[Y', N]`` inner products of ``queries [Y', V]`` with every held block's keys (of ``layers``)."""
        if not self.has(level):
            raise RetrievalError(f"level {level!r} was stored without per-layer keys (levels.layer_keys): ask it with "
                                 "another retriever, e.g. config {\"retrieval\": {\"retriever\": \"semi_hierarchical\"}}")
        n = self._n[level]
        q = queries.detach().to("cpu", torch.float32)
        out = torch.empty(q.shape[0], n, dtype=torch.float32)
        data = self._data[level]
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            keys = data[a:b] if layers is None else data[a:b, layers]
            out[:, a:b] = torch.einsum("yv,cyv->yc", q, keys.float())
        return out

    def load(self, archive: LayerKeyArchive, counts: dict[str, int]) -> None:
        """Read every committed block's keys of every level that has them.

        Raises:
            StoreError: fewer keys on disk than committed blocks.
        """
        for level in archive.levels():
            n = int(counts.get(level, 0))
            length = archive.length(level)
            if length < n:
                raise StoreError(f"{archive.files.uri(archive.rel(level))}: {n} {level} blocks are committed but only "
                                 f"{length} have per-layer keys on disk")
            self._data[level] = torch.empty((0, *self.shape), dtype=torch.float16)
            self._n[level] = 0
            if n:
                self.append(level, 0, archive.read(level, np.arange(n)))

    def nbytes(self) -> int:
        return sum(self._n[lv] * int(np.prod(self.shape)) * 2 for lv in self._n)
