"""Synthetic blocks and frames for the disk-tier tests (importable by child processes)."""

from __future__ import annotations

import zlib

import numpy as np
import torch

from mukv.blocks import CompressedBlocks, KVLayout

#: a small bf16 layout: exercises the uint16 view of bf16 in zarr
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, model_id="synthetic:2x2x8")
#: per level: (blocks per window, frames per window, kept tokens K)
LEVELS = {"patch": (4, 1, 3), "frame": (1, 1, 5), "segment": (1, 4, 9)}


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)


def synth_blocks(level: str, first_id: int, n_windows: int, layout: KVLayout = LAYOUT,
                 first_frame: int | None = None) -> CompressedBlocks:
    """Deterministic blocks: block ``i`` of a level always has the same KV and vector."""
    per, nf, k = LEVELS[level]
    b = n_windows * per
    ids = torch.arange(first_id, first_id + b)
    window = ids // per
    if first_frame is None:
        first_frame = int(first_id // per) * nf
    fs = first_frame + torch.arange(n_windows).repeat_interleave(per) * nf
    kv = torch.empty(b, layout.num_layers, 2, layout.num_kv_heads, k, layout.head_dim)
    vec = torch.empty(b, layout.vector_dim)
    for j, i in enumerate(ids.tolist()):
        g = torch.Generator().manual_seed(_seed(level, i))
        kv[j] = torch.randn(kv.shape[1:], generator=g)
        vec[j] = torch.randn(layout.vector_dim, generator=g)
    kept = torch.arange(k).expand(b, k)
    return CompressedBlocks(
        level=level, kv=kv.to(layout.dtype), vectors=vec, kept=kept, positions=kept + 10,
        frame_start=fs, frame_end=fs + nf, t_start=fs.double() * 2.0, t_end=(fs + nf - 1).double() * 2.0,
        token_index=kept + (window % per)[:, None] * 0,
    )


def expected_kv(level: str, ids, layout: KVLayout = LAYOUT) -> torch.Tensor:
    _, _, k = LEVELS[level]
    out = []
    for i in ids:
        g = torch.Generator().manual_seed(_seed(level, int(i)))
        out.append(torch.randn(layout.num_layers, 2, layout.num_kv_heads, k, layout.head_dim, generator=g))
    return torch.stack(out).to(layout.dtype)


def _seed(level: str, i: int) -> int:
    return (zlib.crc32(level.encode()) * 1_000_003 + i) % (2**31)
