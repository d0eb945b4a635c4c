"""mukv-keynorm: a token scorer that keeps the tokens whose keys are largest.

A worked example of a third-party mukv plugin. Installed, it registers the
scorer "key_norm"; select it with ``config={"scoring": {"scorer": "key_norm"}}``
(every level) or per level with ``LevelConfig.scorer``. Its one setting,
``invert``, keeps the tokens of lowest key norm instead:
``{"scoring": {"scorer": {"name": "key_norm", "invert": true}}}``.
"""

from __future__ import annotations

import torch

import mukv
from mukv.blocks import PrefilledBlocks
from mukv.interfaces import TokenScorer
from mukv.specs import PluginSettings

__version__ = "0.1.0"


class KeyNormSettings(PluginSettings):
    """Settings of the "key_norm" scorer."""

    invert: bool = False
    """Keep the tokens of lowest key norm instead of highest."""


class KeyNormScorer(TokenScorer):
    """Token j's score: the L2 norm of its last-layer key, averaged over KV heads.

    Keys with a large norm dominate attention logits, so keeping them keeps
    what later queries are most likely to attend to. The scorer needs no
    attention weights, so the prefill for it stays on fast sdpa attention.
    With ``invert`` the lowest norms score highest.
    """

    needs_attention = False
    Settings = KeyNormSettings

    def score(self, blocks: PrefilledBlocks) -> torch.Tensor:
        # blocks.keys: [B, H, L, D] -> norms [B, H, L] -> mean over heads [B, L]
        norms = blocks.keys.float().norm(dim=-1).mean(dim=1)
        return -norms if self.settings.invert else norms


@mukv.hookimpl
def mukv_register_scorers(register):
    register("key_norm", KeyNormScorer)
