"""Reading a stream's blocks (a part of :class:`~.tiered.TieredBackend`): search over both tiers,
vectors, metadata, positions, kept tokens and per-layer keys of retrieved blocks, and the KV page-in
(:mod:`.pagein`). Blocks the hot tier holds are read from it; the rest from the index on disk, whose
rows are cached for the blocks a search returned.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mukv.errors import StoreError
from mukv.interfaces import BlockMeta

from .pagein import load_kv

#: index columns a search keeps for the blocks it returns
_ROW_COLUMNS = ["block_id", "segment_id", "frame_start", "frame_end", "t_start", "t_end", "crc32"]


class Reads:
    """Read paths of :class:`~.tiered.TieredBackend` (a mixin: it uses the backend's tiers, index and
    lock)."""

    def _cold_rows(self, level: str, ids: np.ndarray) -> dict[int, tuple]:
        """(vector, segment, frame_start, frame_end, t_start, t_end, crc) of blocks on disk, via the row cache."""
        out: dict[int, tuple] = {}
        missing = []
        for i in ids.tolist():
            row = self._rows.get((level, i))
            if row is None:
                missing.append(i)
            else:
                self._rows.move_to_end((level, i))
                out[i] = row
        if missing:
            self._ensure_on_disk(level, max(missing) + 1)
            t = self.table.fetch(self.stream_id, level, np.array(missing), _ROW_COLUMNS + ["vector"])
            got = self._cache_rows(level, t)
            for i in missing:
                if i not in got:
                    raise StoreError(f"{self.files.uri()}: {level} block {i} of stream {self.stream_id!r} is "
                                     "missing from the index")
            out.update(got)
        return out

    def _cache_rows(self, level: str, t) -> dict[int, tuple]:
        if t is None or t.num_rows == 0:
            return {}
        cols = {c: t.column(c).to_numpy() for c in _ROW_COLUMNS}
        vecs = np.asarray(t.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                          dtype=np.float32).reshape(t.num_rows, -1)
        got = {}
        for r in range(t.num_rows):
            i = int(cols["block_id"][r])
            row = (vecs[r], int(cols["segment_id"][r]), int(cols["frame_start"][r]), int(cols["frame_end"][r]),
                   float(cols["t_start"][r]), float(cols["t_end"][r]), int(cols["crc32"][r]))
            got[i] = row
            if self.options.row_cache:
                # its own vector: a view would keep the whole fetched batch alive as long as any row of it
                # stays cached, and the cache's bound in rows would not bound its bytes
                row = (row[0].copy(),) + row[1:]
                self._rows[(level, i)] = row
                self._rows.move_to_end((level, i))
        while len(self._rows) > self.options.row_cache:
            self._rows.popitem(last=False)
        return got

    def search(self, level: str, query: torch.Tensor, k: int, within: torch.Tensor | None = None):
        with self._lock:
            self._check_open()
            empty = (torch.empty(0, dtype=torch.int64, device=self.device), torch.empty(0, device=self.device))
            n = self.count(level)
            if n == 0 or k <= 0:
                return empty
            self._ensure_on_disk(level, self._unadmitted.get(level, 0))
            q = query.detach().to("cpu", torch.float32).reshape(-1)
            w = None if within is None else within.detach().cpu().to(torch.int64).reshape(-1, 2).numpy()
            hot_ids, hot_vecs = self.hot.search(level, F.normalize(q, dim=0), k, w)
            below = min(self._committed.get(level, 0), n)
            cold_ids, cold_vecs = np.empty(0, dtype=np.int64), np.empty((0, self.layout.vector_dim), np.float32)
            # the index on disk is searched only for blocks the hot tier does not hold: a stream whose blocks
            # are all hot answers without a lance query (whose cost grows with the table's fragments)
            if below > 0 and not self.hot.holds_all(level, below):
                covered = None if w is None else int(np.clip(w[:, 1] - w[:, 0], 0, None).sum())
                if w is not None and covered <= self.options.scan_frames:
                    t = self.table.scan(self.stream_id, level, below, w, _ROW_COLUMNS)
                else:
                    t = self.table.search(self.stream_id, level, below, q.numpy(), k, w, _ROW_COLUMNS)
                if t is not None and t.num_rows:
                    cold_ids = t.column("block_id").to_numpy()
                    cold_vecs = np.asarray(t.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                                           dtype=np.float32).reshape(t.num_rows, -1)
                    keep_t = t
                else:
                    keep_t = None
            else:
                keep_t = None
            ids = np.concatenate([hot_ids, cold_ids])
            vecs = np.concatenate([hot_vecs.cpu().numpy().reshape(-1, self.layout.vector_dim), cold_vecs])
            if ids.size == 0:
                return empty
            ids, first = np.unique(ids, return_index=True)  # ascending ids, first occurrence
            vecs = vecs[first].astype(np.float64)
            q64 = q.numpy().astype(np.float64)
            q64 /= max(np.sqrt((q64 * q64).sum()), 1e-12)
            norms = np.sqrt((vecs * vecs).sum(axis=1))
            scores = (vecs * q64[None]).sum(axis=1) / np.maximum(norms, 1e-12)
            order = np.argsort(-scores, kind="stable")[:k]
            top = ids[order]
            if keep_t is not None:  # remember the winners' rows for vectors()/metadata()/load_kv()
                pos = np.flatnonzero(np.isin(keep_t.column("block_id").to_numpy(), top))
                self._cache_rows(level, keep_t.take(pos))
            return (torch.from_numpy(top.copy()).to(self.device),
                    torch.from_numpy(scores[order].astype(np.float32)).to(self.device))

    def vectors(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self._check_open()
            ids = self._ids(level, ids)
            out = torch.empty(ids.size, self.layout.vector_dim, dtype=torch.float32, device=self.device)
            slots = self.hot.lookup(level, ids)
            hot = slots >= 0
            if hot.any():
                out[torch.from_numpy(np.flatnonzero(hot)).to(self.device)] = self.hot.vectors(level, slots[hot]).to(self.device)
            if (~hot).any():
                rows = self._cold_rows(level, ids[~hot])
                vec = np.stack([rows[int(i)][0] for i in ids[~hot]])
                out[torch.from_numpy(np.flatnonzero(~hot)).to(self.device)] = torch.from_numpy(vec).to(self.device)
            return out

    def metadata(self, level: str, ids: torch.Tensor) -> BlockMeta:
        with self._lock:
            self._check_open()
            ids = self._ids(level, ids)
            cols = {k: np.empty(ids.size, dtype=np.int64) for k in ("frame_start", "frame_end")}
            cols.update({k: np.empty(ids.size, dtype=np.float64) for k in ("t_start", "t_end")})
            slots = self.hot.lookup(level, ids)
            hot = slots >= 0
            if hot.any():
                m = self.hot.meta(level, slots[hot])
                for c in cols:
                    cols[c][hot] = m[c]
            if (~hot).any():
                rows = self._cold_rows(level, ids[~hot])
                sel = [rows[int(i)] for i in ids[~hot]]
                for j, c in enumerate(("frame_start", "frame_end", "t_start", "t_end")):
                    cols[c][~hot] = [r[2 + j] for r in sel]
            d = self.device
            return BlockMeta(*(torch.from_numpy(cols[c]).to(d) for c in ("frame_start", "frame_end", "t_start", "t_end")))

    def load_kv(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        """Page in blocks ``ids`` (the final selection of one question); see :func:`.pagein.load_kv`.

        Returns:
            ``[n, Y, 2, H, K, D]`` KV of ``ids`` in their order, on the session's device.
        """
        with self._lock:
            self._check_open()
            return load_kv(self, level, self._ids(level, ids))

    def _lance_lists(self, level: str, ids: torch.Tensor, column: str) -> torch.Tensor:
        with self._lock:
            self._check_open()
            ids = self._ids(level, ids)
            if ids.size == 0:
                return torch.empty(0, int(self._level_info.get(level, {}).get("tokens", 0)), dtype=torch.int64)
            self._ensure_on_disk(level, int(ids.max()) + 1)
            t = self.table.fetch(self.stream_id, level, ids, [column])
            got = t.column("block_id").to_numpy()
            vals = np.asarray(t.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False),
                              dtype=np.int64).reshape(t.num_rows, -1)
            pos = np.searchsorted(got, ids)
            return torch.from_numpy(vals[pos]).to(self.device)

    def positions(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        return self._lance_lists(level, ids, "positions")

    def layer_keys(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        """Per-layer mean keys of ``ids`` (from RAM: see :mod:`.layer_keys`)."""
        with self._lock:
            self._check_open()
            return self.lk.get(level, self._ids(level, ids)).to(self.device)

    def layer_scores(self, level: str, queries: torch.Tensor, chunk: int = 65536,
                     layers: list[int] | None = None) -> torch.Tensor:
        with self._lock:
            self._check_open()
            if self.count(level) == 0:
                return torch.empty(queries.shape[0], 0, device=self.device)
            return self.lk.scores(level, queries, chunk, layers)[:, : self.count(level)].to(self.device)

    def token_index(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        return self._lance_lists(level, ids, "token_index")

    def kept(self, level: str, ids: torch.Tensor) -> torch.Tensor:
        """``[n, K]`` kept token indices inside each block."""
        return self._lance_lists(level, ids, "kept")
