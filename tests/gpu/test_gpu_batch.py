"""On a GPU: a cross-stream ingest batch does not wait for the device once per stream.

Each copy from host memory to the device (a pageable copy) and each read of a device value
waits for the device to finish the work queued before it; a batch of many streams that copied
every stream's block metadata on its own waited hundreds of times per batch. The batch moves
the metadata to a memory backend's device once per chunk and checks the KV finite once, so the
waits of a batch do not grow with its streams.

Run through the device tool (skipped without CUDA)::

    python -m pytest -q tests/gpu/test_gpu_batch.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mukv.batching import BatchIngest, FeedItem
from mukv.session import Session, load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = torch.device("cuda")


def _frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)


def _waits(model, streams: int) -> tuple[int, list[torch.device]]:
    """Host waits (device synchronisations) of one batch of ``streams`` streams with 4 frames each
    (every level completes a window), after a first batch; and the device of every metadata
    column the backends were given."""
    from torch.profiler import ProfilerActivity, profile

    sessions = [Session(model=model, backend="memory", device=DEVICE) for _ in range(streams)]
    seen: list[torch.device] = []
    for s in sessions:
        real = s.backend.add
        s.backend.add = lambda b, real=real: (seen.extend(getattr(b, f).device for f in
                                                          ("frame_start", "frame_end", "t_start", "t_end")),
                                              real(b))[1]
    bi = BatchIngest()
    bi.run([FeedItem.of(s, _frames(4, seed=i)) for i, s in enumerate(sessions)])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        results, _ = bi.run([FeedItem.of(s, _frames(4, seed=100 + i)) for i, s in enumerate(sessions)])
        torch.cuda.synchronize()
    assert all(r.ok for r in results)
    waits = sum(e.count for e in prof.key_averages() if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    for s in sessions:
        s.close()
    return waits, seen


def test_a_batch_waits_for_the_device_as_often_for_16_streams_as_for_2():
    model = load_model("tiny-llava-ov", DEVICE)
    few, seen_few = _waits(model, 2)
    many, seen_many = _waits(model, 16)
    assert all(d.type == "cuda" for d in seen_few + seen_many)  # moved once per chunk, not per stream
    assert many <= few + 4, (few, many)


def _feed_waits(model, frames: int) -> tuple[int, dict]:
    """Host waits of one ``Session.feed`` of ``frames`` frames (after a first feed), and what the
    stream stored (frame and time columns of every level)."""
    from torch.profiler import ProfilerActivity, profile

    s = Session(model=model, backend="memory", device=DEVICE)
    s.feed(_frames(frames, seed=1))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        s.feed(_frames(frames, seed=2))
        torch.cuda.synchronize()
    waits = sum(e.count for e in prof.key_averages() if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    stored = {}
    for lv in ("patch", "frame", "segment"):
        st = s.backend._levels[lv]
        stored[lv] = {k: st.meta[k][: st.n].cpu() for k in ("frame_start", "frame_end", "t_start", "t_end")}
    s.close()
    return waits, stored


def test_one_streams_feed_copies_its_block_columns_without_waiting_for_the_device():
    """A single stream's store of each level's blocks moved four host columns to the GPU from pageable
    memory, four device waits per level forward; they go through pinned memory now, with the same
    values stored."""
    from mukv import blocks

    model = load_model("tiny-llava-ov", DEVICE)
    fast, got = _feed_waits(model, 16)
    blocks.ASYNC_METADATA = False
    try:
        slow, want = _feed_waits(model, 16)
    finally:
        blocks.ASYNC_METADATA = True
    for lv in want:
        for k in want[lv]:
            assert torch.equal(got[lv][k], want[lv][k]), (lv, k)
    assert fast + 4 * 3 <= slow, (fast, slow)  # at least four waits fewer for each of the three levels
