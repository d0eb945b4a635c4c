"""Builders of hand-made blocks for plugin tests."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from mukv.blocks import PrefilledBlocks
from mukv.config import LevelConfig

#: The Triton kernels' CPU tests (tests/test_accel_*.py) run under Triton's interpreter where triton is
#: installed: ``TRITON_INTERPRET=1 python -m pytest tests/test_accel_rope.py`` (triton takes the mode when
#: first imported, so it is imported here, before a test that unsets the variable builds a model). The
#: ``interpret`` fixture (tests/conftest.py) skips a test unless the interpreter is on.
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (CPU builds of torch lack it)")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETING and HAS_TRITON:
    importlib.import_module("triton")



def blocks_from_keys(keys: torch.Tensor, attention: torch.Tensor | None = None, keep_ratio: float = 0.5,
                     alpha: float = 0.5, layers: int = 2) -> PrefilledBlocks:
    """PrefilledBlocks whose last-layer keys are ``keys [B, H, L, D]`` (values = keys, other layers zero)."""
    b, h, length, d = keys.shape
    kv = torch.zeros(layers, 2, b, h, length, d)
    kv[-1, 0] = keys
    kv[-1, 1] = keys
    for y in range(layers - 1):
        kv[y, 0] = y + 1  # recognisable values in lower layers
        kv[y, 1] = -(y + 1)
    level = LevelConfig(name="frame", extractor="frame", keep_ratio=keep_ratio, alpha=alpha, top_k=1)
    return PrefilledBlocks(
        level=level, kv=kv, attention=attention, token_index=torch.arange(length).expand(b, -1),
        frame_start=torch.arange(b), frame_end=torch.arange(b) + 1,
        positions=torch.arange(length).expand(b, -1), grid=(1, length),
    )


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """A script of ``benchmarks/`` imported as a module (its folder on ``sys.path``, for the scripts
    that import their siblings), so a test can call its ``main(argv)``."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def stored_levels(adapter, frames, question: str = "what happened?", max_new_tokens: int = 4, device=None):
    """Feed ``frames`` (one array, or a list of arrays fed one by one) to a memory-backed session of
    ``adapter`` (on ``device``): per level its kept token indices and stored KV (float32, on the CPU),
    and the answer's text to ``question``."""
    import mukv

    s = mukv.Session(model=adapter, backend="memory", **({} if device is None else {"device": device}))
    for chunk in frames if isinstance(frames, list) else [frames]:
        s.feed(chunk)
    out = {}
    for lv in ("patch", "frame", "segment"):
        ids = torch.arange(s.backend.count(lv), device=s.device)
        out[lv] = (s.backend.token_index(lv, ids).cpu(), s.backend.load_kv(lv, ids).float().cpu())
    text = s.ask(question, max_new_tokens=max_new_tokens).text
    s.close()
    return out, text


def stored_feeds(model, feeds, device):
    """:func:`stored_levels` of random 64x64 frames fed in chunks of ``feeds`` (frame counts), with a
    6-token answer."""
    import numpy as np

    chunks = [np.random.default_rng(i).integers(0, 255, (n, 64, 64, 3), dtype=np.uint8) for i, n in enumerate(feeds)]
    return stored_levels(model, chunks, max_new_tokens=6, device=device)


def assert_accelerated_stream_stores_alike(which, order, device):
    """The tiny LLaVA-OneVision in float32 on ``device`` with the accelerations ``which`` applied (in
    ``order``, the order :func:`mukv.accel.accelerate` applies them) stores what the plain model stores of
    the same feeds: kept tokens of at least 90% of the blocks alike (a padded graph batch may swap near
    ties), and the KV of those blocks within float32 tolerances. Recorded graphs, where asked, replayed
    with every kernel inside them."""
    from mukv.accel import accelerate
    from mukv.session import load_model

    feeds = [8, 5, 16]
    # float32 (load_model picks bf16 on CUDA): the Triton kernels compute in full float32
    want, _ = stored_feeds(load_model("tiny-llava-ov", device, torch.float32), feeds, device)
    fast = load_model("tiny-llava-ov", device, torch.float32)
    assert accelerate(fast, which) == [w for w in order if w in which]
    got, _ = stored_feeds(fast, feeds, device)
    if "graph_prefill" in which:  # the kernels were recorded into the graphs, not left to an eager fallback
        gp = fast.prefill_blocks
        assert gp.replays > 0 and gp._graphs and all(g.graph is not None for g in gp._graphs.values())
    for lv in want:
        (ki, kv), (wi, wv) = got[lv], want[lv]
        same = (ki == wi).all(dim=1)
        assert same.float().mean() >= 0.9, (lv, same.float().mean())
        torch.testing.assert_close(kv[same], wv[same], rtol=1e-3, atol=1e-3)
