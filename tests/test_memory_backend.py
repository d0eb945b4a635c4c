"""The memory backend's buffers: a level's first buffer holds few big blocks (hundreds of streams on
one GPU each start one), and buffers still grow by doubling with every block kept as stored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mukv
from mukv.session import load_model

memory = pytest.importorskip("mukv.backends.memory")


def _held(session, level):
    st = session.backend._levels[level]
    return st.rows.shape[0], st.rows[0].numel() * st.rows.element_size()


def test_first_buffer_is_bounded_by_bytes_and_growth_keeps_blocks(monkeypatch):
    model = load_model("tiny-llava-ov", torch.device("cpu"))
    frames = np.random.default_rng(0).integers(0, 255, (8, 56, 56, 3), dtype=np.uint8)
    plain = mukv.Session(model=model)
    plain.feed(frames[:4])
    cap, row = _held(plain, "segment")
    assert plain.backend.count("segment") == 1
    assert cap * row <= max(row, memory.FIRST_BUFFER_BYTES)  # not 16 segment blocks for one
    assert _held(plain, "frame")[0] == 16  # small rows (4 frame blocks stored): room for 16, as before

    monkeypatch.setattr(memory, "FIRST_BUFFER_BYTES", 1)  # every level: a first buffer of exactly what is stored
    tight = mukv.Session(model=model)
    tight.feed(frames[:4])
    assert _held(tight, "segment")[0] == 1 and _held(tight, "frame")[0] == 4
    tight.feed(frames[4:])  # grows by doubling: 1 -> 2 segment blocks, 4 -> 8 frame blocks
    plain.feed(frames[4:])
    assert _held(tight, "segment")[0] == 2 and _held(tight, "frame")[0] == 8
    for lv in ("patch", "frame", "segment"):
        n = plain.backend.count(lv)
        assert tight.backend.count(lv) == n and n > 0
        ids = torch.arange(n)
        assert torch.equal(tight.backend.load_kv(lv, ids), plain.backend.load_kv(lv, ids))
        assert torch.equal(tight.backend.vectors(lv, ids), plain.backend.vectors(lv, ids))
