"""The dual-signal score of MuKV: s = alpha * a + (1 - alpha) * f, both min-max normalised."""

from __future__ import annotations

import torch

from mukv.blocks import PrefilledBlocks
from mukv.config import MukvConfig, ScorerRef
from mukv.interfaces import TokenScorer, minmax
from mukv.specs import PluginSettings, build


class DualSettings(PluginSettings):
    """Settings of the ``dual`` scorer: which scorers give its two signals."""

    attention: ScorerRef = "attention"
    """Scorer of the attention signal (a name, a name with settings, or an object)."""

    frequency: ScorerRef = "frequency_fft"
    """Scorer of the frequency signal: "frequency_fft" (high-pass FFT over the token
    axis) or "frequency_diff" (norm of consecutive key differences), or any scorer."""


class DualScorer(TokenScorer):
    """Combines an attention scorer and a frequency scorer with the level's alpha.

    Selected as ``"dual"``, or with settings as
    ``{"name": "dual", "frequency": "frequency_diff"}`` (:class:`DualSettings`).

    Args:
        attention: scorer of the attention signal.
        frequency: scorer of the frequency signal.
    """

    needs_attention = True
    Settings = DualSettings

    def __init__(self, attention: TokenScorer, frequency: TokenScorer):
        self.attention = attention
        self.frequency = frequency

    @classmethod
    def from_config(cls, config: MukvConfig, settings: DualSettings | None = None) -> "DualScorer":
        s = settings or DualSettings()
        att = build("scorers", s.attention, config, TokenScorer, "scoring.scorer.attention")
        freq = build("scorers", s.frequency, config, TokenScorer, "scoring.scorer.frequency")
        obj = cls(att, freq)
        obj.settings = s
        return obj

    def score(self, blocks: PrefilledBlocks) -> torch.Tensor:
        alpha = blocks.level.alpha
        a = minmax(self.attention.score(blocks))
        f = minmax(self.frequency.score(blocks))
        return alpha * a + (1.0 - alpha) * f
