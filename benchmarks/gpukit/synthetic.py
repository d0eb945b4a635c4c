"""A benchmark-only storage backend of random blocks of the right shapes, for stored lengths (10 h,
100 h) that no ingest could fill within a run."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import mukv
from mukv.config import MukvConfig
from mukv.interfaces import BlockMeta, Compressor, StorageBackend
from mukv.reference import ReferenceStore


FPS = 0.5  # stream sampling rate: 1 h = 1800 frames


class SyntheticStore(StorageBackend):
    """A benchmark-only backend of random blocks of the right shapes.

    Vectors ``[N, V]`` and metadata of every block live on the device; KV lives
    in a pool of ``pool`` blocks per level (on the device, or in pinned host
    memory), which block ids map onto with ``id % pool``. ``load_kv`` from a
    host pool is one asynchronous host-to-device copy per block.
    """

    name = "bench_synthetic"

    def __init__(self, layout, path=None, device="cpu", spec: dict | None = None, **_: Any):
        self.layout, self.device = layout, torch.device(device)
        self._state: dict[str, Any] = {}
        self.levels: dict[str, dict[str, Any]] = {}
        spec = spec or {}
        gen = torch.Generator(device=self.device).manual_seed(0)
        for name, s in spec["levels"].items():
            n, k, pool, per_window, frames = s["blocks"], s["kept"], s["pool"], s["per_window"], s["frames"]
            v = torch.randn(n, layout.vector_dim, device=self.device, generator=gen)
            window = torch.arange(n, device=self.device) // per_window
            fs = window * frames
            shape = (pool, layout.num_layers, 2, layout.num_kv_heads, k, layout.head_dim)
            if spec.get("kv_on", "device") == "pinned" and self.device.type == "cuda":
                kv = torch.empty(shape, dtype=layout.dtype, pin_memory=True)
                step = max(1, pool // 16)
                for i in range(0, pool, step):
                    kv[i : i + step].copy_(torch.randn((min(step, pool - i), *shape[1:]), device=self.device,
                                                       dtype=layout.dtype, generator=gen))
            else:
                kv = torch.empty(shape, dtype=layout.dtype, device=self.device).normal_(generator=gen)
            self.levels[name] = {
                "n": n, "k": k, "vectors": v, "unit": F.normalize(v, dim=-1), "kv": kv,
                "frame_start": fs, "frame_end": fs + frames,
                "t_start": fs.double() / spec.get("fps", FPS), "t_end": (fs + frames - 1).double() / spec.get("fps", FPS),
            }

    def add(self, blocks):
        raise NotImplementedError("the synthetic store is built whole")

    def count(self, level: str) -> int:
        st = self.levels.get(level)
        return 0 if st is None else st["n"]

    def search(self, level, query, k, within=None):
        st = self.levels[level]
        sims = st["unit"] @ F.normalize(query.to(self.device, torch.float32).reshape(-1), dim=0)
        scores, ids = sims.topk(min(k, st["n"]))
        return ids, scores

    def vectors(self, level, ids):
        return self.levels[level]["vectors"].index_select(0, ids.to(self.device))

    def metadata(self, level, ids):
        st, ids = self.levels[level], ids.to(self.device)
        return BlockMeta(*(st[c].index_select(0, ids) for c in ("frame_start", "frame_end", "t_start", "t_end")))

    def load_kv(self, level, ids):
        st = self.levels[level]
        pool = st["kv"]
        slots = ids.to(pool.device) % pool.shape[0]
        if pool.device == self.device:
            return pool.index_select(0, slots)
        out = torch.empty((slots.numel(), *pool.shape[1:]), dtype=pool.dtype, device=self.device)
        for i, s in enumerate(slots.tolist()):
            out[i].copy_(pool[s], non_blocking=True)
        return out

    def positions(self, level, ids):
        k = self.levels[level]["k"]
        return torch.arange(k, device=self.device).expand(ids.numel(), -1)

    def set_state(self, key, value):
        self._state[key] = value

    def get_state(self, key, default=None):
        return self._state.get(key, default)

    def stats(self):
        tb = self.layout.token_bytes()
        return {n: {"blocks": s["n"], "tokens": s["n"] * s["k"], "bytes": s["n"] * s["k"] * tb}
                for n, s in self.levels.items()}


class SyntheticPlugin:
    @mukv.hookimpl
    def mukv_register_backends(self, register):
        register("bench_synthetic", SyntheticStore)


def store_spec(adapter: Any, config: MukvConfig, frames: int, kv_on: str, kv_budget_bytes: float) -> dict:
    """Blocks per level for ``frames`` frames at MuKV's defaults, and the KV pool each gets."""
    t = adapter.tokens_per_frame
    tb = adapter.layout.token_bytes()
    levels, total_bytes = {}, 0
    for lv in config.levels:
        length = lv.tokens if lv.tokens else lv.frames * t
        per_window = t // lv.tokens if lv.tokens else 1
        k = Compressor.kept_count(lv, length)
        n = (frames // lv.frames) * per_window
        levels[lv.name] = {"blocks": n, "kept": k, "per_window": per_window, "frames": lv.frames}
        total_bytes += n * k * tb
    for name, s in levels.items():
        full = s["blocks"] * s["kept"] * tb
        share = full / total_bytes if total_bytes else 0
        s["pool"] = int(max(1, min(s["blocks"], (kv_budget_bytes * share) // (s["kept"] * tb))))
    return {"levels": levels, "kv_on": kv_on, "fps": FPS, "kv_bytes_all": total_bytes,
            "kv_bytes_held": sum(s["pool"] * s["kept"] * tb for s in levels.values())}


def synthetic_reference_store(backend: SyntheticStore) -> ReferenceStore:
    """The synthetic store in the authors' layout: per-block host vectors, KV from a host pool."""
    store = ReferenceStore()
    for name, s in backend.levels.items():
        st = store.level(name)
        st.vectors = list(s["vectors"].float().cpu().unbind(0))
        pool = s["kv"][:256].cpu()  # pageable host copy of (at most) 256 blocks, [pool, Y, 2, H, K, D]
        blocks = [[(pool[i, y, 0], pool[i, y, 1]) for y in range(pool.shape[1])] for i in range(pool.shape[0])]
        st.kv = [blocks[i % len(blocks)] for i in range(s["n"])]
    return store

