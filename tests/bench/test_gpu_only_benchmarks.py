"""The GPU-only kernel benchmarks import on a CPU machine and stop with a clear message (their figures
come from the device tool: docs/gpu-results.md)."""

from __future__ import annotations

import pytest
import torch

from helpers import load_benchmark


@pytest.mark.parametrize("name", ["swiglu_bench", "attention_bench", "rope_bench"])
def test_a_gpu_benchmark_without_a_gpu_says_so(name):
    mod = load_benchmark(name)
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark would run")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        mod.main(["--reps", "1"])
