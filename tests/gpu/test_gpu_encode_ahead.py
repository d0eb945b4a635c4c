"""On a GPU with ``mukv.encode_ahead`` on: a feed's next pieces are encoded on a side stream while one is
prefilled; what it stores is bit for bit what the same pieces store on one stream, with the plain model
and with every acceleration in recorded graphs, and what the default order stores up to near ties; a
failure in a later piece stores nothing.

Run through the device tool (skipped without CUDA)::

    python -m pytest -q tests/gpu/test_gpu_encode_ahead.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mukv
from mukv import encode_ahead
from mukv.errors import StoreError
from mukv.session import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = torch.device("cuda")
CONFIG = {"stream": {"encode_batch_frames": 4}}
LEVELS = ("patch", "frame", "segment")


def feeds():
    return [np.random.default_rng(i).integers(0, 256, (n, 56, 56, 3), dtype=np.uint8) for i, n in enumerate((16, 7, 9))]


def stored(model, one_stream: bool = False) -> tuple[dict, str, int]:
    """Each level's kept tokens, KV and positions after the feeds, the answer, and the feeds that took the
    side stream (``one_stream``: the current stream stands for it, so the pieces run in order on one)."""
    used = {"n": 0}
    real = encode_ahead.side_stream

    def spy(device):
        used["n"] += 1
        return torch.cuda.current_stream(device) if one_stream else real(device)

    encode_ahead.side_stream = spy
    try:
        with mukv.Session(model=model, backend="memory", config=CONFIG, device=DEVICE) as s:
            for f in feeds():
                s.feed(f)
            out = {}
            for lv in LEVELS:
                ids = torch.arange(s.backend.count(lv), device=DEVICE)
                out[lv] = [t.cpu() for t in (s.backend.token_index(lv, ids), s.backend.load_kv(lv, ids),
                                            s.backend.positions(lv, ids))]
            text = s.ask("what happened?", max_new_tokens=6).text
    finally:
        encode_ahead.side_stream = real
    return out, text, used["n"]


@pytest.mark.parametrize("which", [[], ["fused_vision", "fused_llm", "fused_norms", "fused_residual", "fused_rope",
                                        "graph_prefill"]])
def test_encoding_ahead_stores_what_the_pieces_store_on_one_stream(which, monkeypatch):
    from mukv.accel import accelerate

    model = load_model("tiny-llava-ov", DEVICE, torch.float32)
    accelerate(model, which)
    monkeypatch.setattr(encode_ahead, "ENCODE_AHEAD", True)
    ahead, ahead_text, sides = stored(model)
    assert sides == 3  # every feed of several pieces went through the side stream
    serial, serial_text, _ = stored(model, one_stream=True)
    for lv in LEVELS:
        for a, b in zip(ahead[lv], serial[lv]):
            assert torch.equal(a, b), lv
    assert ahead_text == serial_text
    monkeypatch.setattr(encode_ahead, "ENCODE_AHEAD", False)
    default, _, none = stored(model)  # every batch encoded, then one prefill: other batch cuts, same blocks
    assert none == 0
    for lv in LEVELS:
        (ai, akv, apos), (di, dkv, dpos) = ahead[lv], default[lv]
        assert torch.equal(apos, dpos), lv
        same = (ai == di).all(dim=1)
        assert same.float().mean() >= 0.9, (lv, same.float().mean())
        torch.testing.assert_close(akv[same], dkv[same], rtol=1e-3, atol=1e-3)


def test_a_failure_in_a_later_piece_stores_nothing_and_the_retry_stores_it_once(monkeypatch):
    monkeypatch.setattr(encode_ahead, "ENCODE_AHEAD", True)
    model = load_model("tiny-llava-ov", DEVICE, torch.float32)
    data = feeds()
    with mukv.Session(model=model, backend="memory", config=CONFIG, device=DEVICE) as s, \
            mukv.Session(model=model, backend="memory", config=CONFIG, device=DEVICE) as ref:
        s.feed(data[1])
        ref.feed(data[1])
        counts = {lv: s.backend.count(lv) for lv in LEVELS}
        ing = s._stream.ingestor
        real, calls = ing.add_frames, {"n": 0}

        def fails(embeds, times):
            calls["n"] += 1
            if calls["n"] == 3:
                raise StoreError("disk went away")
            return real(embeds, times)

        ing.add_frames = fails
        with pytest.raises(StoreError):
            s.feed(data[0])
        del ing.add_frames
        assert {lv: s.backend.count(lv) for lv in LEVELS} == counts and ing.frames_seen == 7
        s.feed(data[0])
        ref.feed(data[0])
        for lv in LEVELS:
            ids = torch.arange(ref.backend.count(lv), device=DEVICE)
            assert s.backend.count(lv) == ref.backend.count(lv)
            assert torch.equal(s.backend.load_kv(lv, ids), ref.backend.load_kv(lv, ids)), lv
