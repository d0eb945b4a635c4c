"""The dual-signal score of MuKV: s = alpha * a + (1 - alpha) * f, both min-max normalised."""

from __future__ import annotations

import torch

from mukv.blocks import PrefilledBlocks
from mukv.config import MukvConfig
from mukv.interfaces import TokenScorer, build_component, minmax


class DualScorer(TokenScorer):
    """Combines an attention scorer and a frequency scorer with the level's alpha.

    Args:
        attention: scorer of the attention signal.
        frequency: scorer of the frequency signal.
    """

    needs_attention = True

    def __init__(self, attention: TokenScorer, frequency: TokenScorer):
        self.attention = attention
        self.frequency = frequency

    @classmethod
    def from_config(cls, config: MukvConfig) -> "DualScorer":
        from mukv.registry import registry

        reg = registry()
        att = build_component("scorers", reg.get("scorers", config.scoring.attention, "scoring.attention"), config,
                              TokenScorer)
        freq = build_component("scorers", reg.get("scorers", config.scoring.frequency, "scoring.frequency"), config,
                               TokenScorer)
        return cls(att, freq)

    def score(self, blocks: PrefilledBlocks) -> torch.Tensor:
        alpha = blocks.level.alpha
        a = minmax(self.attention.score(blocks))
        f = minmax(self.frequency.score(blocks))
        return alpha * a + (1.0 - alpha) * f
