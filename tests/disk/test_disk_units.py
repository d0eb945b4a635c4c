"""Units of the disk tier: hot tier slots and budget, eviction policies, filters, options, hierarchy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import mukv
from disk_synth import LAYOUT, expected_kv, synth_blocks
from mukv.backends.disk import TieredBackend
from mukv.backends.disk.hot import BlockInfo, HotTier
from mukv.backends.disk.lance_index import merge_ranges, where
from mukv.interfaces import HotBlocks
from mukv.plugins.evictors import FIFOEviction, LRUBlockEviction, LRUSegmentEviction


def _info(ids, seg):
    ids = np.asarray(ids, dtype=np.int64)
    z = np.zeros(len(ids), dtype=np.int64)
    return BlockInfo(ids, np.asarray(seg, dtype=np.int64), ids, ids + 1, z.astype(float), z.astype(float))


def test_hot_tier_is_one_arena_with_flat_bytes():
    shape = (2, 2, 2, 3, 8)  # 384 bytes in bf16
    hot = HotTier(64 << 10, 8 << 10, torch.device("cpu"), torch.bfloat16, 16, LRUSegmentEviction())
    arena = hot.arena.data_ptr()
    reserved = None
    for step in range(200):
        kv = torch.randn(4, *shape).to(torch.bfloat16)
        ids = np.arange(step * 4, step * 4 + 4)
        ok = hot.admit("patch", kv, torch.randn(4, 16), _info(ids, ids // 16), clock=step, committed=False)
        assert ok.all() or step > 0
        hot.mark_committed("patch", (step + 1) * 4)
        assert hot.used_bytes() <= hot.budget_bytes
        if reserved is None:
            reserved = hot.reserved_bytes()
        assert hot.reserved_bytes() == reserved  # nothing grows
        slots = hot.lookup("patch", ids)
        assert (slots >= 0).all()
        assert torch.equal(hot.read("patch", slots), kv)  # views into the arena hold the bytes
    assert hot.arena.data_ptr() == arena and hot.evicted > 0


def test_uncommitted_blocks_are_never_evicted():
    shape = (2, 2, 2, 3, 8)
    hot = HotTier(16 << 10, 4096, torch.device("cpu"), torch.bfloat16, 16, LRUSegmentEviction())
    per = 4096 // 384 * (16 << 10) // 4096  # slots in the whole arena
    ids = np.arange(per)
    ok = hot.admit("patch", torch.zeros(per, *shape, dtype=torch.bfloat16), torch.randn(per, 16), _info(ids, ids),
                   0, committed=False)
    assert ok.all()
    more = hot.admit("patch", torch.zeros(2, *shape, dtype=torch.bfloat16), torch.randn(2, 16),
                     _info([per, per + 1], [per, per]), 1, committed=False)
    assert not more.any()  # no room: everything hot is still waiting for disk
    hot.mark_committed("patch", per)
    more = hot.admit("patch", torch.zeros(2, *shape, dtype=torch.bfloat16), torch.randn(2, 16),
                     _info([per, per + 1], [per, per]), 2, committed=False)
    assert more.all()


def test_lru_segment_evicts_whole_least_recent_segments():
    c = HotBlocks(level=["patch"] * 6, ids=torch.arange(6), segment=torch.tensor([0, 0, 1, 1, 2, 2]),
                  nbytes=torch.full((6,), 10), last_used=torch.tensor([5, 1, 2, 2, 9, 0]),
                  stored_at=torch.zeros(6, dtype=torch.long))
    v = LRUSegmentEviction().victims(c, 15)
    assert v.tolist() == [2, 3]  # segment 1 (last use 2) goes first, whole
    v = LRUSegmentEviction().victims(c, 25)
    assert v.tolist() == [2, 3, 0, 1]
    assert LRUBlockEviction().victims(c, 10).tolist() == [5]
    assert FIFOEviction().victims(c, 20).tolist() == [0, 1]


def test_filters_take_only_validated_names_and_numbers():
    assert where("cam-1", "patch", 10) == "stream_id = 'cam-1' AND level = 'patch' AND block_id < 10"
    w = where("s", "frame", 5, np.array([[8, 12], [0, 4], [10, 16]]))
    assert w.endswith("((frame_start >= 0 AND frame_start <= 4) OR (frame_start >= 8 AND frame_start <= 16)) AND "
                      "((frame_start >= 0 AND frame_end <= 4) OR (frame_start >= 8 AND frame_end <= 16))")
    assert where("s", "frame", None, np.array([[0, 4]])).startswith("stream_id = 's' AND level = 'frame' AND (")
    assert merge_ranges(np.array([[4, 8], [0, 4], [20, 21]])) == [(0, 8), (20, 21)]
    for bad in ("x' OR 1=1 --", "a b", "../x"):
        with pytest.raises(mukv.StoreError):
            where(bad, "patch", 1)
        with pytest.raises(mukv.StoreError):
            where("s", bad, 1)


def frame_store(tmp_path, rounds: int, **opts) -> TieredBackend:
    """A backend holding ``rounds`` commits of 8 frame windows behind a small hot tier (most blocks on disk)."""
    b = TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="s", commit_interval=0.0,
                      hot_bytes=8 << 10, hot_slab_bytes=4096, **opts)
    for _ in range(rounds):
        b.add(synth_blocks("frame", b.count("frame"), 8))
    b.flush()
    return b


def test_search_merges_hot_and_cold_exactly(tmp_path):
    b = frame_store(tmp_path, 10)
    n = b.count("frame")
    hot = b.tier_stats()["hot"]["blocks"]["frame"]
    assert 0 < hot < n  # some hot, most on disk
    vecs = b.vectors("frame", torch.arange(n))
    q = torch.randn(LAYOUT.vector_dim)
    exact = torch.nn.functional.normalize(vecs, dim=-1) @ torch.nn.functional.normalize(q, dim=0)
    ids, scores = b.search("frame", q, 7)
    assert ids.tolist() == exact.topk(7).indices.tolist()
    assert torch.allclose(scores, exact.topk(7).values, atol=1e-5)
    within = torch.tensor([[10, 20], [50, 55]])
    ids, _ = b.search("frame", q, 100, within=within)
    assert sorted(ids.tolist()) == list(range(10, 20)) + list(range(50, 55))
    kv = b.load_kv("frame", torch.tensor([3, n - 1, 3]))
    assert torch.equal(kv, expected_kv("frame", [3, n - 1, 3]))
    b.close()


def test_row_cache_bytes_are_bounded_by_its_rows(tmp_path):
    """Each cached row owns its vector: a view into the fetched batch would keep the whole batch
    alive while any of its rows stays cached, and a bound in rows would not bound the bytes."""
    b = frame_store(tmp_path, 6, row_cache=5)
    n = b.count("frame")
    vecs = b.vectors("frame", torch.arange(n))  # fetches every cold row in one batch
    assert len(b._rows) == 5
    for (level, i), row in b._rows.items():
        assert row[0].base is None and row[0].nbytes == LAYOUT.vector_dim * 4
        assert torch.equal(torch.from_numpy(row[0]), vecs[i].float())
    b.close()


def test_frame_range_search_through_the_scalar_index_is_exact(tmp_path):
    """A search inside frame ranges (the hierarchical retriever's finer levels) finds exactly the blocks
    inside the ranges once lance answers it through its frame_start index, readers see only committed
    blocks, and the ranking is the exact one."""
    b = TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="s", commit_interval=0.0, hot_bytes=0,
                      cold_index="exact")
    for _ in range(4):
        b.add(synth_blocks("patch", b.count("patch"), 16))
        b.flush()
    b.table.build_scalar_indexes()
    b.add(synth_blocks("patch", b.count("patch"), 4))  # rows the index does not cover yet
    b.flush()
    assert "frame_start" in " ".join(str(i) for i in b.table.table().list_indices())
    n = b.count("patch")
    ids = torch.arange(n)
    meta, vecs = b.metadata("patch", ids), b.vectors("patch", ids)
    fs, fe = meta.frame_start.numpy(), meta.frame_end.numpy()
    q = torch.randn(LAYOUT.vector_dim)
    exact = (torch.nn.functional.normalize(vecs, dim=-1) @ torch.nn.functional.normalize(q, dim=0)).numpy()
    for within in ([[3, 7], [40, 41], [60, 90]], [[0, 1]], [[66, 68], [10, 12], [11, 15]], [[5, 5]]):
        w = np.array(within)
        inside = ((fs[:, None] >= w[None, :, 0]) & (fe[:, None] <= w[None, :, 1])).any(1)
        want = np.flatnonzero(inside)[np.argsort(-exact[inside], kind="stable")]
        got, scores = b.search("patch", q, 1000, within=torch.from_numpy(w))
        assert got.tolist() == want.tolist()
        assert np.allclose(scores.numpy(), exact[want], atol=1e-5)
    reader = TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="s", read_only=True, hot_bytes=0)
    b.add(synth_blocks("patch", n, 4))  # committed after the reader opened: not visible to it
    b.flush()
    for span in (2_000, 10_000):  # read and ranked here (scan_frames), or searched by lance
        got, _ = reader.search("patch", q, 1000, within=torch.tensor([[0, span]]))
        assert sorted(got.tolist()) == list(range(n))
    reader.close()
    b.close()


def test_direct_shard_reads_match_zarr(tmp_path):
    """Page-in reads mukv's shards itself (index, then preadv into the caller's rows): the same bytes as
    zarr for any ids (shard-crossing, scattered, chunks never written because they hold only the fill
    value, whole shards never written), into any rows, with the crc32 of what landed."""
    from mukv.backends.disk.files import Files
    from mukv.backends.disk.zarr_kv import KVArchive, block_crc, to_numpy

    shape = (2, 2, 2, 3, 8)  # 384 bytes in bf16
    a = KVArchive(Files(str(tmp_path / "st")), "s", torch.bfloat16, shard_bytes=16 * 384, chunk_bytes=4 * 384)
    kv = torch.randn(64, *shape).to(torch.bfloat16)
    kv[8:12] = 0  # one chunk of zeros inside a shard: zarr stores no bytes for it
    kv[32:48] = 0  # a whole shard of zeros: zarr writes no file for it
    a.write("patch", 0, to_numpy(kv[:40]))
    a.write("patch", 40, to_numpy(kv[40:]))
    g = a.geometry("patch")
    assert g is not None and (g.per_chunk, g.per_shard) == (4, 16)
    shards = tmp_path / "st" / a.rel("patch")
    assert (shards / g.key(0)).is_file() and not (shards / g.key(2)).exists()
    index = np.frombuffer((shards / g.key(0)).read_bytes()[-g.index_bytes : -4], dtype="<u8").reshape(-1, 2)
    assert (index[2] == 2**64 - 1).all() and (index[[0, 1, 3]] < 2**63).all()
    stored = to_numpy(kv)
    rng = np.random.default_rng(0)
    for ids in (np.arange(64), np.array([63, 0, 9, 33, 17, 16, 15]), rng.permutation(64)[:20], np.array([10])):
        out = np.full((70, *shape), 7, dtype=np.uint16)
        rows = rng.permutation(70)[: ids.size]
        crc = a.read_into("patch", ids, out, rows, crc=True)
        assert np.array_equal(out[rows], stored[ids])
        assert np.array_equal(crc, block_crc(stored[ids]))
        untouched = np.setdiff1d(np.arange(70), rows)
        assert (out[untouched] == 7).all()
        a.direct = False
        assert np.array_equal(a.read("patch", ids), stored[ids])
        a.direct = True
    assert np.array_equal(a.read("patch", np.array([5, 5, 40, 5])), stored[[5, 5, 40, 5]])
    ranges = a.locate("patch", np.array([13, 1, 2, 9, 35, 50]))  # 9 and 35 hold no bytes (fill value)
    got = b"".join(path.read_bytes()[offset : offset + n] for path, offset, n in ranges)
    assert got == stored[[1, 2, 13, 50]].tobytes() and [n // 384 for _, _, n in ranges] == [2, 1, 1]
    with pytest.raises(mukv.StoreError, match="patch blocks 3, 64 asked for, 64 have KV on disk"):
        a.read("patch", np.array([3, 64]))


def test_page_in_mixes_hot_cold_and_repeats(tmp_path):
    """``load_kv`` returns the requested blocks in their order whatever is hot, cold or asked twice,
    checks each cold block's crc32, and promotes what it read."""
    b = frame_store(tmp_path, 8, shard_bytes=4096)
    n = b.count("frame")
    hot = [i for i in range(n) if b.hot.lookup("frame", np.array([i]))[0] >= 0]
    assert hot and len(hot) < n
    ids = [n - 1, 0, hot[0], 0, 17, hot[-1], 33, 17, 2]
    before = b.tier_stats()["pagein"]
    assert torch.equal(b.load_kv("frame", torch.tensor(ids)), expected_kv("frame", ids))
    after = b.tier_stats()["pagein"]
    cold = {i for i in ids if i not in hot}
    assert after["blocks_disk"] - before["blocks_disk"] == len(cold)  # each distinct cold block read once
    assert (b.hot.lookup("frame", np.array(sorted(cold))) >= 0).all()  # and promoted
    assert torch.equal(b.load_kv("frame", torch.tensor(ids[::-1])), expected_kv("frame", ids[::-1]))
    b.close()


#: opens a store with the given malloc_mmap_threshold, then allocates buffers of 4 MiB between small ones that
#: stay (as ingest does: KV batches, shards), frees the big ones, and prints the MiB still resident
_MALLOC_CHILD = """
import ctypes, json, sys
from disk_synth import LAYOUT
from mukv.backends.disk import TieredBackend
TieredBackend(LAYOUT, sys.argv[1], "cpu", stream_id="s", malloc_mmap_threshold=json.loads(sys.argv[2])).close()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
base, small, held = rss(), [], []
for _ in range(3):
    big = []
    for _ in range(40):
        big.append(libc.malloc(4 << 20))
        small.append(libc.malloc(1024))
        ctypes.memset(big[-1], 1, 4 << 20)
    held.append(big.pop())  # the newest stays: freed buffers below it cannot be trimmed off the heap's top
    for p in big:
        libc.free(p)
print((rss() - base) >> 20)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's allocator")
def test_pinned_mmap_threshold_gives_freed_buffers_back(tmp_path):
    """glibc keeps freed buffers of a few MiB in its heap once it raised its mmap threshold itself (the RSS
    growth of a week-long ingest); with the threshold the backend pins, they go back to the system."""
    import json
    import subprocess
    import sys

    here = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    kept = {}
    for threshold in (None, 1 << 20):
        args = [sys.executable, "-c", _MALLOC_CHILD, str(tmp_path / f"st{threshold}"), json.dumps(threshold)]
        out = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=here, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        kept[threshold] = int(out.stdout.split()[-1])
    assert kept[None] >= 100  # 156 MiB freed, still resident (+ the 12 MiB held)
    assert kept[1 << 20] < 32  # the 12 MiB held
    with pytest.raises(mukv.ConfigError, match="malloc_mmap_threshold"):
        TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="s", malloc_mmap_threshold=1)


def test_cold_index_is_built_when_the_table_grows(tmp_path):
    b = TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="s", commit_interval=0.0, hot_bytes=0,
                      cold_index="auto", cold_index_rows=256)
    b.table.scalar_index_rows = 256
    for _ in range(3):
        b.add(synth_blocks("frame", b.count("frame"), 128))
        b.flush()
    names = " ".join(str(i) for i in b.table.table().list_indices())
    assert "vector" in names and "block_id" in names
    q = b.vectors("frame", torch.tensor([17]))[0]
    ids, scores = b.search("frame", q, 5)
    assert ids[0].item() == 17 and scores[0].item() == pytest.approx(1.0, abs=1e-5)
    b.close()


def _feed_frame_blocks(b, commits=3, per_commit=128):
    for _ in range(commits):
        b.add(synth_blocks("frame", b.count("frame"), per_commit))
        b.flush()


def _exact_top(b, q, k=10):
    """The ``k`` frame blocks of ``b`` nearest ``q`` by brute-force cosine."""
    unit = torch.nn.functional.normalize(b.vectors("frame", torch.arange(b.count("frame"))).float(), dim=-1)
    return (unit @ torch.nn.functional.normalize(q, dim=0)).topk(k).indices.tolist()


@pytest.mark.parametrize("exact_rows", [500_000, 100, None])
def test_a_level_below_cold_exact_rows_is_searched_exactly_past_the_index(tmp_path, monkeypatch, exact_rows):
    """Past ``cold_index_rows`` the table has its IVF_PQ index, whose partitions lance trains by an
    unseeded k-means; a search over a level of at most ``cold_exact_rows`` blocks bypasses it and
    ranks every block exactly (the brute-force cosine order), so two runs retrieve the same blocks."""
    import lancedb.query as lq

    bypassed = []
    for cls in (lq.LanceVectorQueryBuilder,):
        real = cls.bypass_vector_index
        monkeypatch.setattr(cls, "bypass_vector_index", lambda self, real=real: (bypassed.append(1), real(self))[1])
    opts = {} if exact_rows == 500_000 else {"cold_exact_rows": exact_rows}
    b = TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="s", commit_interval=0.0, hot_bytes=0,
                      cold_index="auto", cold_index_rows=256, **opts)
    assert b.options.cold_exact_rows == exact_rows
    _feed_frame_blocks(b)
    b.table.maintain()
    assert b.table._has_vector_index
    n = b.count("frame")
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        q = torch.randn(LAYOUT.vector_dim, generator=g)
        ids, _ = b.search("frame", q, 10)
        if exact_rows is not None and n <= exact_rows:
            want = _exact_top(b, q)
            assert ids.tolist() == want
    assert bool(bypassed) == (exact_rows is not None and n <= exact_rows)
    b.close()
    # a reader opened on the indexed store (it has not looked for the index) searches the same way
    bypassed.clear()
    r = TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="s", read_only=True, hot_bytes=0, **opts)
    if exact_rows is not None and n <= exact_rows:
        ids, _ = r.search("frame", q, 10)
        assert ids.tolist() == want and bypassed
    else:
        probes = []
        real_np = lq.LanceVectorQueryBuilder.nprobes
        monkeypatch.setattr(lq.LanceVectorQueryBuilder, "nprobes",
                            lambda self, n, real=real_np: (probes.append(n), real(self, n))[1])
        r.search("frame", q, 10)
        assert probes == [r.table.nprobes] and not bypassed  # the index, at mukv's probes and refinement
    r.close()


def test_cold_exact_rows_is_validated(tmp_path):
    with pytest.raises(mukv.ConfigError, match="cold_exact_rows"):
        TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="s", cold_exact_rows=-1)


def test_hierarchical_on_memory_backend_matches_manual_hierarchy():
    from mukv.backends.memory import MemoryBackend
    from mukv.blocks import Query
    from mukv.plugins.retrievers.hierarchical import HierarchicalRetriever

    m = MemoryBackend(LAYOUT)
    for level, w in (("patch", 40), ("frame", 40), ("segment", 10)):
        m.add(synth_blocks(level, 0, w))
    q = Query("q", torch.randn(LAYOUT.vector_dim), 0.0, 40)
    hits = {h.level: h for h in HierarchicalRetriever(over_retrieval=1.0, rerank_n=3).retrieve(
        q, m, {"patch": 5, "frame": 4, "segment": 3})}
    seg_ids, _ = m.search("segment", q.vector, 3)
    assert hits["segment"].ids.tolist() == seg_ids.tolist()
    meta = m.metadata("segment", seg_ids)
    spans = list(zip(meta.frame_start.tolist(), meta.frame_end.tolist()))
    for level in ("patch", "frame"):
        fm = m.metadata(level, hits[level].ids)
        for a, e in zip(fm.frame_start.tolist(), fm.frame_end.tolist()):
            assert any(lo <= a and e <= hi for lo, hi in spans)
    assert len(hits["frame"]) == 4 and len(hits["patch"]) == 5


def test_hierarchical_fills_up_when_segments_are_too_few():
    from mukv.backends.memory import MemoryBackend
    from mukv.blocks import Query
    from mukv.plugins.retrievers.hierarchical import HierarchicalRetriever

    m = MemoryBackend(LAYOUT)
    m.add(synth_blocks("frame", 0, 12))
    m.add(synth_blocks("segment", 0, 3))
    q = Query("q", torch.randn(LAYOUT.vector_dim), 0.0, 12)
    hits = {h.level: h for h in HierarchicalRetriever(over_retrieval=1.0, rerank_n=1).retrieve(
        q, m, {"frame": 10, "segment": 1})}
    assert len(hits["frame"]) == 10 and len(set(hits["frame"].ids.tolist())) == 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_and_page_in(tmp_path):
    b = TieredBackend(LAYOUT, str(tmp_path / "st"), "cuda", stream_id="g", commit_interval=0.0,
                      hot_bytes=8 << 10, hot_slab_bytes=4096)
    for _ in range(6):
        blocks = synth_blocks("segment", b.count("segment"), 16)
        blocks.kv = blocks.kv.cuda()
        b.add(blocks)
    b.flush()
    n = b.count("segment")
    kv = b.load_kv("segment", torch.arange(n))
    assert kv.is_cuda and torch.equal(kv.cpu(), expected_kv("segment", range(n)))
    assert b.hot.arena.is_cuda and b.tier_stats()["pagein"]["blocks_disk"] > 0
    b.close()


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="flock")
def test_one_writer_at_a_time_compacts_the_shared_table(tmp_path):
    """A writer that finds the store's upkeep lock held skips its compaction (no concurrent rewrites
    for lance to drop); with the lock free it compacts."""
    import fcntl

    b = TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="s", commit_interval=0.0, hot_bytes=0)
    for _ in range(3):  # three commits: three fragments to compact
        b.add(synth_blocks("frame", b.count("frame"), 16))
        b.flush()
    idx = b.table
    idx._commits = idx.optimize_every  # its turn to compact
    before = idx.table().version
    fd = os.open(tmp_path / "st" / "streams" / ".upkeep.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another writer is at it
        idx.maintain()
        assert idx.table().version == before
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    idx.maintain()
    assert idx.table().version > before
    ids, _ = b.search("frame", b.vectors("frame", torch.tensor([5]))[0], 1)
    assert ids[0].item() == 5  # nothing lost
    b.close()


def test_a_writer_does_not_rebuild_an_index_another_writer_built(tmp_path):
    """Each writer of a store remembers whether the table has its indexes; one that last looked before
    another writer built them looks again instead of building them a second time."""
    opts = dict(commit_interval=0.0, hot_bytes=0, cold_index="auto", cold_index_rows=256)
    a = TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="a", **opts)
    b = TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="b", **opts)
    b.add(synth_blocks("frame", 0, 4))
    b.flush()
    assert b.table._read_indices(b.table.table()) == (False, False)  # b has looked: none yet
    while a.count("frame") < 300:
        a.add(synth_blocks("frame", a.count("frame"), 16))
        a.flush()
    a.table.maintain()  # a builds the vector index (the scalar ones come later, at more rows)
    assert a.table._read_indices(a.table.table())[1]
    tbl = b.table.table()
    tbl.checkout_latest()
    version = tbl.version
    b.table.maintain()
    assert b.table.table().version == version  # nothing rebuilt
    assert b.table._has_vector_index
    ids, _ = b.search("frame", b.vectors("frame", torch.tensor([2]))[0], 1)
    assert ids[0].item() == 2
    a.close()
    b.close()


def test_by_default_blocks_on_disk_are_searched_exactly_and_no_vector_index_is_built(tmp_path):
    """``cold_index`` is "exact" by default: past ``cold_index_rows`` the table gets its scalar indexes but
    no IVF_PQ index (lance's upkeep degrades it), and every search ranks every stored block."""
    b = TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="s", commit_interval=0.0, hot_bytes=0,
                      cold_index_rows=256)
    assert b.options.cold_index == "exact"
    b.table.scalar_index_rows = 256
    _feed_frame_blocks(b)
    b.table._commits = b.table.optimize_every  # an upkeep turn: compaction too
    b.table.maintain()
    names = " ".join(str(i) for i in b.table.table().list_indices())
    assert "block_id" in names and "vector" not in names
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        q = torch.randn(LAYOUT.vector_dim, generator=g)
        ids, _ = b.search("frame", q, 10)
        assert ids.tolist() == _exact_top(b, q)
    b.close()


def test_tree_bytes_skips_temp_files_and_files_that_vanish(tmp_path, monkeypatch):
    """Sizes are measured while the offload writer writes: a temp file renamed between the listing and
    its stat counts as gone, never as an error (seen: ``mukv ingest`` resumed after SIGTERM failed with
    ENOENT on ``frame.zarr/zarr.<uuid>.partial`` while recording its memory history)."""
    from mukv.backends.disk import files as files_mod

    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 7)
    (tmp_path / "sub" / "zarr.123.partial").write_bytes(b"z" * 100)
    (tmp_path / "link").symlink_to(tmp_path / "a.bin")
    assert files_mod.tree_bytes(tmp_path) == 17
    assert files_mod.tree_bytes(tmp_path / "missing") == 0
    real_walk = os.walk

    def walk_listing_a_vanished_file(root, *a, **k):
        for folder, dirs, names in real_walk(root, *a, **k):
            yield folder, dirs, [*names, "renamed-away.bin"]

    monkeypatch.setattr(files_mod.os, "walk", walk_listing_a_vanished_file)
    assert files_mod.tree_bytes(tmp_path) == 17


def test_tier_stats_while_the_offload_writer_writes(tmp_path):
    """``tier_stats`` (disk bytes) called from another thread throughout background commits never fails."""
    import threading

    b = TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="s", commit_interval=0.0,
                      hot_bytes=8 << 10, hot_slab_bytes=4096)
    stop, errors, seen = threading.Event(), [], []

    def watch():
        while not stop.is_set():
            try:
                seen.append(b.tier_stats()["disk"]["kv_bytes"])
            except Exception as exc:  # noqa: BLE001 - the test reports any failure
                errors.append(exc)
                return

    t = threading.Thread(target=watch)
    t.start()
    try:
        for _ in range(30):
            b.add(synth_blocks("frame", b.count("frame"), 4))
        b.flush()
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert seen and b.tier_stats()["disk"]["kv_bytes"] > 0
    b.close()
