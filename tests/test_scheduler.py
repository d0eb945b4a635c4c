"""The ingest scheduler for many streams (mukv.scheduler, mukv.batching) on CPU with the tiny model.

Batched blocks equal each stream ingested alone; fairness and the latency target with a fake clock;
a stream whose store fails is rolled back alone; questions go before batches.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import mukv
from mukv.batching import BatchIngest, FeedItem, same_component
from mukv.errors import ConfigError, InputError, StoreError
from mukv.reference import compare_kept
from mukv.scheduler import BatchPolicy, IngestScheduler, SchedulerConfig, Waiting


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class RecordingScorer:
    """Wraps a session's scorer and keeps every score it returns, in block order."""

    def __init__(self, inner):
        self.inner, self.scores = inner, []
        self.needs_attention = getattr(inner, "needs_attention", False)

    def score(self, blocks):
        s = self.inner.score(blocks)
        self.scores.append(s.detach().clone())
        return s


def alone(model, frames_list, times_list=None):
    """A session fed ``frames_list`` one feed each, its scores recorded per level."""
    s = mukv.Session(model=model)
    rec = {}
    for lp in s.levels:
        lp.scorer = rec[lp.level.name] = RecordingScorer(lp.scorer)
    for i, f in enumerate(frames_list):
        s.feed(f, None if times_list is None else times_list[i])
    return s, rec


def assert_same_blocks(batched, ref, rec):
    """Every level of ``batched`` holds the blocks of ``ref``: KV and vectors to rounding, the same kept
    tokens up to ties of the reference's scores, the same frames and times."""
    for lp in ref.levels:
        name = lp.level.name
        n = ref.backend.count(name)
        assert batched.backend.count(name) == n, name
        if n == 0:
            continue
        ids = torch.arange(n)
        kept_b = batched.backend.token_index(name, ids)
        kept_r = ref.backend.token_index(name, ids)
        if rec[name].scores:
            cmp = compare_kept(kept_b, kept_r, torch.cat(rec[name].scores))
            assert cmp["identical"] == cmp["blocks"] or cmp["max_gap"] < 1e-5, (name, cmp)
        else:  # a level keeping every token
            assert torch.equal(kept_b, kept_r)
        same = (kept_b.sort(1).values == kept_r.sort(1).values).all(1)
        torch.testing.assert_close(batched.backend.load_kv(name, ids)[same], ref.backend.load_kv(name, ids)[same],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched.backend.vectors(name, ids)[same], ref.backend.vectors(name, ids)[same],
                                   rtol=1e-4, atol=1e-5)
        mb, mr = batched.backend.metadata(name, ids), ref.backend.metadata(name, ids)
        for f in ("frame_start", "frame_end", "t_start", "t_end"):
            assert torch.equal(getattr(mb, f), getattr(mr, f)), (name, f)
    assert batched.stats()["frames"] == ref.stats()["frames"]
    assert batched._stream.last_time == ref._stream.last_time
    assert batched._stream.ingestor.cursor == ref._stream.ingestor.cursor


# ---------------------------------------------------------------------------------------------- equality
def test_blocks_do_not_depend_on_the_streams_sharing_their_batch(tiny_model, frames):
    """Three streams batched together, over two batches (pending frames carried across), store what
    each stores fed alone; one vision-tower batch and one prefill per level serve all of them."""
    data = [frames(5, seed=1), frames(3, seed=2), frames(6, seed=3)]
    times = [None, np.array([0.5, 7.0, 9.25]), None]
    refs = [alone(tiny_model, [f], [t]) for f, t in zip(data, times)]
    clock = FakeClock()
    sched = IngestScheduler({"latency_target_s": 5}, clock=clock)
    sessions = [mukv.Session(model=tiny_model) for _ in data]
    for s, f, t in zip(sessions, data, times):
        sched.submit(s, f[:2], None if t is None else t[:2])
    first = sched.step()
    assert first is not None and all(r.ok for r in first.results)
    assert first.stats.encode_batches == 1 and first.stats.streams == 3 and first.stats.frames == 6
    assert first.stats.prefill_batches == 2  # patch and frame blocks of all three streams; no segment is complete
    for s, f, t in zip(sessions, data, times):
        sched.submit(s, f[2:], None if t is None else t[2:])
    second = sched.drain()
    assert len(second) == 1 and second[0].stats.prefill_batches == 3
    for s, (ref, rec) in zip(sessions, refs):
        assert_same_blocks(s, ref, rec)
        assert s.ask("what happened?", max_new_tokens=3).text == ref.ask("what happened?", max_new_tokens=3).text


def test_prefill_batches_split_windows_across_streams(tiny_model, frames):
    """A prefill cap smaller than the streams' windows cuts batches across stream boundaries
    (other batch sizes than alone) and still stores the same blocks."""
    data = [frames(4, seed=5), frames(5, seed=6)]
    refs = [alone(tiny_model, [f]) for f in data]
    tpf = tiny_model.tokens_per_frame
    sessions = [mukv.Session(model=tiny_model) for _ in data]
    batch = BatchIngest(encode_batch_frames=3, prefill_batch_tokens=3 * tpf)
    results, stats = batch.run([FeedItem.of(s, f) for s, f in zip(sessions, data)])
    assert all(r.ok for r in results)
    assert stats.encode_batches == 3  # 9 frames, 3 at a time, across the two streams
    assert stats.prefill_batches > 3
    for s, (ref, rec) in zip(sessions, refs):
        assert_same_blocks(s, ref, rec)


def test_streams_of_other_configurations_share_a_batch_by_level_kind(tiny_model, frames):
    """Levels alike (same split, scorer, compressor, keep ratio) batch together whatever their
    retrieval settings; a level made otherwise gets its own prefill."""
    f1, f2, f3 = frames(4, seed=7), frames(4, seed=8), frames(4, seed=9)
    a = mukv.Session(model=tiny_model)
    b = mukv.Session(model=tiny_model, config={"levels": [dict(lv.model_dump(), top_k=3) for lv in a.config.levels]})
    other = [dict(lv.model_dump()) for lv in a.config.levels]
    other[1]["keep_ratio"] = 0.5  # the frame level keeps more
    c = mukv.Session(model=tiny_model, config={"levels": other})
    assert same_component(a.levels[0].scorer, b.levels[0].scorer)
    results, stats = BatchIngest().run([FeedItem.of(a, f1), FeedItem.of(b, f2), FeedItem.of(c, f3)])
    assert all(r.ok for r in results)
    assert stats.kinds == 4 and stats.prefill_batches == 4  # patch, frame, segment; and c's frame level
    ref, rec = alone(tiny_model, [f3])
    ref_c = mukv.Session(model=tiny_model, config={"levels": other})
    ref_c.feed(f3)
    assert c.backend.count("frame") == ref_c.backend.count("frame") == 4
    ids = torch.arange(4)
    assert c.backend.load_kv("frame", ids).shape == ref_c.backend.load_kv("frame", ids).shape
    torch.testing.assert_close(c.backend.vectors("frame", ids), ref_c.backend.vectors("frame", ids),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- isolation
def test_a_failed_commit_rolls_back_its_stream_alone(tiny_model, frames, monkeypatch):
    data = [frames(4, seed=11), frames(4, seed=12), frames(4, seed=13)]
    sessions = [mukv.Session(model=tiny_model) for _ in data]
    sessions[0].feed(frames(1, seed=10))  # something committed before, which must stay
    bad = sessions[1]

    def refuse(*a, **k):
        raise StoreError("the disk is full")

    monkeypatch.setattr(bad.backend, "commit", refuse)
    before = {lp.level.name: sessions[0].backend.count(lp.level.name) for lp in sessions[0].levels}
    results, stats = BatchIngest().run([FeedItem.of(s, f) for s, f in zip(sessions, data)])
    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(results[1].error, StoreError) and stats.failed == 1
    assert all(bad.backend.count(lp.level.name) == 0 for lp in bad.levels)  # its blocks rolled back
    assert bad.stats()["frames"] == 0 and bad._stream.last_time is None
    assert bad._stream.ingestor.pending_frames() is None
    assert all(sessions[0].backend.count(n) > before[n] for n in ("patch", "frame"))
    assert sessions[2].stats()["frames"] == 4 and sessions[2].backend.count("segment") == 1
    monkeypatch.undo()
    bad.feed(data[1])  # the stream goes on as if the failed feed never happened
    ref, rec = alone(tiny_model, [data[1]])
    assert_same_blocks(bad, ref, rec)


def test_a_store_that_refuses_blocks_fails_its_stream_alone(tiny_model, frames, monkeypatch):
    data = [frames(4, seed=14), frames(4, seed=15)]
    sessions = [mukv.Session(model=tiny_model) for _ in data]
    calls = {"n": 0}
    real_add = sessions[0].backend.add

    def add_then_fail(blocks):
        calls["n"] += 1
        if calls["n"] == 2:  # the second level's blocks
            raise StoreError("write failed")
        return real_add(blocks)

    monkeypatch.setattr(sessions[0].backend, "add", add_then_fail)
    results, _ = BatchIngest().run([FeedItem.of(s, f) for s, f in zip(sessions, data)])
    assert [r.ok for r in results] == [False, True]
    assert all(sessions[0].backend.count(lp.level.name) == 0 for lp in sessions[0].levels)
    ref, rec = alone(tiny_model, [data[1]])
    assert_same_blocks(sessions[1], ref, rec)


def test_non_finite_kv_of_one_stream_is_refused_alone_with_one_check_per_batch(tiny_model, frames, monkeypatch):
    """The batch checks its blocks' KV once (not one device synchronisation per stream's store); a
    stream whose blocks hold NaN fails alone with an InputError and stores nothing, the others store
    their blocks, marked checked, so the backend does not check them again."""
    import mukv.batching as batching

    data = [frames(4, seed=30), frames(4, seed=31)]
    sessions = [mukv.Session(model=tiny_model) for _ in data]
    real = batching.compress_blocks

    def poisoned(lp, *a, **k):
        out = real(lp, *a, **k)
        if lp.level.name == "frame":
            out.kv[1] = float("nan")  # the second frame block of the first stream
        return out

    monkeypatch.setattr(batching, "compress_blocks", poisoned)
    seen = []
    real_add = sessions[1].backend.add
    monkeypatch.setattr(sessions[1].backend, "add", lambda b: (seen.append(b.finite), real_add(b))[1])
    checks = []
    real_encode = type(sessions[1].backend.codec).encode_blocks

    def encode(self, kv, known_finite=False):
        checks.append(known_finite)
        return real_encode(self, kv, known_finite)

    monkeypatch.setattr(type(sessions[1].backend.codec), "encode_blocks", encode)
    results, _ = BatchIngest().run([FeedItem.of(s, f) for s, f in zip(sessions, data)])
    assert [r.ok for r in results] == [False, True]
    assert isinstance(results[0].error, InputError) and "NaN" in str(results[0].error)
    assert "'frame'" in str(results[0].error) and "rows [1]" in str(results[0].error)
    assert all(sessions[0].backend.count(lp.level.name) == 0 for lp in sessions[0].levels)
    assert sessions[0].stats()["frames"] == 0
    assert seen and all(seen) and checks and all(checks)
    ref, rec = alone(tiny_model, [data[1]])
    assert_same_blocks(sessions[1], ref, rec)


def test_a_backend_checks_checked_kv_again_when_it_converts_it(tiny_model):
    """``finite`` vouches for the values given, not for a narrower dtype they are stored in: a float32
    batch marked checked whose values overflow float16 is refused by a float16 store."""
    from backends.memory import MemoryBackend
    from mukv.blocks import CompressedBlocks, KVLayout

    lay = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float16)
    be = MemoryBackend(layout=lay)
    kv = torch.full((1, 2, 2, 1, 3, 4), 1e6)
    blocks = CompressedBlocks(level="frame", kv=kv, vectors=torch.ones(1, 4), kept=torch.arange(3)[None],
                              positions=torch.arange(3)[None], frame_start=torch.zeros(1, dtype=torch.int64),
                              frame_end=torch.ones(1, dtype=torch.int64), t_start=torch.zeros(1, dtype=torch.float64),
                              t_end=torch.zeros(1, dtype=torch.float64), token_index=torch.arange(3)[None], finite=True)
    with pytest.raises(InputError, match="NaN or infinite"):
        be.add(blocks)
    assert be.count("frame") == 0
    blocks.kv = torch.ones_like(kv)
    be.add(blocks)
    assert be.count("frame") == 1


def _withdrawing_batch(model, frames, seeds, who: int, at: int, **batch):
    """One batch of two streams (4 frames each, of ``seeds``) whose stream ``who`` is withdrawn at the
    ``at``-th stage boundary; returns the sessions, their frames, the results, the batch's stats and
    the number of streams offered at each boundary."""
    data = [frames(4, seed=seed) for seed in seeds]
    sessions = [mukv.Session(model=model) for _ in data]
    bi = BatchIngest(**batch)
    calls: list[int] = []

    def withdraw(staying):
        calls.append(len(staying))
        return [sessions[who]] if len(calls) == at else []

    bi.withdraw = withdraw
    results, stats = bi.run([FeedItem.of(s, f) for s, f in zip(sessions, data)])
    return sessions, data, results, stats, calls


def test_withdraw_is_asked_at_every_stage_boundary_but_the_last(tiny_model, frames):
    """A stream can leave a batch after the vision tower and after each level kind but the last
    (past it, only its commit is left); one withdrawn after the patch level stores nothing."""
    sessions, data, results, stats, calls = _withdrawing_batch(tiny_model, frames, (32, 33), who=0, at=2)
    assert stats.kinds == 3 and calls == [2, 2, 1]
    assert results[0].withdrawn and results[0].blocks == 0 and results[1].ok
    assert all(sessions[0].backend.count(lp.level.name) == 0 for lp in sessions[0].levels)
    assert sessions[0].stats()["frames"] == 0
    got: list[bool] = []  # released: another thread can take the stream's locks
    t = threading.Thread(target=lambda: got.extend(lk.acquire(timeout=5) and (lk.release() or True)
                                                   for lk in (sessions[0]._lock, sessions[0]._stream.lock)))
    t.start()
    t.join(30)
    assert got == [True, True]
    sessions[0].feed(data[0])  # unlocked, and fed as if the batch had never held it
    ref, rec = alone(tiny_model, [data[0]])
    assert_same_blocks(sessions[0], ref, rec)
    ref1, rec1 = alone(tiny_model, [data[1]])
    assert_same_blocks(sessions[1], ref1, rec1)


def test_each_vision_tower_batch_ends_a_stage(tiny_model, frames):
    """With vision-tower batches of 4 frames, two streams of 4 frames make two such batches with a
    stage boundary between them; a stream withdrawn there is not encoded at all."""
    sessions, data, results, stats, calls = _withdrawing_batch(tiny_model, frames, (34, 35), who=1, at=1,
                                                               encode_batch_frames=4)
    assert calls == [2, 1, 1, 1] and stats.encode_batches == 1
    assert results[0].ok and results[1].withdrawn and sessions[1].stats()["frames"] == 0
    ref, rec = alone(tiny_model, [data[0]])
    assert_same_blocks(sessions[0], ref, rec)


def test_a_failure_of_the_shared_work_is_isolated_by_feeding_each_stream_alone(tiny_model, frames, monkeypatch):
    poisoned = frames(2, seed=16)
    poisoned[:, 0, 0, :] = (255, 0, 255)  # a marker the failing vision tower recognises
    good = [frames(2, seed=17), frames(3, seed=18)]
    real = tiny_model.encode_frames

    def encode(f):
        if bool(((f[:, 0, 0] == torch.tensor([255, 0, 255], dtype=torch.uint8)).all(-1)).any()):
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return real(f)

    monkeypatch.setattr(tiny_model, "encode_frames", encode)
    sessions = [mukv.Session(model=tiny_model) for _ in range(3)]
    results, stats = BatchIngest().run([FeedItem.of(s, f) for s, f in zip(sessions, [poisoned, *good])])
    assert stats.retried_alone and [r.ok for r in results] == [False, True, True]
    assert all(r.alone for r in results)
    assert sessions[0].stats()["frames"] == 0 and sessions[2].stats()["frames"] == 3
    no_retry, _ = BatchIngest(isolate_failures=False).run(
        [FeedItem.of(s, f) for s, f in zip([mukv.Session(model=tiny_model) for _ in range(2)], [poisoned, good[0]])])
    assert [r.ok for r in no_retry] == [False, False]


def test_a_scheduler_records_the_frames_a_failed_feed_lost_as_a_gap(tiny_model, frames, monkeypatch):
    clock = FakeClock()
    sched = IngestScheduler(clock=clock)
    s = mukv.Session(model=tiny_model)
    sched.submit(s, frames(2))
    state = {"fail": True}
    real = s.backend.commit

    def commit(values, files=None):
        if state["fail"] and values.get("frames_seen"):
            raise StoreError("refused")
        return real(values, files)

    monkeypatch.setattr(s.backend, "commit", commit)
    report = sched.step()
    assert not report.results[0].ok and sched.totals["failed_feeds"] == 1
    gaps = s.stats()["gaps"]
    assert len(gaps) == 1 and gaps[0]["frames"] == 2 and "not stored" in gaps[0]["reason"]
    state["fail"] = False
    sched.submit(s, frames(1, seed=3))  # times go on after the lost frames
    assert sched.step(force=True).results[0].ok
    assert s.stats()["frames"] == 1 and s._stream.last_time == 4.0


# ---------------------------------------------------------------------------------------------- policy
def test_policy_latency_target_with_a_fake_clock():
    p = BatchPolicy(SchedulerConfig(latency_target_s=5.0, max_batch_frames=8, max_stream_frames=4))
    assert p.due_in([], 0.0) is None
    w = [Waiting("a", 1, oldest=10.0)]
    assert p.due_in(w, 10.0) == 0.0  # nothing measured yet: the first batch runs at once
    p.observe(frames=4, seconds=0.0)
    assert p.due_in(w, 10.0) == pytest.approx(5.0) and p.pick(w, 12.0) == []
    assert p.pick(w, 15.0) == [("a", 1)]
    p.observe(frames=10, seconds=10.0)  # 0.3 s per frame now (running estimate)
    assert p.seconds_per_frame == pytest.approx(0.3)
    w = [Waiting("a", 2, oldest=20.0), Waiting("b", 2, oldest=21.0)]
    assert p.due_in(w, 20.0) == pytest.approx(5.0 - 4 * 0.3)  # early enough for a batch of 4 frames
    full = [Waiting("a", 4, oldest=30.0), Waiting("b", 4, oldest=30.0)]
    assert p.due_in(full, 30.0) == 0.0  # a full batch runs at once
    assert p.pick(w, 20.0, force=True) == [("a", 2), ("b", 2)]


def test_policy_is_fair_oldest_first_with_a_cap_per_stream():
    p = BatchPolicy(SchedulerConfig(max_batch_frames=4, max_stream_frames=2))
    p.observe(1, 0.0)
    w = [Waiting("busy", 100, oldest=0.0), Waiting("quiet", 1, oldest=5.0), Waiting("late", 3, oldest=9.0)]
    assert p.pick(w, 100.0) == [("busy", 2), ("quiet", 1), ("late", 1)]


def test_policy_never_starves_a_stream():
    """Twenty backlogged streams and a batch room for eight frames: every stream is served at least once
    every three batches (equal arrivals are taken in turn)."""
    p = BatchPolicy(SchedulerConfig(max_batch_frames=8, max_stream_frames=1))
    p.observe(1, 0.0)
    last = {}
    rng = np.random.default_rng(0)
    for step in range(60):
        w = [Waiting(k, int(rng.integers(1, 5)), oldest=0.0) for k in range(20)]
        for key, n in p.pick(w, 1000.0):
            assert n == 1
            last[key] = step
        if step >= 3:
            assert all(step - last.get(k, -1) <= 3 for k in range(20)), (step, last)


def test_scheduler_latency_target_and_full_batches(tiny_model, frames):
    clock = FakeClock()
    sched = IngestScheduler({"latency_target_s": 5, "max_batch_frames": 3, "max_stream_frames": 3}, clock=clock)
    a, b = mukv.Session(model=tiny_model), mukv.Session(model=tiny_model)
    sched.submit(a, frames(1))
    assert sched.step() is not None  # the first batch runs at once and measures the batch time (0 here)
    clock.t = 10.0
    sched.submit(a, frames(1, seed=1))
    clock.t = 12.0
    sched.submit(b, frames(1, seed=2))
    assert sched.due_in() == pytest.approx(3.0)
    assert sched.step() is None and sched.waiting() == 2
    clock.t = 15.0  # the oldest frame (arrived at 10) reaches its target: both go
    report = sched.step()
    assert report is not None and sorted(r.frames for r in report.results) == [1, 1]
    assert report.latencies().tolist() == [5.0, 3.0]
    clock.t = 20.0
    sched.submit(b, frames(3, seed=3))  # a full batch does not wait
    assert sched.due_in() == 0.0 and sched.step().stats.frames == 3
    assert a.stats()["frames"] == 2 and b.stats()["frames"] == 4


def test_scheduler_serves_a_stream_with_little_traffic_next_to_a_backlog(tiny_model, frames):
    clock = FakeClock()
    sched = IngestScheduler({"max_batch_frames": 3, "max_stream_frames": 2}, clock=clock)
    busy, quiet = mukv.Session(model=tiny_model), mukv.Session(model=tiny_model)
    sched.submit(busy, frames(6))
    clock.t = 1.0
    sched.submit(quiet, frames(1, seed=1))
    first = sched.step(force=True)
    assert {id(r.session): r.frames for r in first.results} == {id(busy): 2, id(quiet): 1}


# ---------------------------------------------------------------------------------------------- questions
def test_questions_go_before_the_next_batch(tiny_model, frames, monkeypatch):
    """A question waits for the batch running, then goes before the next batch; after
    ``questions_per_batch`` questions in a row the batch goes. (Withdrawal off: the questions are on the
    batch's stream, which would otherwise leave the batch for them.)"""
    sched = IngestScheduler({"questions_per_batch": 1, "withdraw_asked": False})
    s = mukv.Session(model=tiny_model)
    s.feed(frames(2))
    log: list[str] = []
    release = threading.Event()
    entered = threading.Event()
    real_run = sched.batcher.run

    def run(items):
        log.append("batch")
        entered.set()
        release.wait(60)
        return real_run(items)

    monkeypatch.setattr(sched.batcher, "run", run)
    real_ask = s.ask
    monkeypatch.setattr(s, "ask", lambda q, **k: (log.append(q), real_ask(q, max_new_tokens=1))[1])
    sched.submit(s, frames(1, seed=1))
    t1 = threading.Thread(target=sched.step, kwargs={"force": True})
    t1.start()
    assert entered.wait(60)
    asks = [threading.Thread(target=sched.ask, args=(s, q)) for q in ("q1", "q2")]
    asks[0].start()
    _wait(lambda: sched._asks == 1)
    sched.submit(s, frames(1, seed=2))
    t2 = threading.Thread(target=sched.step, kwargs={"force": True})
    t2.start()
    _wait(lambda: sched._batch_waiting)
    asks[1].start()
    _wait(lambda: sched._asks == 2)
    entered.clear()
    release.set()
    for t in (t1, t2, *asks):
        t.join(120)
    # q1 and q2 both waited for the first batch; one question, then the batch, then the other question
    assert log[0] == "batch" and log[2] == "batch" and sorted([log[1], log[3]]) == ["q1", "q2"]
    assert s.stats()["frames"] == 4 and sched.totals["questions"] == 2


def _stalled_batch(sched, monkeypatch, log):
    """Make the scheduler's next batch stop after its vision tower until ``release`` is set, logging
    its stages ("encode", "levels" after each level kind, "commit")."""
    release, encoded = threading.Event(), threading.Event()
    b = sched.batcher
    real_encode, real_kind, real_commit = b._encode, b._run_kind, b._commit

    def encode(*a):
        real_encode(*a)
        log.append("encode")
        encoded.set()
        assert release.wait(60)

    def run_kind(*a):
        real_kind(*a)
        log.append("levels")

    def commit(*a):
        log.append("commit")
        real_commit(*a)

    monkeypatch.setattr(b, "_encode", encode)
    monkeypatch.setattr(b, "_run_kind", run_kind)
    monkeypatch.setattr(b, "_commit", commit)
    return release, encoded


def _logged_ask(session, log, monkeypatch, name):
    real_ask = session.ask
    monkeypatch.setattr(session, "ask", lambda q, **k: (log.append(name), real_ask(q, max_new_tokens=1))[1])


def _ask_during_a_stalled_batch(sched, fed, asked, frames, monkeypatch, submit: int = 4) -> list[str]:
    """Run a batch of ``fed``'s frames (``submit`` more of them queued first), ask on ``asked`` while
    the batch is stalled after its vision tower, then let it go on; returns the log of stages and
    the question ("question")."""
    log: list[str] = []
    release, encoded = _stalled_batch(sched, monkeypatch, log)
    _logged_ask(asked, log, monkeypatch, "question")
    if submit:
        sched.submit(fed, frames(submit))
    batch = threading.Thread(target=sched.step, kwargs={"force": True})
    batch.start()
    assert encoded.wait(60)
    q = threading.Thread(target=sched.ask, args=(asked, "what?"))
    q.start()
    _wait(lambda: sched._asks == 1)
    release.set()
    for t in (batch, q):
        t.join(120)
    return log


@pytest.mark.parametrize("lend", [True, False])
def test_a_question_on_another_stream_runs_between_the_stages_of_a_batch(tiny_model, frames, monkeypatch, lend):
    """A batch lends the model to questions on streams it does not hold at its stage boundaries: the
    question runs after the vision tower, before the level forwards; the batch then stores all.
    With ``lend_between_stages`` off the question waits for the batch's commit."""
    sched = IngestScheduler({"lend_between_stages": lend})
    a, b = mukv.Session(model=tiny_model), mukv.Session(model=tiny_model)
    b.feed(frames(4, seed=5))
    log = _ask_during_a_stalled_batch(sched, a, b, frames, monkeypatch)
    if lend:
        assert log[:3] == ["encode", "question", "levels"] and log[-1] == "commit"
    else:
        assert log[0] == "encode" and log[-1] == "question" and log.index("commit") < len(log) - 1
    assert a.stats()["frames"] == 4 and sched.totals["questions"] == 1


def test_a_question_on_a_stream_of_the_running_batch_waits_for_its_commit_without_withdrawal(
        tiny_model, frames, monkeypatch):
    sched = IngestScheduler({"withdraw_asked": False})
    a = mukv.Session(model=tiny_model)
    a.feed(frames(4, seed=5))
    log = _ask_during_a_stalled_batch(sched, a, a, frames, monkeypatch)
    assert log[-1] == "question" and log.index("commit") < log.index("question")
    assert a.stats()["frames"] == 8 and sched.totals["withdrawn"] == 0


def test_a_question_takes_its_stream_out_of_the_running_batch(tiny_model, frames, monkeypatch):
    """A question on a stream of the running batch withdraws the stream at the next stage boundary:
    its feed is rolled back, the question reads what it last committed (the answer it would get
    before the batch), the other streams of the batch commit, and the withdrawn frames go back in
    front of the stream's queue: the next batch stores them as a feed alone would, no gap recorded."""
    sched = IngestScheduler()
    a, b = mukv.Session(model=tiny_model), mukv.Session(model=tiny_model)
    first, later, other = frames(4, seed=5), frames(4, seed=6), frames(4, seed=7)
    a.feed(first)
    before = a.ask("what happened?", max_new_tokens=3).text
    log: list[str] = []
    release, encoded = _stalled_batch(sched, monkeypatch, log)
    answers: list[str] = []
    real_ask = a.ask

    def ask(q, **k):
        log.append("question")
        answers.append(real_ask(q, max_new_tokens=3).text)
        return answers[-1]

    monkeypatch.setattr(a, "ask", ask)
    sched.submit(a, later)
    sched.submit(b, other)
    reports: list = []
    batch = threading.Thread(target=lambda: reports.append(sched.step(force=True)))
    batch.start()
    assert encoded.wait(60)
    sched.submit(a, frames(2, seed=8))  # arrives during the batch: queued behind the withdrawn frames
    q = threading.Thread(target=sched.ask, args=(a, "what happened?"))
    q.start()
    _wait(lambda: sched._asks == 1)
    release.set()
    for t in (batch, q):
        t.join(120)
    assert log[:2] == ["encode", "question"] and "commit" in log
    assert answers == [before]
    (report,) = reports
    res = {id(r.session): r for r in report.results}
    assert res[id(a)].withdrawn and not res[id(a)].ok and res[id(a)].error is None and res[id(a)].blocks == 0
    assert res[id(b)].ok and b.stats()["frames"] == 4
    assert a.stats()["frames"] == 4 and sched.waiting(a) == 6
    assert sched.totals["withdrawn"] == 1 and sched.totals["failed_feeds"] == 0
    assert len(report.latencies()) == 4  # only b's frames were stored by this batch
    monkeypatch.undo()
    sched.drain()
    ref, rec = alone(tiny_model, [first, later, frames(2, seed=8)])
    assert_same_blocks(a, ref, rec)
    assert a.stats()["gaps"] == ref.stats()["gaps"]


def test_frames_given_back_once_are_stored_by_the_next_batch_whatever_is_asked(tiny_model, frames, monkeypatch):
    """A stream asked without pause still ingests: frames a batch gave back for a question are not
    given back again; the next question on the stream waits for the batch that stores them."""
    sched = IngestScheduler()
    a = mukv.Session(model=tiny_model)
    a.feed(frames(4, seed=5))
    first = _ask_during_a_stalled_batch(sched, a, a, frames, monkeypatch)
    assert first[:2] == ["encode", "question"] and sched.totals["withdrawn"] == 1
    assert a.stats()["frames"] == 4 and sched.waiting(a) == 4
    monkeypatch.undo()
    log = _ask_during_a_stalled_batch(sched, a, a, frames, monkeypatch, submit=0)  # the frames given back
    assert log.index("commit") < log.index("question"), log
    assert sched.totals["withdrawn"] == 1 and a.stats()["frames"] == 8 and sched.waiting(a) == 0


def test_a_lent_question_that_fails_leaves_the_batch_to_store_everything(tiny_model, frames, monkeypatch):
    """A question that raises while the batch lends it the model reaches its caller; the batch takes
    the model back and commits, and the scheduler is free for the next batch and question."""
    sched = IngestScheduler()
    a, b = mukv.Session(model=tiny_model), mukv.Session(model=tiny_model)
    b.feed(frames(4, seed=5))
    log: list[str] = []
    release, encoded = _stalled_batch(sched, monkeypatch, log)

    def failing(q, **k):
        log.append("question")
        raise RuntimeError("question failed")

    monkeypatch.setattr(b, "ask", failing)
    sched.submit(a, frames(4))
    batch = threading.Thread(target=sched.step, kwargs={"force": True})
    batch.start()
    assert encoded.wait(60)
    errors: list[BaseException] = []

    def ask():
        try:
            sched.ask(b, "what?")
        except RuntimeError as exc:
            errors.append(exc)

    q = threading.Thread(target=ask)
    q.start()
    _wait(lambda: sched._asks == 1)
    release.set()
    for t in (batch, q):
        t.join(120)
    assert log[:3] == ["encode", "question", "levels"] and log[-1] == "commit"
    assert [str(e) for e in errors] == ["question failed"]
    assert a.stats()["frames"] == 4 and not sched._busy and not sched._running and not sched._lent
    sched.submit(a, frames(2, seed=7))
    assert sched.step(force=True) is not None and a.stats()["frames"] == 6


def test_a_second_batch_never_starts_while_the_first_lends_the_model(tiny_model, frames, monkeypatch):
    """While a batch waits between its stages for a question, another thread's step() waits too."""
    sched = IngestScheduler({"questions_per_batch": 4})
    a, b, c = (mukv.Session(model=tiny_model) for _ in range(3))
    b.feed(frames(4, seed=5))
    log: list[str] = []
    release, encoded = _stalled_batch(sched, monkeypatch, log)
    gate = threading.Event()
    real_ask = b.ask
    def ask(q, **k):
        log.append("question on b")
        gate.wait(60)
        return real_ask(q, max_new_tokens=1)

    monkeypatch.setattr(b, "ask", ask)
    sched.submit(a, frames(4))
    first = threading.Thread(target=sched.step, kwargs={"force": True})
    first.start()
    assert encoded.wait(60)
    q = threading.Thread(target=sched.ask, args=(b, "what?"))
    q.start()
    _wait(lambda: sched._asks == 1)
    release.set()
    _wait(lambda: "question on b" in log)  # the model is lent to the question
    sched.submit(c, frames(4, seed=6))
    second = threading.Thread(target=sched.step, kwargs={"force": True})
    second.start()
    _wait(lambda: sched._batch_waiting)
    assert log.count("encode") == 1  # the second batch did not start while the first lent the model
    gate.set()
    for t in (first, q, second):
        t.join(120)
    assert log.count("encode") == 2 and log.count("commit") == 2
    assert a.stats()["frames"] == 4 and c.stats()["frames"] == 4


def _wait(check, timeout: float = 60.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_background_thread_stores_everything_and_answers(tiny_model, frames):
    s = mukv.Session(model=tiny_model)
    with IngestScheduler({"latency_target_s": 0.05}) as sched:
        sched.submit(s, frames(2))
        sched.submit(s, frames(2, seed=1))
        _wait(lambda: s.stats()["frames"] == 4)
        assert sched.ask(s, "what is there?", max_new_tokens=2).blocks
    assert sched.waiting() == 0 and sched.totals["frames"] == 4


# ---------------------------------------------------------------------------------------------- input
def test_submit_validates_like_feed_and_continues_queued_times(tiny_model, frames):
    clock = FakeClock()
    sched = IngestScheduler(clock=clock)
    s = mukv.Session(model=tiny_model)
    with pytest.raises(InputError):
        sched.submit(s, np.zeros((2, 8, 8), dtype=np.uint8))
    with pytest.raises(InputError):
        sched.submit(s, frames(2), timestamps=[1.0, 0.5])
    assert sched.waiting() == 0
    sched.submit(s, frames(2), timestamps=[10.0, 11.0])
    with pytest.raises(InputError, match="continue the stream"):
        sched.submit(s, frames(1), timestamps=[11.0])  # continues the queued frames, not the stream
    with pytest.raises(InputError, match="frame size"):
        sched.submit(s, frames(1, size=32))  # the size of the frames queued
    sched.submit(s, frames(1))  # 1 / fps after the last queued frame
    sched.drain()
    assert s._stream.last_time == 13.0 and s.stats()["frames"] == 3
    with pytest.raises(ConfigError, match="one model"):
        sched.submit(mukv.Session(model="tiny-llava-ov", device="cpu"), frames(1))
    with pytest.raises(InputError):
        sched.submit("not a session", frames(1))
    fork = s.fork()
    with pytest.raises(StoreError):
        sched.submit(fork, frames(1))
    with pytest.raises(ConfigError, match="latency_target_s"):
        IngestScheduler({"latency_target_s": 0})
    with pytest.raises(ConfigError, match="nope"):
        SchedulerConfig.build({"nope": 1})
    with pytest.raises(InputError, match="twice"):
        BatchIngest().run([FeedItem.of(s, frames(1)), FeedItem.of(s, frames(1))])


def test_bad_arguments_to_ask_step_and_the_constructor_are_refused_clearly(tiny_model, frames, caplog):
    """Every argument of the scheduler's public calls is checked: a clear MukvError, nothing queued or
    stored changed."""
    s = mukv.Session(model=tiny_model)
    with pytest.raises(ConfigError, match="on_batch"):
        IngestScheduler(on_batch=5)
    for clock in (lambda: "x", lambda: float("nan"), lambda: None):
        with pytest.raises(ConfigError, match="clock must return seconds"):
            IngestScheduler(clock=clock)
    sched = IngestScheduler(clock=FakeClock())
    sched.submit(s, frames(2))
    for now in ("x", float("nan"), float("inf"), None.__class__, True, 10**400, [1.0]):
        with pytest.raises(InputError, match="now must be a finite number"):
            sched.step(now=now, force=True)
        with pytest.raises(InputError, match="now must be a finite number"):
            sched.due_in(now)
    assert sched.waiting(s) == 2 and s.stats()["frames"] == 0  # nothing taken
    for who in (None, 123, "cam"):
        with pytest.raises(InputError, match="takes a mukv.Session"):
            sched.ask(who, "what?")
    with pytest.raises(InputError, match="unexpected keyword"):
        sched.ask(s, "what?", nonsense=1)
    with pytest.raises(InputError, match="resize must be"):
        sched.submit(s, frames(1, size=32), resize="yes")
    with pytest.raises(InputError, match="resize must be"):
        s.feed(frames(1), resize=1)
    assert sched.waiting(s) == 2 and s.stats()["frames"] == 0
    sched.step(now=np.float32(100.0), force=True)  # numbers of any real type
    assert s.stats()["frames"] == 2


def test_an_on_batch_callback_that_raises_is_logged_and_the_batch_stays_stored(tiny_model, frames, caplog):
    seen = []

    def on_batch(report):
        seen.append(report)
        raise RuntimeError("the caller's bug")

    sched = IngestScheduler(on_batch=on_batch)
    s = mukv.Session(model=tiny_model)
    sched.submit(s, frames(3))
    reports = sched.drain()
    assert len(reports) == len(seen) == 1 and reports[0].results[0].ok
    assert s.stats()["frames"] == 3 and sched.totals["frames"] == 3
    assert "on_batch raised" in caplog.text


def test_wall_clock_timestamps_give_a_new_stream_its_origin_when_stored(tiny_model, frames):
    sched = IngestScheduler()
    s = mukv.Session(model=tiny_model)
    t0 = np.datetime64("2026-01-02T03:04:05")
    sched.submit(s, frames(2), timestamps=[t0, t0 + np.timedelta64(2, "s")])
    sched.submit(s, frames(1), timestamps=[t0 + np.timedelta64(4, "s")])
    sched.drain()
    assert s.wall_origin == pytest.approx(t0.astype("datetime64[s]").astype(float))
    assert s._stream.last_time == 4.0 and s.stats()["frames"] == 3


def test_a_windowed_level_is_ingested_per_stream_beside_batched_streams(tiny_model, frames):
    """A ReKV stream (sliding-window level, per-layer keys) fed in a batch with MuKV streams stores
    exactly what it stores fed alone: its window is its own, never shared with another stream."""
    cfg = {"levels": [{"name": "frame", "extractor": "frame", "keep_ratio": 1.0, "top_k": 3, "local_window": 2,
                       "layer_keys": True}],
           "retrieval": {"retriever": "layerwise", "guide_level": None, "layer_probe": "memory"},
           "assembly": {"order": "time", "rerotate": True}}
    data = [frames(6, seed=31), frames(6, seed=32), frames(6, seed=33)]
    sessions = [mukv.Session(model=tiny_model, config=cfg), mukv.Session(model=tiny_model),
                mukv.Session(model=tiny_model, config=cfg)]
    for half in (slice(0, 3), slice(3, 6)):
        results, _ = BatchIngest().run([FeedItem.of(s, d[half]) for s, d in zip(sessions, data)])
        assert all(r.ok for r in results), [r.error for r in results]
    for s, d in ((sessions[0], data[0]), (sessions[2], data[2])):
        with mukv.Session(model=tiny_model, config=cfg) as ref:
            ref.feed(d)
            ids = torch.arange(6)
            assert s.backend.count("frame") == 6
            torch.testing.assert_close(s.backend.load_kv("frame", ids), ref.backend.load_kv("frame", ids),
                                       rtol=0, atol=1e-5)
            torch.testing.assert_close(s.backend.layer_keys("frame", ids), ref.backend.layer_keys("frame", ids),
                                       rtol=0, atol=1e-3)
    for s in sessions:
        s.close()
