"""Keep-ratio top-k: keep the best floor(L * r) tokens of each block, in time order."""

from __future__ import annotations

import math

import torch

from pydantic import Field, ValidationError

from mukv.blocks import PrefilledBlocks
from mukv.config import MukvConfig, format_validation_error
from mukv.errors import ConfigError
from mukv.interfaces import Compressor
from mukv.specs import PluginSettings


class TopKSettings(PluginSettings):
    """Settings of the ``topk`` compressor: de-duplication of near-identical tokens."""

    dedup: bool = False
    """Drop near-duplicate tokens: over-select, then drop a candidate whose key is
    too similar to a better-scored kept one."""

    threshold: float = Field(default=0.9, gt=-1.0, le=1.0)
    """Cosine similarity of last-layer keys above which a candidate is a duplicate."""

    oversample: float = Field(default=1.2, ge=1.0, le=10.0)
    """Candidates considered by de-duplication, as a multiple of the kept count."""


class TopKCompressor(Compressor):
    """Top-K tokens by score, returned ascending (time order), batched over blocks.

    With de-duplication, ``ceil(K * oversample)`` candidates are taken in score
    order and a candidate is dropped when its last-layer key (flattened over
    heads) has cosine similarity above ``threshold`` with a better-scored
    candidate that was kept. If fewer than K survive, the best dropped ones fill
    the gap so every block keeps exactly K tokens.

    Selected as ``"topk"``, or with settings as
    ``{"name": "topk", "dedup": True, "threshold": 0.8}`` (:class:`TopKSettings`).

    Args:
        dedup: enable de-duplication.
        threshold: cosine similarity above which a candidate is a duplicate.
        oversample: candidates considered, as a multiple of K.
    """

    Settings = TopKSettings

    def __init__(self, dedup: bool = False, threshold: float = 0.9, oversample: float = 1.2):
        try:
            self.settings = TopKSettings(dedup=dedup, threshold=threshold, oversample=oversample)
        except ValidationError as exc:
            raise ConfigError(f"topk compressor: {format_validation_error(exc)}") from None
        self.dedup, self.threshold, self.oversample = dedup, threshold, oversample

    @classmethod
    def from_config(cls, config: MukvConfig, settings: TopKSettings | None = None) -> "TopKCompressor":
        s = settings or TopKSettings()
        return cls(s.dedup, s.threshold, s.oversample)

    def select(self, blocks: PrefilledBlocks, scores: torch.Tensor) -> torch.Tensor:
        k = self.kept_count(blocks.level, blocks.block_len)
        scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
        if not self.dedup:
            idx = scores.topk(k, dim=1).indices
            return idx.sort(dim=1).values
        return self._dedup(blocks, scores, k).sort(dim=1).values

    def _dedup(self, blocks: PrefilledBlocks, scores: torch.Tensor, k: int) -> torch.Tensor:
        b, length = scores.shape
        c = min(length, max(k, math.ceil(k * self.oversample)))
        cand = scores.topk(c, dim=1).indices  # [B, C], best first
        keys = blocks.keys.float().permute(0, 2, 1, 3).reshape(b, length, -1)  # [B, L, V]
        keys = torch.nn.functional.normalize(keys, dim=-1)
        ck = keys.gather(1, cand[..., None].expand(-1, -1, keys.shape[-1]))  # [B, C, V]
        sim = ck @ ck.transpose(1, 2)  # [B, C, C]
        keep = torch.zeros(b, c, dtype=torch.bool, device=scores.device)
        keep[:, 0] = True
        for i in range(1, c):  # greedy in score order; vectorised over blocks
            dup = (sim[:, i, :i] > self.threshold) & keep[:, :i]
            keep[:, i] = ~dup.any(dim=1)
        # rank: kept candidates first (in score order), then dropped ones (in score order)
        order = torch.arange(c, device=scores.device).expand(b, -1) + (~keep).long() * c
        pick = order.argsort(dim=1)[:, :k]
        return cand.gather(1, pick)
