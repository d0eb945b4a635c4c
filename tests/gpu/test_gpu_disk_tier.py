"""On a GPU: the disk tier's byte movement through CUDA (pinned staging buffers,
asynchronous device-to-host copies on a side stream, page-in) round-trips exactly.

Run through the device tool (skipped without CUDA)::

    python -m pytest -q tests/gpu/test_gpu_disk_tier.py

``MUKV_GPU_TEST_DEVICE=cpu`` runs the same checks on the CPU (plain copies), to
check the tests themselves where no GPU is at hand.

* :class:`~mukv.backends.disk.transfer.Mover`: a source freed right after
  ``to_host`` still arrives whole; host copies land in pinned memory; many
  ``to_device`` calls in a row, each staged through a reused pinned buffer,
  all arrive exactly; staging memory is page-locked through registration,
  stays within the bytes in flight plus the pool's bound, and goes back when freed;
* a stream fed with ``device="cuda"`` into the ``lancedb`` backend, with a hot
  tier far smaller than the stream (so most blocks leave the GPU through the
  staging path, are evicted, and come back from disk): every block's KV reads
  back bit for bit as it was stored, and the answers retrieve the same blocks
  as a memory-backend session fed the same frames.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("lancedb", reason="the disk tier needs lancedb (pip install mukv[disk])")
pytest.importorskip("zarr", reason="the disk tier needs zarr (pip install mukv[disk])")

from mukv.backends.disk.transfer import Mover  # noqa: E402
from mukv.session import Session, load_model  # noqa: E402

DEVICE = torch.device(os.environ.get("MUKV_GPU_TEST_DEVICE", "cuda"))
CUDA = DEVICE.type == "cuda"
pytestmark = ([pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
              if CUDA else [])

QUESTIONS = ("what color was the car ?", "where is the dog ?", "how many people are there ?")
LEVELS = ("patch", "frame", "segment")
#: A hot tier far smaller than the stream: most blocks are evicted and answered from disk.
SMALL_HOT = {"hot_bytes": 1 << 20, "hot_slab_bytes": 1 << 19, "commit_interval": 0.05}


def _frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)


def _blocks(answer) -> list[tuple[str, int]]:
    return [(b.level, b.block_id) for b in answer.blocks]


def test_to_host_survives_freeing_the_source():
    """The side-stream copy keeps its source alive: freeing it and reusing the memory at once changes nothing."""
    mover = Mover(DEVICE)
    gen = torch.Generator().manual_seed(0)
    expected = [torch.randn(3, 2, 2, 2, 1024, 64, generator=gen).to(torch.bfloat16) for _ in range(6)]  # 3 MiB each
    copies = []
    for e in expected:
        src = e.to(DEVICE)
        copies.append(mover.to_host(src, torch.bfloat16))
        del src
        torch.full((e.numel(),), 7, dtype=torch.bfloat16, device=DEVICE)  # would land on the freed memory
    for e, c in zip(expected, copies):
        host = c.wait()
        assert host.device.type == "cpu" and host.dtype == torch.bfloat16 and host.shape == e.shape
        if CUDA:
            assert host.is_pinned()
        assert torch.equal(host, e)
        c.release()


def test_to_host_converts_dtype_and_to_device_round_trips_through_reused_staging_buffers():
    mover = Mover(DEVICE)
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(2, 2, 2, 4, 300, 32, generator=gen)
    host = mover.to_host(src.to(DEVICE), torch.bfloat16).wait()
    assert torch.equal(host, src.to(torch.bfloat16))
    chunks = [torch.randn(5, 2, 2, 2, 700, 64, generator=gen).to(torch.bfloat16) for _ in range(12)]
    outs = [mover.to_device(c) for c in chunks]  # no synchronisation in between: staging buffers are reused
    for c, o in zip(chunks, outs):
        assert o.device.type == DEVICE.type and torch.equal(o.cpu(), c)


@pytest.mark.skipif(not CUDA, reason="page-locked memory exists only with CUDA")
def test_staging_memory_is_page_locked_bounded_and_given_back():
    from mukv.backends.disk.transfer import PinnedPool, pinned_bytes

    torch_before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    total_before = pinned_bytes()
    pool = PinnedPool(8 << 20)
    gen = torch.Generator().manual_seed(2)
    for n in (3, 9, 1, 17, 5, 2, 33, 4):  # MiB of bf16, one upload after another, sizes all over
        chunk = torch.randn(n << 19, generator=gen).to(torch.bfloat16)
        buf = pool.get(n << 20)
        host = buf[: n << 20].view(torch.bfloat16)
        assert host.is_pinned()
        host.copy_(chunk)
        out = host.to(DEVICE, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        pool.put(buf, event)
        assert torch.equal(out.cpu(), chunk)
        assert pool.held_bytes <= (64 << 20) + (8 << 20)  # the one in flight (its class) + the bound
    assert pool.held_bytes <= 8 << 20 and pinned_bytes() == total_before + pool.held_bytes
    pool.clear()
    assert pool.held_bytes == 0 and pinned_bytes() == total_before
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == torch_before  # not torch's cache
    first, second = Mover(DEVICE), Mover(DEVICE)
    assert first.pool is second.pool  # one pool per device for every store of the process
    first.close()
    second.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A memory session and a lancedb session on ``DEVICE`` over one tiny model, fed the same 40 frames;
    every block the lancedb session stored, as it was handed to the backend."""
    model = load_model("tiny-llava-ov", DEVICE, torch.bfloat16)  # bf16 KV: its uint16 view goes through zarr
    path = tmp_path_factory.mktemp("gpu-store") / "cam.mukv"
    mem = Session(model=model, backend="memory", device=DEVICE)
    disk = Session(model=model, backend="lancedb", path=path, backend_options=SMALL_HOT, device=DEVICE)
    stored: dict[str, list[torch.Tensor]] = {lv: [] for lv in LEVELS}
    disk._ingestor.on_stored = lambda c: stored[c.level].append(c.kv.detach().to("cpu", copy=True))
    for i in range(5):  # several feeds: offloads overlap the next feed's prefill
        f = _frames(8, seed=i)
        assert mem.feed(f) == disk.feed(f)
    disk.backend.flush()
    yield model, mem, disk, path, {lv: torch.cat(kv) for lv, kv in stored.items() if kv}
    disk.close()
    mem.close()


def test_stream_on_the_device_goes_through_the_hot_tier_and_the_disk(stores):
    _, _, disk, _, _ = stores
    assert disk.backend.hot.arena.device.type == DEVICE.type
    ts = disk.backend.tier_stats()
    assert ts["hot"]["evicted"] > 0  # the stream outgrew the hot tier
    disk.ask(QUESTIONS[0])
    assert disk.backend.tier_stats()["pagein"]["blocks_disk"] > 0  # a question was answered from disk


def test_kv_round_trips_bit_for_bit(stores):
    _, mem, disk, _, stored = stores
    for level in LEVELS:
        n = disk.backend.count(level)
        assert n == mem.backend.count(level) == stored[level].shape[0] > 0
        ids = torch.arange(n).flip(0)  # hot and cold blocks, out of order
        kv = disk.backend.load_kv(level, ids)
        assert kv.device.type == DEVICE.type and kv.dtype == stored[level].dtype
        assert torch.equal(kv.cpu(), stored[level].flip(0))
        assert torch.equal(kv, mem.backend.load_kv(level, ids))
        assert torch.equal(disk.backend.positions(level, ids).cpu(), mem.backend.positions(level, ids).cpu())


def test_answers_retrieve_the_same_blocks_as_the_memory_backend(stores):
    _, mem, disk, _, _ = stores
    for q in QUESTIONS:
        a, b = mem.ask(q, max_new_tokens=4), disk.ask(q, max_new_tokens=4)
        assert _blocks(a) == _blocks(b)
        assert a.text == b.text


def test_reopened_store_pages_everything_in_from_disk(stores):
    """With no hot tier every retrieved block comes from disk through the staging path, and equals what was stored."""
    model, mem, disk, path, stored = stores
    disk.backend.flush()
    cold = Session.open(path, model=model, backend_options={"hot_bytes": 0, "read_only": True}, device=DEVICE)
    try:
        for level in LEVELS:
            n = cold.backend.count(level)
            assert n == stored[level].shape[0]
            kv = cold.backend.load_kv(level, torch.arange(n))
            assert kv.device.type == DEVICE.type and torch.equal(kv.cpu(), stored[level])
        assert _blocks(cold.ask(QUESTIONS[1], max_new_tokens=4)) == _blocks(mem.ask(QUESTIONS[1], max_new_tokens=4))
        assert cold.backend.tier_stats()["pagein"]["blocks_hot"] == 0
    finally:
        cold.close()
