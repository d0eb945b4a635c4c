"""Bounded lag: frames that wait too long, or overflow a stream's queue, are dropped and recorded as gaps."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from serve_helpers import frames, stored, wait_until
from mukv.errors import InputError
from mukv.serve.queues import FrameQueue


def test_queue_drops_the_oldest_frames_past_the_lag_and_the_bytes():
    f = frames(1)[0]
    q = FrameQueue(max_lag_s=1.0, max_bytes=10 * f.nbytes, fps=0.5)
    q.push(np.stack([f] * 4), now=0.0)  # t = 0, 2, 4, 6
    q.push(np.stack([f] * 4), now=0.5)  # t = 8 .. 14
    assert (q.frames, q.dropped) == (8, 0)
    q.push(np.stack([f] * 4), now=1.2)  # the first push waited 1.2 s > 1 s: dropped; 12 frames > 10 fit
    assert q.dropped == 4 and q.frames == 8 and q.bytes == 8 * f.nbytes
    got, times, gap = q.take(3, now=1.3)
    assert got.shape[0] == 3 and list(times) == [8.0, 10.0, 12.0]
    assert (gap.t_start, gap.t_end, gap.frames) == (0.0, 6.0, 4)  # one run, handed out with the next frames
    assert q.take(100, now=5.0) is None  # everything left waited too long
    assert q.dropped == 9 and q.pop_gap().frames == 5 and q.bytes == 0 and q.lag(5.0) == 0.0
    q.push(np.stack([f] * 12)[:10], now=6.0)
    q.push(np.stack([f] * 3), now=6.1)  # over the bytes: the oldest 3 go
    assert q.frames == 10 and q.dropped == 12
    got, times, _ = q.take(4, now=6.2)  # taken for a step that gives them back (a question on the stream)
    q.put_back(got, times, arrived=6.0)
    assert q.frames == 10 and q.given_back == 4 and q.bytes == 10 * f.nbytes
    again, times2, _ = q.take(3, now=6.3)
    assert list(times2) == list(times[:3]) and q.given_back == 1
    q.put_back(again, times2, arrived=6.0)
    q.push(np.stack([f]), now=6.35)  # 11 frames: over the bytes, the oldest (given back) goes
    assert q.frames == 10 and q.bytes == 10 * f.nbytes and q.given_back == 3 and q.dropped == 13
    assert list(q.take(3, now=6.4)[1]) == list(times[1:4]) and q.given_back == 0
    with pytest.raises(InputError, match="larger than a stream's queue"):
        q.push(np.stack([f] * 11), now=6.2)
    with pytest.raises(InputError, match="finite"):
        q.push(np.stack([f]), np.array([np.nan]))
    with pytest.raises(InputError, match="frame size"):
        q.push(frames(1, size=32))


def test_a_stream_that_cannot_keep_up_drops_frames_with_bounded_lag(serve, tmp_path):
    store = tmp_path / "store"
    one = frames(1)[0].nbytes
    with serve(store, max_lag_s=0.2, max_queue_bytes=40 * one, max_batch_frames=4) as (c, app, url):
        c.create_stream("cam")
        pushed = 0
        for i in range(12):  # 240 frames at once, far faster than ingest
            c.push("cam", frames(20, seed=i))
            pushed += 20
        st = c.stream("cam")
        assert st["queued"] <= 40  # never more than the queue's bound waits
        st = wait_until(lambda: (lambda s: s if s["queued"] == 0 and s["state"] == "idle" else None)(c.stream("cam")),
                        60, what="the queue to drain")
        assert st["dropped"] > 0 and st["frames"] + st["dropped"] == pushed == st["received"]
        wait_until(lambda: (lambda s: sum(g["frames"] for g in s["gaps"]) == s["dropped"])(c.stream("cam")), 30,
                   what="every drop to be recorded in a gap")
        st = c.stream("cam")
        assert sum(g["frames"] for g in st["gaps"]) == st["dropped"]
        for g in st["gaps"]:
            assert 0 <= g["t_start"] <= g["t_end"] <= 2.0 * (pushed - 1)
        metrics = c.metrics()
        dropped = int(re.search(r'mukv_frames_dropped_total\{stream="cam"\} (\d+)', metrics).group(1))
        assert dropped == st["dropped"]
        lag_max = app.state.engine.config.max_lag_s
        assert app.state.engine._streams["cam"].queue.lag() <= lag_max
        # questions are answered while frames are dropped and stored
        assert c.ask("cam", "what happened?", max_new_tokens=2)["blocks"]
        frames_stored, gaps = st["frames"], st["gaps"]
    with serve(store) as (c, app, url):  # the gaps were committed with the stream
        st = c.stream("cam")
        assert st["frames"] == frames_stored and st["gaps"] == gaps


def test_asking_stays_fast_under_ingest_load(serve):
    """A question waits for at most one ingest step, not for the queue."""
    with serve(max_batch_frames=2, max_lag_s=600, max_queue_bytes=64 << 20, drain_s=0) as (c, app, url):
        c.create_stream("load")
        c.push("load", frames(8))
        stored(c, "load", 8)
        for i in range(6):
            c.push("load", frames(50, seed=10 + i))
        t0 = time.monotonic()
        answer = c.ask("load", "what is there?", max_new_tokens=2)
        waited = answer["timings"]["wait"]
        st = c.stream("load")
        assert st["queued"] > 0, "the queue should still hold frames when the answer comes"
        assert waited < time.monotonic() - t0 + 1e-6
        step = app.state.engine.metrics.step_seconds
        assert step._values  # steps ran while the question waited


def test_a_question_on_a_quiet_stream_is_answered_inside_an_ingest_step(serve, monkeypatch):
    """The engine answers a question on a stream its running step does not hold between the step's
    stages (after the vision tower), before the step's level forwards and commit; with
    ``withdraw_asked`` off, a question on the step's own stream waits for the commit."""
    import threading

    with serve(drain_s=0) as (c, app, url):
        eng = app.state.engine
        eng.scheduler.config = eng.scheduler.config.model_copy(update={"withdraw_asked": False})
        c.create_stream("quiet")
        c.push("quiet", frames(8))
        stored(c, "quiet", 8)
        c.create_stream("load")
        log: list[str] = []
        release, encoded = threading.Event(), threading.Event()
        b = eng.scheduler.batcher
        real_encode, real_kind, real_commit, real_answer = b._encode, b._run_kind, b._commit, eng._answer

        def encode(*a):
            real_encode(*a)
            log.append("encode")
            encoded.set()
            assert release.wait(60)

        monkeypatch.setattr(b, "_encode", encode)
        monkeypatch.setattr(b, "_run_kind", lambda *a: (real_kind(*a), log.append("levels"))[0])
        monkeypatch.setattr(b, "_commit", lambda *a: (log.append("commit"), real_commit(*a))[1])
        monkeypatch.setattr(eng, "_answer", lambda s, *a: (log.append("answer " + s.id), real_answer(s, *a))[1])
        c.push("load", frames(8, seed=3))
        assert encoded.wait(60)
        answers: dict[str, dict] = {}
        asks = [threading.Thread(target=lambda sid=sid: answers.__setitem__(sid, c.ask(sid, "what?", max_new_tokens=2)))
                for sid in ("load", "quiet")]
        asks[0].start()
        wait_until(lambda: len(eng._asks) == 1, what="the question on load waits")
        asks[1].start()
        wait_until(lambda: len(eng._asks) == 2, what="the question on quiet waits")
        release.set()
        for t in asks:
            t.join(120)
        stored(c, "load", 8)
        assert log[:3] == ["encode", "answer quiet", "levels"], log
        assert log.index("commit") < log.index("answer load"), log
        assert answers["quiet"]["blocks"] and answers["load"]["blocks"]


def test_a_question_on_a_stream_of_the_running_step_takes_it_out_of_the_step(serve, monkeypatch):
    """A question on a stream of the running step withdraws the stream at the step's next stage
    boundary: it is answered there on what the stream last committed, the other streams of the step
    commit, and the withdrawn frames go back in front of the stream's queue and are stored by a
    later step: nothing dropped, no gap."""
    import threading

    with serve(drain_s=0, max_lag_s=600) as (c, app, url):
        eng = app.state.engine
        for sid in ("cam", "other"):
            c.create_stream(sid)
        c.push("cam", frames(8))
        stored(c, "cam", 8)
        log: list[str] = []
        release, encoded = threading.Event(), threading.Event()
        b = eng.scheduler.batcher
        real_encode, real_commit, real_answer = b._encode, b._commit, eng._answer

        def encode(*a):
            real_encode(*a)
            if not encoded.is_set():
                log.append("encode")
                encoded.set()
                assert release.wait(60)

        monkeypatch.setattr(b, "_encode", encode)
        monkeypatch.setattr(b, "_commit", lambda live, *a: (log.append(f"commit {len(live)}"), real_commit(live, *a))[1])
        monkeypatch.setattr(eng, "_answer", lambda s, *a: (log.append("answer " + s.id), real_answer(s, *a))[1])
        c.push("cam", frames(8, seed=3))
        c.push("other", frames(8, seed=4))
        assert encoded.wait(60)
        answers: list[dict] = []
        ask = threading.Thread(target=lambda: answers.append(c.ask("cam", "what?", max_new_tokens=2)))
        ask.start()
        wait_until(lambda: len(eng._asks) == 1, what="the question on cam waits")
        release.set()
        ask.join(120)
        assert log[:2] == ["encode", "answer cam"], log
        assert answers[0]["frames"] == 8  # what cam had committed when the question came
        stored(c, "cam", 16)
        stored(c, "other", 8)
        st = c.stream("cam")
        assert st["dropped"] == 0 and st["gaps"] == [] and st["received"] == 16
