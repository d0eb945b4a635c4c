"""Built-in token scorers: attention, frequency (FFT and key-difference), dual."""

from __future__ import annotations

import mukv

from .attention import AttentionScorer
from .dual import DualScorer
from .frequency import FrequencyDiffScorer, FrequencyFFTScorer


@mukv.hookimpl
def mukv_register_scorers(register):
    register("attention", AttentionScorer)
    register("frequency_fft", FrequencyFFTScorer)
    register("frequency_diff", FrequencyDiffScorer)
    register("dual", DualScorer)
