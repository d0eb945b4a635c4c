"""The lancedb backend under a real Session (tiny model, CPU): round trip, reopen, resume, streams."""

from __future__ import annotations

import pytest
import torch

import mukv
from disk_synth import frames
from mukv.session import Session

QUESTION = "what color was the car?"
#: a hot tier far smaller than the stream, so most blocks are answered from disk
SMALL_HOT = {"hot_bytes": 1 << 20, "hot_slab_bytes": 1 << 19, "commit_interval": 0.05}


def _blocks(answer):
    return [(b.level, b.block_id) for b in answer.blocks]


@pytest.fixture(scope="module")
def stored(tiny_model, tmp_path_factory):
    """A store with 32 frames fed through a memory session and a lancedb session alike."""
    path = tmp_path_factory.mktemp("store") / "cam.mukv"
    mem = Session(model=tiny_model, backend="memory")
    disk = Session(model=tiny_model, backend="lancedb", path=path, backend_options=SMALL_HOT)
    f = frames(32)
    assert mem.feed(f) == disk.feed(f)
    return mem, disk, path


def test_answers_match_memory_backend(stored):
    mem, disk, _ = stored
    for q in (QUESTION, "where is the dog?"):
        a, b = mem.ask(q), disk.ask(q)
        assert _blocks(a) == _blocks(b)
        assert a.text == b.text
        for x, y in zip(a.blocks, b.blocks):
            assert x.score == pytest.approx(y.score, abs=1e-5)
            assert (x.frame_start, x.frame_end, x.t_start) == (y.frame_start, y.frame_end, y.t_start)


def test_kv_round_trip_exact(stored):
    mem, disk, _ = stored
    for level in ("patch", "frame", "segment"):
        n = mem.backend.count(level)
        assert disk.backend.count(level) == n
        ids = torch.arange(n).flip(0)
        assert torch.equal(mem.backend.load_kv(level, ids), disk.backend.load_kv(level, ids))
        assert torch.equal(mem.backend.positions(level, ids), disk.backend.positions(level, ids))
        assert torch.equal(mem.backend.token_index(level, ids), disk.backend.token_index(level, ids))
        assert torch.allclose(mem.backend.vectors(level, ids), disk.backend.vectors(level, ids))


def test_hot_tier_stays_within_budget_and_pages_in(stored):
    _, disk, _ = stored
    ts = disk.backend.tier_stats()
    assert ts["hot"]["budget_bytes"] <= SMALL_HOT["hot_bytes"]
    assert ts["hot"]["used_bytes"] <= ts["hot"]["budget_bytes"]
    assert ts["hot"]["evicted"] > 0  # the stream outgrew the hot tier
    assert ts["pagein"]["blocks_disk"] > 0  # questions were answered from disk


def test_reopen_answers_same_blocks_and_resumes(stored, tiny_model):
    mem, disk, path = stored
    before = disk.ask(QUESTION)
    disk.close()
    with pytest.raises(mukv.MukvError):
        disk.ask(QUESTION)
    again = Session.open(path, model=tiny_model, backend_options=SMALL_HOT)
    assert again.stats()["frames"] == 32
    after = again.ask(QUESTION)
    assert _blocks(after) == _blocks(before)
    assert after.text == before.text
    # ingestion resumes where it stopped: same blocks as a session that never stopped
    more = frames(8, seed=1)
    assert again.feed(more) == mem.feed(more)
    for level in ("patch", "frame", "segment"):
        assert again.backend.count(level) == mem.backend.count(level)
        ids = torch.arange(mem.backend.count(level))
        assert torch.equal(again.backend.load_kv(level, ids), mem.backend.load_kv(level, ids))
    assert _blocks(again.ask(QUESTION)) == _blocks(mem.ask(QUESTION))
    again.close()


@pytest.mark.parametrize("retriever", ["hierarchical", "semi_hierarchical"])
def test_retrievers_over_both_tiers(tiny_model, tmp_path, retriever):
    cfg = {"retrieval": {"retriever": retriever}}
    mem = Session(model=tiny_model, backend="memory", config=cfg)
    disk = Session(model=tiny_model, backend="lancedb", path=tmp_path / "s", config=cfg, backend_options=SMALL_HOT)
    f = frames(24, seed=2)
    mem.feed(f)
    disk.feed(f)
    a, b = mem.ask(QUESTION), disk.ask(QUESTION)
    assert _blocks(a) == _blocks(b)
    ts = disk.backend.tier_stats()
    assert ts["hot"]["evicted"] > 0 and ts["pagein"]["blocks_disk"] > 0
    disk.close()


def test_hierarchical_stays_inside_chosen_segments(tiny_model, tmp_path):
    s = Session(model=tiny_model, backend="lancedb", path=tmp_path / "h", backend_options=SMALL_HOT,
                config={"retrieval": {"retriever": "hierarchical", "over_retrieval": 1.0, "rerank_n": 2},
                        "levels": [
                            {"name": "patch", "extractor": "patch_raster", "frames": 1, "tokens": 49,
                             "keep_ratio": 0.1, "top_k": 4},
                            {"name": "frame", "extractor": "frame", "frames": 1, "keep_ratio": 0.1, "top_k": 3},
                            {"name": "segment", "extractor": "segment", "frames": 4, "keep_ratio": 0.8, "top_k": 2},
                        ]})
    s.feed(frames(40, seed=3))
    a = s.ask(QUESTION)
    segs = [(b.frame_start, b.frame_end) for b in a.blocks if b.level == "segment"]
    assert len(segs) == 2
    for b in a.blocks:
        if b.level != "segment":
            assert any(lo <= b.frame_start and b.frame_end <= hi for lo, hi in segs), b
    s.close()


def test_several_streams_in_one_store(tiny_model, tmp_path):
    path = tmp_path / "multi"
    a = Session(model=tiny_model, backend="lancedb", path=path, stream_id="cam-1")
    b = Session(model=tiny_model, backend="lancedb", path=path, stream_id="cam_2.left")
    a.feed(frames(8, seed=4))
    b.feed(frames(12, seed=5))
    qa, qb = a.ask(QUESTION), b.ask(QUESTION)
    a.close()
    b.close()
    ra = Session.open(path, stream_id="cam-1", model=tiny_model)
    rb = Session.open(path, stream_id="cam_2.left", model=tiny_model)
    assert ra.stats()["frames"] == 8 and rb.stats()["frames"] == 12
    assert ra.backend.count("segment") == 2 and rb.backend.count("segment") == 3
    assert _blocks(ra.ask(QUESTION)) == _blocks(qa)
    assert _blocks(rb.ask(QUESTION)) == _blocks(qb)
    with pytest.raises(mukv.StoreError, match="no mukv stream"):
        Session.open(path, stream_id="cam-3", model=tiny_model)
    ra.close()
    rb.close()


def test_a_stream_held_whole_in_the_hot_tier_is_searched_without_the_index(tiny_model, tmp_path):
    """Every block hot: a question makes no query of the index on disk (whose cost grows with its
    fragments, one per commit) and retrieves what the same stream retrieves from disk alone."""
    import numpy as np

    rng = np.random.default_rng(3)
    frames = rng.integers(0, 255, (12, 64, 64, 3), dtype=np.uint8)
    answers = {}
    for name, hot in (("hot", 64 << 20), ("cold", 0)):
        with mukv.Session(model=tiny_model, backend="lancedb", path=tmp_path / name,
                          backend_options={"hot_bytes": hot}) as s:
            for i in range(0, 12, 3):
                s.feed(frames[i : i + 3])
            s.flush()
            calls = []
            real = s.backend.table.search
            s.backend.table.search = lambda *a, **k: calls.append(1) or real(*a, **k)
            a = s.ask("what color was the car?", max_new_tokens=2)
            answers[name] = [(b.level, b.block_id) for b in a.blocks]
            a2 = s.ask("what color was the car?", max_new_tokens=2, since=2.0, until=14.0)
            answers[name + "-window"] = [(b.level, b.block_id) for b in a2.blocks]
            assert (len(calls) == 0) == (name == "hot"), (name, calls)
    assert answers["hot"] == answers["cold"] and answers["hot-window"] == answers["cold-window"]
