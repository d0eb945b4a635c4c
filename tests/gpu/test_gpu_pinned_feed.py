"""On a GPU: a feed's private copy of its frames is pinned (``mukv.feeding.PIN_FRAMES``) and reaches
the vision tower by an asynchronous copy; what it stores equals the pageable path's, and an array the
caller overwrites right after ``feed`` returns is not stored changed.

Run through the device tool (skipped without CUDA)::

    python -m pytest -q tests/gpu/test_gpu_pinned_feed.py
"""

from __future__ import annotations

import pytest
import torch

from mukv import feeding
from mukv.session import load_model

from helpers import stored_levels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = torch.device("cuda")


def test_pinned_frames_store_what_pageable_frames_store(monkeypatch):
    g = torch.Generator().manual_seed(5)
    chunks = [torch.randint(0, 256, (n, 56, 56, 3), dtype=torch.uint8, generator=g) for n in (7, 16, 3)]
    seen = []
    real = feeding.private_copy

    def spy(frames, pin):
        out = real(frames, pin)
        seen.append(out.is_pinned())
        return out

    monkeypatch.setattr(feeding, "private_copy", spy)
    model = load_model("tiny-llava-ov", DEVICE, torch.float32)
    got, got_text = stored_levels(model, [c.clone() for c in chunks], device=DEVICE)
    assert seen and all(seen)  # every feed's copy was pinned
    seen.clear()
    monkeypatch.setattr(feeding, "PIN_MAX_BYTES", 7 * 56 * 56 * 3 - 1)  # the 7-frame feed is over the cap
    capped, _ = stored_levels(model, [c.clone() for c in chunks], device=DEVICE)
    assert seen == [False, False, True]
    monkeypatch.setattr(feeding, "PIN_FRAMES", False)
    want, want_text = stored_levels(model, [c.clone() for c in chunks], device=DEVICE)
    for lv in want:
        assert torch.equal(got[lv][0], want[lv][0]) and torch.equal(got[lv][1], want[lv][1]), lv
        assert torch.equal(capped[lv][1], want[lv][1]), lv
    assert got_text == want_text


def test_an_array_overwritten_after_feed_returns_is_not_stored_changed():
    import mukv

    model = load_model("tiny-llava-ov", DEVICE, torch.float32)
    arr = torch.randint(0, 256, (24, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    keep = arr.clone()
    with mukv.Session(model=model, backend="memory", device=DEVICE) as s, \
            mukv.Session(model=model, backend="memory", device=DEVICE) as ref:
        s.feed(arr)
        arr.zero_()  # at once: a copy still in flight would read zeros
        ref.feed(keep)
        for lv in ("patch", "frame", "segment"):
            ids = torch.arange(ref.backend.count(lv), device=DEVICE)
            assert torch.equal(s.backend.load_kv(lv, ids), ref.backend.load_kv(lv, ids)), lv
