"""Units of the disk tier: hot tier slots and budget, eviction policies, filters, options, hierarchy."""

from __future__ import annotations

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
    assert w.endswith("((frame_start >= 0 AND frame_end <= 4) OR (frame_start >= 8 AND frame_end <= 16))")
    assert merge_ranges(np.array([[4, 8], [0, 4], [20, 21]])) == [(0, 8), (20, 21)]
    for bad in ("x' OR 1=1 --", "a b", "../x"):
        with pytest.raises(mukv.StoreError):
            where(bad, "patch", 1)
        with pytest.raises(mukv.StoreError):
            where("s", bad, 1)


def test_search_merges_hot_and_cold_exactly(tmp_path):
    b = TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="s", commit_interval=0.0,
                      hot_bytes=8 << 10, hot_slab_bytes=4096)
    for _ in range(10):
        b.add(synth_blocks("frame", b.count("frame"), 8))
    b.flush()
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


def test_cold_index_is_built_when_the_table_grows(tmp_path):
    b = TieredBackend(LAYOUT, str(tmp_path / "st"), "cpu", stream_id="s", commit_interval=0.0, hot_bytes=0,
                      cold_index_rows=256)
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
