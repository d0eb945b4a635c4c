"""The disk tier's pool of page-locked staging buffers stays bounded (``backends/disk/transfer.py``).

Plain host tensors stand in for page-locked memory here (the pool takes its allocate/release
functions); tests/gpu/test_gpu_disk_tier.py runs the same pool on CUDA with real registration.
"""

from __future__ import annotations

import pytest
import torch

import mukv
from mukv.backends.disk import TieredBackend
from mukv.backends.disk.transfer import MIN_PINNED_CLASS, PinnedPool, pinned_bytes, size_class

MiB = 1 << 20


class Recorder:
    """allocate/release for a pool, recording what was made and freed."""

    def __init__(self):
        self.made: list[int] = []
        self.freed: list[int] = []

    def allocate(self, n: int) -> torch.Tensor:
        self.made.append(n)
        return torch.empty(n, dtype=torch.uint8)

    def release(self, t: torch.Tensor) -> None:
        self.freed.append(t.numel())


def pool(max_free: int) -> tuple[PinnedPool, Recorder]:
    r = Recorder()
    return PinnedPool(max_free, allocate=r.allocate, release=r.release), r


def test_size_classes_are_powers_of_two_from_one_mib():
    assert size_class(0) == size_class(1) == size_class(MIN_PINNED_CLASS) == MiB
    assert size_class(MiB + 1) == 2 * MiB
    assert size_class(3 * MiB) == 4 * MiB
    assert size_class(64 * MiB) == 64 * MiB
    assert size_class(64 * MiB + 1) == 128 * MiB


def test_one_buffer_serves_every_request_of_its_class():
    p, r = pool(64 * MiB)
    for n in (5 * MiB, 6 * MiB + 17, 8 * MiB, 7 * MiB):  # all in the 8 MiB class, one at a time
        buf = p.get(n)
        assert buf.numel() == 8 * MiB >= n
        p.put(buf)
    assert r.made == [8 * MiB] and p.allocations == 1 and p.held_bytes == 8 * MiB


def test_buffers_in_use_are_never_handed_out_twice():
    p, _ = pool(64 * MiB)
    a, b = p.get(MiB), p.get(MiB)
    assert a.data_ptr() != b.data_ptr()
    p.put(a)
    assert p.get(MiB).data_ptr() == a.data_ptr()


def test_free_buffers_beyond_the_bound_are_released_oldest_first():
    p, r = pool(10 * MiB)
    bufs = [p.get(n * MiB) for n in (4, 4, 2, 1)]  # 4 + 4 + 2 + 1 = 11 MiB in use
    assert p.held_bytes == 11 * MiB
    for b in bufs:
        p.put(b)
    assert r.freed == [4 * MiB]  # the first one returned goes: 7 MiB free remain
    assert p.held_bytes == 7 * MiB


def test_a_varying_load_stays_within_in_flight_plus_the_bound():
    """Requests of every size, several in flight: held bytes never pass (peak in flight) + max_free,
    and when the work stops only max_free stays."""
    gen = torch.Generator().manual_seed(0)
    p, r = pool(32 * MiB)
    inflight, peak = [], 0
    for _ in range(2000):
        n = int(torch.randint(1, 48 * MiB, (1,), generator=gen))
        inflight.append(p.get(n))
        live = sum(b.numel() for b in inflight)
        peak = max(peak, live)
        assert p.held_bytes <= live + 32 * MiB
        if len(inflight) > 3 or torch.rand(1, generator=gen).item() < 0.5:
            p.put(inflight.pop(int(torch.randint(len(inflight), (1,), generator=gen))))
    for b in inflight:
        p.put(b)
    assert p.held_bytes <= 32 * MiB
    assert sum(r.made) - sum(r.freed) == p.held_bytes
    assert p.allocations < 2000  # reuse happened
    p.clear()
    assert p.held_bytes == 0 and sum(r.made) == sum(r.freed)


def test_zero_bound_frees_every_buffer_on_return():
    p, r = pool(0)
    p.put(p.get(3 * MiB))
    assert r.freed == [4 * MiB] and p.held_bytes == 0


def test_process_total_counts_every_pool():
    before = pinned_bytes()
    p, _ = pool(64 * MiB)
    q, _ = pool(64 * MiB)
    a, b = p.get(MiB), q.get(2 * MiB)
    assert pinned_bytes() == before + 3 * MiB
    p.put(a)
    q.put(b)
    p.clear()
    q.clear()
    assert pinned_bytes() == before


def test_option_is_validated_and_reported(tmp_path):
    from disk_synth import LAYOUT

    with pytest.raises(mukv.ConfigError, match="pinned_free_bytes"):
        TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="s", pinned_free_bytes=-1)
    b = TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="s", pinned_free_bytes=0)
    assert b.tier_stats()["pinned_bytes"] == 0  # CPU: no page-locked memory at all
    b.close()


def test_stores_on_one_device_share_one_pool_and_the_last_close_frees_it():
    from mukv.backends.disk.transfer import acquire_pool, release_pool

    a = acquire_pool("cuda:7", 8 * MiB)
    b = acquire_pool("cuda:7", 32 * MiB)
    assert a is b and a.max_free_bytes == 32 * MiB  # the largest bound asked for
    assert acquire_pool("cuda:6", MiB) is not a
    release_pool("cuda:6", MiB)
    release_pool("cuda:7", 32 * MiB)
    assert a.max_free_bytes == 8 * MiB
    release_pool("cuda:7", 8 * MiB)
    assert a.max_free_bytes == 0  # late returns are freed at once
    assert acquire_pool("cuda:7", MiB) is not a  # a fresh pool after the last user left
    release_pool("cuda:7", MiB)
