"""Frequency signal: how much a token's key differs from its neighbours.

High-frequency content along the token axis marks visual change and counters
attention's positional bias.
"""

from __future__ import annotations

import torch

from mukv.blocks import PrefilledBlocks
from mukv.interfaces import TokenScorer


class FrequencyFFTScorer(TokenScorer):
    """f_j: mean absolute high-pass magnitude of the head-averaged last-layer keys.

    Keys ``[B, H, L, D]`` are averaged over heads (``[B, L, D]``), transformed
    with a real FFT along the token axis, the lower half of the frequency bins
    (DC included) is zeroed, the signal is transformed back, and each token's
    score is the mean absolute value over ``D``.
    """

    def score(self, blocks: PrefilledBlocks) -> torch.Tensor:
        keys = blocks.keys.float().mean(dim=1)  # [B, L, D]
        length = keys.shape[1]
        spec = torch.fft.rfft(keys, dim=1)  # [B, L//2 + 1, D]
        cut = spec.shape[1] // 2
        spec[:, :cut] = 0
        high = torch.fft.irfft(spec, n=length, dim=1)
        return high.abs().mean(dim=-1)


class FrequencyDiffScorer(TokenScorer):
    """f_j = ||k_j - k_{j-1}||: the cheaper variant, on head-averaged last-layer keys.
    The first token takes the difference to the second."""

    def score(self, blocks: PrefilledBlocks) -> torch.Tensor:
        keys = blocks.keys.float().mean(dim=1)  # [B, L, D]
        if keys.shape[1] == 1:
            return torch.zeros(keys.shape[:2], device=keys.device)
        diff = (keys[:, 1:] - keys[:, :-1]).norm(dim=-1)  # [B, L-1]
        return torch.cat([diff[:, :1], diff], dim=1)
