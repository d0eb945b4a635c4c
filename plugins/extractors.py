"""Granularity extractors: how each level cuts a window of frames into blocks.

* ``patch_raster``: consecutive runs of ``level.tokens`` tokens in raster order
  (the authors' patches: 49 tokens = 3.5 rows of a 14x14 frame);
* ``patch_spatial``: square spatial regions (2x2 quadrants of 7x7 for
  ``tokens=49`` on a 14x14 frame), the truer "region" of a frame;
* ``frame``: one block per window of ``level.frames`` frames (1 for the frame level);
* ``segment``: one block per window of ``level.frames`` consecutive frames (S = 4).
"""

from __future__ import annotations

import math

import torch

import mukv
from mukv.config import LevelConfig
from mukv.errors import ConfigError
from mukv.interfaces import GranularityExtractor


def _parts(level: LevelConfig, grid: tuple[int, int]) -> int:
    tpf = grid[0] * grid[1]
    if level.frames != 1:
        raise ConfigError(f"levels[{level.name}].frames: patch extractors cut single frames; got frames={level.frames}")
    if level.tokens is None or tpf % level.tokens:
        raise ConfigError(
            f"levels[{level.name}].tokens: must divide the model's {tpf} tokens per frame "
            f"(grid {grid[0]}x{grid[1]}); got {level.tokens}"
        )
    return tpf // level.tokens


class PatchRasterExtractor(GranularityExtractor):
    """Patches of ``level.tokens`` consecutive tokens in raster order."""

    def split(self, level: LevelConfig, grid: tuple[int, int]) -> torch.Tensor:
        parts = _parts(level, grid)
        return torch.arange(grid[0] * grid[1]).view(parts, -1)


class PatchSpatialExtractor(GranularityExtractor):
    """Square spatial regions: the frame's token grid cut into q x q tiles,
    where q * q = tokens per frame / ``level.tokens``."""

    def split(self, level: LevelConfig, grid: tuple[int, int]) -> torch.Tensor:
        parts = _parts(level, grid)
        q = math.isqrt(parts)
        h, w = grid
        if q * q != parts or h % q or w % q:
            raise ConfigError(
                f"levels[{level.name}].tokens: patch_spatial needs the {h}x{w} grid to split into q x q equal "
                f"tiles of {level.tokens} tokens; {parts} tiles is not such a split"
            )
        idx = torch.arange(h * w).view(q, h // q, q, w // q)  # tile-row, row-in-tile, tile-col, col-in-tile
        return idx.permute(0, 2, 1, 3).reshape(parts, -1)


class WindowExtractor(GranularityExtractor):
    """One block per window: every token of ``level.frames`` frames (frame or segment level)."""

    def split(self, level: LevelConfig, grid: tuple[int, int]) -> torch.Tensor:
        if level.tokens is not None:
            raise ConfigError(f"levels[{level.name}].tokens: must be unset for a whole-window level; got {level.tokens}")
        return torch.arange(level.frames * grid[0] * grid[1]).view(1, -1)


@mukv.hookimpl
def mukv_register_extractors(register):
    register("patch_raster", PatchRasterExtractor)
    register("patch_spatial", PatchSpatialExtractor)
    register("frame", WindowExtractor)
    register("segment", WindowExtractor)
