"""Attention signal: how much attention each token receives inside its block."""

from __future__ import annotations

import torch

from mukv.blocks import PrefilledBlocks
from mukv.errors import ConfigError
from mukv.interfaces import TokenScorer


class AttentionScorer(TokenScorer):
    """a_j: last-layer attention received by token j from the block's own queries,
    averaged over heads and summed over queries (system-prompt columns dropped).

    The column sums are computed during prefill in the last layer only; this
    scorer reads them from ``blocks.attention``.
    """

    needs_attention = True

    def score(self, blocks: PrefilledBlocks) -> torch.Tensor:
        if blocks.attention is None:
            raise ConfigError("the attention scorer needs attention column sums, but the prefill did not compute them")
        return blocks.attention.float()
