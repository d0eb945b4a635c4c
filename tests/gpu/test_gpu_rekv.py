"""On a GPU: ReKV's encoding and per-layer retrieval (policy ``rekv``) through CUDA.

Run through the device tool (skipped without CUDA)::

    python -m pytest -q tests/gpu/test_gpu_rekv.py

``MUKV_GPU_TEST_DEVICE=cpu`` runs the same checks on the CPU.

* the in-place window encoder (sdpa with a lower-right causal bias on CUDA, bf16)
  gives every block the KV of the canonical layout (system prompt, window, block),
  within bf16 rounding;
* a session with ReKV's policy (the question run through each layer's blocks, one
  context per layer, decoding over CUDA graphs) answers, and reads its budget in every layer.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import mukv
from mukv.rope import rerotate
from mukv.local_window import WindowEncoder, WindowKV, prefill_window

DEVICE = torch.device(os.environ.get("MUKV_GPU_TEST_DEVICE", "cuda"))
CUDA = DEVICE.type == "cuda"
pytestmark = ([pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
              if CUDA else [])


@pytest.fixture(scope="module")
def model():
    from mukv.plugins.models.llava_onevision import build_llava_onevision

    return build_llava_onevision("tiny-llava-ov", device=DEVICE)


def test_window_encoder_on_the_device_matches_the_canonical_layout(model):
    pre = model.prefix()
    t = model.tokens_per_frame
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (6, 64, 64, 3), dtype=np.uint8))
    e = model.encode_frames(frames)
    ti = torch.arange(t, device=DEVICE)[None]
    enc = WindowEncoder(model, pre, 2, t, rebase_at=pre.length + 3 * t)
    ref: list = []
    tol = 5e-2 if model.dtype == torch.bfloat16 else 1e-3
    for b in range(6):
        kv, _, codes = enc.encode(e[b : b + 1], ti)
        kv = kv[:, :, 0].clone()
        win = ref[-2:]
        window = None if not win else WindowKV(torch.cat([k for k, _ in win], dim=3), torch.cat([c for _, c in win]),
                                               torch.arange(len(win), device=DEVICE).repeat_interleave(t))
        rkv, _, rcodes = prefill_window(model, pre, e[b : b + 1], ti, window, span=2 * t)
        ref.append((rkv[:, :, 0], rcodes[0]))
        torch.testing.assert_close(kv[:, 1].float(), rkv[:, :, 0][:, 1].float(), rtol=tol, atol=tol)
        moved = rerotate(model, kv[:, 0], codes[0], rcodes[0])
        torch.testing.assert_close(moved.float(), rkv[:, :, 0][:, 0].float(), rtol=tol, atol=tol)


def test_rekv_session_on_the_device(model):
    cfg = {"levels": [{"name": "frame", "extractor": "frame", "keep_ratio": 1.0, "top_k": 3, "local_window": 2,
                       "layer_keys": True}]}
    with mukv.Session(model=model, policy="rekv", config=cfg) as s:
        s.feed(np.random.default_rng(1).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8))
        ans = s.ask("what color was the car?", max_new_tokens=3)
        assert ans.kv_tokens - s.prefix.length == 3 * model.tokens_per_frame
        assert sum(b.layer_share for b in ans.blocks) == pytest.approx(3)
