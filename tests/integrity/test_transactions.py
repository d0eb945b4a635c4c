"""A feed is a transaction (issue 15, cases 1, 2, 4, 6): input copied on entry, a refused feed changes
nothing, a retry never stores twice, a fork is a reader, a stream keeps the configuration it was made with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mukv
from integrity_helpers import FAST, frames
from mukv.errors import ConfigError, InputError, MukvError, StoreError


def bookkeeping(s: mukv.Session) -> dict:
    st = s._stream
    ing = st.ingestor
    return {"frames": ing.frames_seen, "cursors": dict(ing.cursor), "last_time": st.last_time,
            "frame_hw": st.frame_hw, "pending": None if ing.pending_frames() is None else
            (ing.pending_frames()[0], ing.pending_frames()[1].shape[0]),
            "counts": {lp.level.name: s.backend.count(lp.level.name) for lp in s.levels},
            "sources": [dict(x) for x in st.sources], "contract": dict(st.contract)}


@pytest.fixture(params=["memory", "lancedb"])
def any_session(request, tiny_model, tmp_path):
    path = None if request.param == "memory" else tmp_path / "s.mukv"
    s = mukv.Session(model=tiny_model, backend=request.param, path=path, config=FAST)
    yield s
    s.close()


# -- case 1: a live source reusing one frame buffer ---------------------------------------------------------
def test_a_reused_frame_buffer_is_copied_on_entry(tiny_model):
    buf = np.zeros((16, 16, 3), np.uint8)

    def camera():
        for i in range(8):
            buf[:] = frames(1, seed=i)[0]  # the camera fills its one buffer again
            yield buf

    with mukv.Session(model=tiny_model, config=FAST) as s:
        s.feed(camera())
        vec = s.backend.vectors("frame", torch.arange(8))
        assert len({tuple(v.tolist()) for v in vec}) == 8
    with mukv.Session(model=tiny_model, config=FAST) as s, mukv.Session(model=tiny_model, config=FAST) as ref:
        s.feed_from("iterator", camera(), fps=1.0)
        ref.feed(np.stack([frames(1, seed=i)[0] for i in range(8)]), timestamps=np.arange(8.0))
        assert torch.equal(s.backend.vectors("frame", torch.arange(8)), ref.backend.vectors("frame", torch.arange(8)))
    # an array the caller changes after feed returns (or while a background feed runs) is not stored changed
    with mukv.Session(model=tiny_model, config=FAST) as s:
        arr = frames(4, seed=3)
        s.feed(arr)
        before = s.backend.load_kv("frame", torch.arange(4)).clone()
        arr[:] = 0
        assert torch.equal(s.backend.load_kv("frame", torch.arange(4)), before)


# -- case 2: a refused feed changes nothing; a retry stores exactly once --------------------------------------
def test_a_failure_inside_the_store_rolls_the_feed_back(any_session):
    s = any_session
    s.feed(frames(3))  # frame 2 pending at the segment level
    before = bookkeeping(s)
    real = s.backend.add
    calls = {"n": 0}

    def second_add_fails(blocks):
        calls["n"] += 1
        if calls["n"] == 2:
            raise StoreError("disk went away")
        return real(blocks)

    s.backend.add = second_add_fails  # the patch level is stored, then the frame level fails
    with pytest.raises(StoreError, match="disk went away"):
        s.feed(frames(4, seed=1))
    s.backend.add = real
    assert bookkeeping(s) == before
    s.feed(frames(4, seed=1))  # the retry
    after = bookkeeping(s)
    assert after["frames"] == 7 and after["counts"] == {"patch": 28, "frame": 7, "segment": 3}
    s.flush()
    if s.backend.persistent:
        assert mukv.backends.disk.verify_store(str(s.backend.files.uri())).ok


def test_a_raw_error_inside_the_model_changes_nothing(any_session, monkeypatch):
    s = any_session
    s.feed(frames(3))
    before = bookkeeping(s)
    monkeypatch.setattr(s.model, "prefill_blocks", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA OOM")))
    with pytest.raises(RuntimeError, match="CUDA OOM"):
        s.feed(frames(2, seed=5))
    monkeypatch.undo()
    assert bookkeeping(s) == before
    s.feed(frames(2, seed=5))
    assert bookkeeping(s)["frames"] == 5


def test_an_interrupt_inside_a_feed_rolls_it_back(any_session, monkeypatch):
    s = any_session
    s.feed(frames(2))
    before = bookkeeping(s)
    real = s.backend.add

    def interrupted(blocks):
        real(blocks)
        raise KeyboardInterrupt

    monkeypatch.setattr(s.backend, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        s.feed(frames(3, seed=2))
    monkeypatch.undo()
    assert bookkeeping(s) == before
    s.feed(frames(3, seed=2))
    assert bookkeeping(s)["counts"]["frame"] == 5


def test_a_signal_during_the_commit_is_raised_after_it_and_the_feed_stays_committed(any_session, monkeypatch):
    """SIGINT arriving while a feed's commit is handed over waits for it: the feed is committed, its
    bookkeeping kept, and the interrupt raised after (never a rollback of what the store committed)."""
    import os
    import signal

    s = any_session
    s.feed(frames(2))
    real = s.backend.commit

    def commit_and_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # delivered while the commit runs
        return real(*args, **kwargs)

    monkeypatch.setattr(s.backend, "commit", commit_and_signal)
    # Python's own SIGINT handler, whatever this process inherited (a job started in the background
    # by a shell inherits SIGINT ignored, and then Python installs none)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            s.feed(frames(3, seed=2))
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    after = bookkeeping(s)
    assert after["frames"] == 5 and after["counts"]["frame"] == 5
    s.feed(frames(1, seed=3))  # the next frame index follows the committed feed
    assert bookkeeping(s)["frames"] == 6 and bookkeeping(s)["counts"]["frame"] == 6
    if s.backend.persistent:
        s.flush()
        reopened = mukv.Session.open(s.backend.files.uri(), stream_id=s.stream_id, model=s.model, read_only=True)
        try:
            assert bookkeeping(reopened)["frames"] == 6
        finally:
            reopened.close()


def test_an_ignored_signal_during_the_commit_stays_ignored(any_session, monkeypatch):
    """With SIGINT ignored (a job started in the background), a SIGINT during the commit neither
    interrupts the feed nor is raised after it: the deferral keeps the process's own choice."""
    import os
    import signal

    s = any_session
    real = s.backend.commit

    def commit_and_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(s.backend, "commit", commit_and_signal)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        s.feed(frames(2))
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert bookkeeping(s)["frames"] == 2 and bookkeeping(s)["counts"]["frame"] == 2


def test_a_bad_item_in_an_iterable_keeps_the_chunks_before_it(any_session):
    s = any_session

    def source():
        yield from frames(4, seed=1)  # one chunk of encode_batch_frames = 4
        yield from frames(2, seed=2)
        yield np.zeros((16, 16), np.uint8)  # not a frame

    with pytest.raises(InputError):
        s.feed(source())
    st = bookkeeping(s)
    assert st["frames"] == 4 and st["counts"]["frame"] == 4 and s._last_time == 6.0
    s.feed(frames(2, seed=2))
    assert bookkeeping(s)["frames"] == 6


def test_a_full_disk_refuses_the_feed_and_changes_nothing(tiny_model, tmp_path):
    path = tmp_path / "s.mukv"
    with mukv.Session(model=tiny_model, backend="lancedb", path=path, config=FAST) as s:
        s.feed(frames(3))
    with mukv.Session.open(path, model=tiny_model, backend_options={"min_free_bytes": 1 << 62}) as s:
        before = bookkeeping(s)
        with pytest.raises(StoreError, match="disk full"):
            s.feed(frames(4, seed=1))
        assert bookkeeping(s) == before
    with mukv.Session.open(path, model=tiny_model) as s:
        assert bookkeeping(s)["frames"] == 3 and s._stream.ingestor.pending_frames()[0] == 2
        s.feed(frames(4, seed=1))
        assert bookkeeping(s)["counts"] == {"patch": 28, "frame": 7, "segment": 3}
    assert mukv.backends.disk.verify_store(str(path)).ok


def test_bad_timestamps_and_frames_change_nothing(any_session):
    s = any_session
    s.feed(frames(2), timestamps=[0.0, 1.0])
    before = bookkeeping(s)
    for bad in ([0.5, 2.0], [2.0, 2.0], [np.nan, 3.0], [3.0, 1e30], ["2026-01-01T00:00:00Z", "x"]):
        with pytest.raises(InputError):
            s.feed(frames(2, seed=4), timestamps=bad)
        assert bookkeeping(s) == before
    with pytest.raises(InputError, match="frame size"):
        s.feed(frames(2, side=24))
    assert bookkeeping(s) == before
    s.feed(frames(2, side=24), resize=True)  # resized to the stream's 16x16
    assert bookkeeping(s)["frames"] == 4 and s._frame_hw == (16, 16)


# -- case 4: a fork is a reader of its parent's stream -------------------------------------------------------
def test_a_fork_reads_the_parents_stream_and_never_writes_it(any_session):
    s = any_session
    s.feed(frames(2))
    fork = s.fork(config={"retrieval": {"over_retrieval": 3.0}})
    with pytest.raises(StoreError, match="fork"):
        fork.feed(frames(2, seed=9))
    with pytest.raises(StoreError, match="fork"):
        fork.feed(frames(2, side=24))  # another frame size is not a way in either
    s.feed(frames(2, seed=1))
    assert fork.stats()["frames"] == 4 and fork._last_time == s._last_time == 6.0
    meta = s.backend.metadata("frame", torch.arange(4))
    assert meta.t_start.tolist() == [0.0, 2.0, 4.0, 6.0]  # one clock, not one per session
    assert fork.ask("what?").kv_tokens > 0
    with pytest.raises(ConfigError, match="cannot change"):
        s.fork(config={"compression": {"dedup": True}})
    s.close()
    for call in (lambda: fork.ask("what?"), lambda: fork.feed(frames(1)), lambda: s.fork()):
        with pytest.raises(MukvError, match="closed"):
            call()


# -- case 6: a stream keeps the configuration it was made with ------------------------------------------------
def test_opening_a_stream_with_another_compression_is_refused(tiny_model, tmp_path):
    path = tmp_path / "s.mukv"
    with mukv.Session(model=tiny_model, backend="lancedb", path=path, config=FAST) as s:
        s.feed(frames(4))
    other = {**FAST, "levels": [dict(lv, keep_ratio=0.5) for lv in FAST["levels"]]}
    for kwargs in ({"config": other}, {"config": {"compression": {"dedup": True}}}, {"policy": "rekv"},
                   {"config": {"scoring": {"scorer": "attention"}}}):
        with pytest.raises(ConfigError, match="contract"):
            mukv.Session(model=tiny_model, backend="lancedb", path=path, **kwargs)
    # what only changes questions may differ
    with mukv.Session(model=tiny_model, backend="lancedb", path=path,
                      config={"retrieval": {"retriever": "cosine"}, "generation": {"max_new_tokens": 3}}) as s:
        assert s.config.retrieval.retriever == "cosine" and s.config.levels[0].keep_ratio == 0.1
        s.feed(frames(2, seed=1))
    with mukv.Session.open(path, model=tiny_model) as s:
        assert s.config.retrieval.retriever == "semi_hierarchical"  # the stream's own, not the last session's
        assert s.stats()["frames"] == 6


def test_the_contract_records_model_frame_size_and_clock(tiny_model, tmp_path):
    path = tmp_path / "s.mukv"
    with mukv.Session(model=tiny_model, backend="lancedb", path=path, config=FAST,
                      wall_origin="2026-12-06T08:00:00Z", thumbnails=32) as s:
        s.feed(frames(3))
        c = s.backend.get_state("session")
        assert c["frame_size"] == [16, 16] and c["thumbnails"] == 32 and c["tokens_per_frame"] == 196
        assert c["wall_origin"] == pytest.approx(1796544000.0)
        assert s.thumbnail(2)[:2] == b"\xff\xd8"  # a JPEG
    with pytest.raises(ConfigError, match="contract"):
        mukv.Session(model=tiny_model, backend="lancedb", path=path, thumbnails=64)
    with mukv.Session.open(path, model=tiny_model) as s:
        with pytest.raises(InputError, match="frame size"):
            s.feed(frames(1, side=20))
        a = s.ask("what?", since="2026-12-06T08:00:01Z")
        assert a.blocks and all(b.t_start >= 1.0 and b.wall_start.startswith("2026-12-06T08:00:0") for b in a.blocks)


# -- wall-clock time from the timestamps, questions over a window --------------------------------------------
def test_wall_clock_timestamps_give_the_stream_its_origin(tiny_model):
    with mukv.Session(model=tiny_model, config=FAST) as s:
        t0 = np.datetime64("2026-12-06T10:00:00")
        s.feed(frames(6), timestamps=t0 + np.arange(6) * np.timedelta64(2, "s"))
        assert s.wall_origin == pytest.approx(1796551200.0) and s._last_time == 10.0
        s.feed(frames(2, seed=1), timestamps=[1796551212.0, 1796551214.0])  # Unix seconds continue it
        assert s._last_time == 14.0
        s.feed(frames(1, seed=2))  # no timestamps: 1 / fps later
        assert s._last_time == 16.0
        a = s.ask("what?", since=np.datetime64("2026-12-06T10:00:04"), until="2026-12-06T10:00:08Z")
        assert a.blocks and all(4.0 <= b.t_start and b.t_end <= 8.0 for b in a.blocks)
        assert {b.wall_start for b in a.blocks} <= {"2026-12-06T10:00:0%d.000Z" % i for i in (4, 6, 8)}
    with mukv.Session(model=tiny_model, config=FAST) as s:
        s.feed(frames(2))
        with pytest.raises(InputError, match="wall-clock"):
            s.feed(frames(1), timestamps=[1796551212.0])
        with pytest.raises(InputError, match="wall-clock"):
            s.ask("what?", since="2026-12-06T10:00:04Z")


def test_questions_over_a_window_use_only_its_blocks(any_session):
    s = any_session
    s.feed(frames(10), timestamps=np.arange(10) * 3.0)  # frames at 0, 3, ..., 27 s
    for since, until in ((6.0, 15.0), (None, 7.0), (20.0, None), (3.0, 3.0)):
        a = s.ask("what?", since=since, until=until, top_k={"patch": 1, "frame": 1, "segment": 0})
        lo = -1e9 if since is None else since
        hi = 1e9 if until is None else until
        assert a.blocks and all(lo <= b.t_start and b.t_end <= hi for b in a.blocks), (since, until, a.blocks)
        assert a.window == (since, until)
    a = s.ask("what?", since=15.0, until=15.0)  # one frame: the defaults clamp to what lies in the window
    assert a.blocks and all(b.t_start == b.t_end == 15.0 for b in a.blocks)
    assert any("frame: top-k 2 clamped to the 1 block(s) stored in the window" in n for n in a.notes), a.notes
    with pytest.raises(mukv.EmptyMemoryError, match="window"):
        s.ask("what?", since=100.0)
    with pytest.raises(InputError, match="before"):
        s.ask("what?", since=9.0, until=3.0)
    for bad in ("yesterday", float("nan"), True, [1.0]):
        with pytest.raises(InputError):
            s.ask("what?", since=bad)
    for retriever in ("uniform", "recent", "hierarchical", "cosine"):
        a = s.fork(config={"retrieval": {"retriever": retriever}}).ask("what?", since=6.0, until=15.0)
        assert a.blocks and all(6.0 <= b.t_start and b.t_end <= 15.0 for b in a.blocks), retriever


# -- provenance and sampling bounds --------------------------------------------------------------------------
def test_ingest_records_its_source_and_refuses_the_same_content_twice(tiny_model, tmp_path):
    from integrity_helpers import write_mp4
    from mukv.ingest import AlreadyIngested

    video = write_mp4(tmp_path / "a.mp4", 16, fps=4)
    with mukv.Session(model=tiny_model, config=FAST) as s:
        s.ingest(video, fps=2)
        src = s.stats()["sources"][-1]
        assert src["kind"] == "video" and src["location"] == str(video) and src["complete"]
        assert src["frames"] == [0, 8] and src["fps"] == 2 and len(src["sha256"]) == 64
        assert src["size"] == video.stat().st_size and src["times"] == [0.0, 3.5]
        copy = tmp_path / "b.mp4"
        copy.write_bytes(video.read_bytes())
        with pytest.raises(AlreadyIngested, match="already holds"):
            s.ingest(copy, fps=2)
        assert s.stats()["frames"] == 8
        s.ingest(copy, fps=2, force=True)
        assert s.stats()["frames"] == 16 and s._last_time == 3.5 + 0.5 + 3.5


def test_sampling_rates_are_bounded(tiny_model, tmp_path):
    from integrity_helpers import write_mp4

    video = write_mp4(tmp_path / "a.mp4", 12, fps=4)
    with mukv.Session(model=tiny_model, config=FAST) as s:
        for fps in (1e9, 5.0):  # above the video's own 4 fps
            with pytest.raises(InputError, match="own rate|between"):
                s.ingest(video, fps=fps)
        for fps in (0, -1, 1e-300, float("inf"), float("nan"), True, "2"):
            with pytest.raises(InputError):
                s.ingest(video, fps=fps)
        with pytest.raises(InputError, match="between"):
            s.ingest(video, fps=1e9, upsample=True)
        assert s.stats()["frames"] == 0
        s.ingest(video, fps=8.0, upsample=True)  # each frame twice
        assert s.stats()["frames"] == 24


# -- every input is bounded, with an error naming the field ---------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"device": "cuda:7"}, "device"), ({"device": "meta"}, "device"), ({"device": 3}, "device"),
    ({"dtype": "float16"}, "dtype"), ({"dtype": torch.int8}, "dtype"),
    ({"config": {"generation": {"system_prompt": "x" * 40000}}}, "system_prompt"),
    ({"config": {"generation": {"system_prompt": "a\ud800b"}}}, "system_prompt"),
    ({"config": {"stream": {"fps": 0}}}, "stream.fps"),
    ({"backend": "lancedb", "path": 123}, "path"), ({"backend": "lancedb", "path": "a\x00b"}, "path"),
    ({"backend": "lancedb", "path": "x" * 5000}, "path"),
    ({"backend": "lancedb", "path": "{tmp}/s", "backend_options": {"hot_bytes": -1}}, "hot_bytes"),
    ({"backend": "lancedb", "path": "{tmp}/s", "backend_options": {"max_pending_bytes": "lots"}}, "max_pending_bytes"),
    ({"backend": "lancedb", "path": "{tmp}/s", "backend_options": {"nope": 1}}, "nope"),
    ({"backend": "lancedb", "path": "{tmp}/s", "stream_id": "../x"}, "stream id"),
    ({"thumbnails": 5}, "thumbnails"), ({"wall_origin": "noon"}, "wall_origin"), ({"resize": "yes"}, "resize"),
])
def test_session_arguments_are_validated(tiny_model, tmp_path, kwargs, words):
    kwargs = {k: (v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v) for k, v in kwargs.items()}
    with pytest.raises(MukvError, match=words):
        mukv.Session(model=tiny_model, config=kwargs.pop("config", FAST), **kwargs)
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").rglob("*.json")) or \
        "stream id" not in words


@pytest.mark.parametrize("source, location, options, words", [
    ("video", "{video}", {"chunk": 0}, "chunk"),
    ("video", "{video}", {"chunk": True}, "chunk"),
    ("video", "{video}", {"start": -1}, "start"),
    ("video", 42, {}, "path"),
    ("video", "{video}", {"bogus": 1}, "bogus"),
    ("images", "{tmp}", {"chunk": "many"}, "chunk"),
    ("stream", "{video}", {"timeout_s": -1}, "timeout_s"),
    ("stream", "{video}", {"max_frames": 0}, "max_frames"),
    ("stream", "{video}", {"format": "../x"}, "format"),
    ("stream", "{video}", {"options": {"rtsp_transport": 1}}, "options"),
    ("video", "{video}", {"force": "yes"}, "force"),
    ("nope", "{video}", {}, "nope"),
])
def test_feed_from_options_are_validated(tiny_model, tmp_path, source, location, options, words):
    from integrity_helpers import write_mp4

    video = write_mp4(tmp_path / "v.mp4", 8)
    if isinstance(location, str):
        location = location.format(video=video, tmp=tmp_path)
    with mukv.Session(model=tiny_model, config=FAST) as s:
        with pytest.raises(MukvError, match=words):
            s.feed_from(source, location, fps=1.0, **options)
        assert s.stats()["frames"] == 0


def test_the_private_copy_is_pinned_only_where_asked_and_falls_back_to_a_clone(monkeypatch):
    """Frames encoded at once on a GPU are copied into pinned memory (``mukv.feeding.PIN_FRAMES``); where
    pinned memory cannot be had (this CPU build, or none left) the copy is an ordinary clone, equal and
    independent of the caller's array either way."""
    from mukv import feeding

    src = torch.from_numpy(frames(3, seed=4))
    for pin in (False, True):
        got = feeding.private_copy(src, pin)
        assert torch.equal(got, src) and got.data_ptr() != src.data_ptr()
        assert got.is_pinned() == (pin and torch.cuda.is_available())
    monkeypatch.setattr(feeding, "PIN_MAX_BYTES", src.numel() - 1)  # a feed larger than the cap: not pinned
    assert not feeding.private_copy(src, True).is_pinned()
    monkeypatch.setattr(feeding, "PIN_MAX_BYTES", 256 << 20)
    monkeypatch.setattr(feeding, "PIN_FRAMES", False)
    assert not feeding.private_copy(src, True).is_pinned()
    strided = src[:, ::2]  # a view: the copy is dense
    assert torch.equal(feeding.private_copy(strided, True), strided)


def test_an_interrupt_on_the_way_into_the_commit_rolls_the_feed_back(any_session, monkeypatch):
    """An interrupt raised after a feed's body and before its commit is handed over (the signal lands
    between the two) rolls the feed back: bookkeeping and blocks as before, nothing committed, and a
    retry stores the frames once (never a stream whose fields run ahead of, or behind, its store)."""
    from mukv.stream import Transaction

    s = any_session
    s.feed(frames(2))
    before = bookkeeping(s)
    counts = {lv: s.backend.count(lv) for lv in ("patch", "frame", "segment")}
    real = Transaction.commit

    def interrupted_on_entry(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Transaction, "commit", interrupted_on_entry)
    with pytest.raises(KeyboardInterrupt):
        s.feed(frames(3, seed=2))
    monkeypatch.setattr(Transaction, "commit", real)
    assert bookkeeping(s) == before
    assert {lv: s.backend.count(lv) for lv in ("patch", "frame", "segment")} == counts
    s.feed(frames(3, seed=2))  # the retry: the next frame indices, stored once
    assert bookkeeping(s)["frames"] == before["frames"] + 3
    if s.backend.persistent:
        s.flush()
        from mukv.backends.disk.verify import verify_store

        assert verify_store(s.backend.files.uri()).ok


def test_signal_handlers_are_swapped_with_both_signals_held_back():
    """``deferred`` and ``interrupts_as_exceptions`` swap the SIGINT and SIGTERM handlers with both signals
    blocked, so neither lands between the two swaps, and leave the process's signal mask as it was."""
    import signal

    from mukv import signals

    if not hasattr(signal, "pthread_sigmask"):
        pytest.skip("no pthread_sigmask on this platform")
    seen = []
    real = signal.signal

    def spy(signum, handler):
        seen.append((signum, set(signal.pthread_sigmask(signal.SIG_BLOCK, []))))
        return real(signum, handler)

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    signal.signal = spy
    try:
        with signals.interrupts_as_exceptions(), signals.deferred():
            pass
    finally:
        signal.signal = real
    assert len(seen) == 8  # two handlers in, two out, for each
    assert all({signal.SIGINT, signal.SIGTERM} <= blocked for _, blocked in seen)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask
