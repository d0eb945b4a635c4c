"""mukv.Session end to end on CPU: feed, ingest a generated mp4, ask, stats, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mukv
from mukv.errors import ConfigError, EmptyMemoryError, InputError, RetrievalError, UnknownPluginError


def write_mp4(path, frames: np.ndarray, fps: int = 4) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_ingest_mp4_and_answer_from_all_three_levels(tiny_model, frames, tmp_path):
    video = tmp_path / "clip.mp4"
    write_mp4(video, frames(48, seed=1), fps=4)  # 12 s of video
    with mukv.Session(model=tiny_model) as s:
        stored = s.ingest(video, fps=1.0)  # 12 frames sampled
        st = s.stats()
        assert st["frames"] == 12
        assert st["levels"]["patch"]["blocks"] == 48 and st["levels"]["frame"]["blocks"] == 12
        assert st["levels"]["segment"]["blocks"] == 3 and stored == 63
        assert st["levels"]["segment"]["tokens"] == 3 * 627 and st["levels"]["frame"]["tokens"] == 12 * 19
        answer = s.ask("what color was the car?")
        assert isinstance(answer.text, str)
        assert set(answer.levels()) == {"patch", "frame", "segment"}
        assert answer.levels() == {"patch": 20, "frame": 12, "segment": 3}
        assert answer.kv_tokens == s.prefix.length + 20 * 4 + 12 * 19 + 3 * 627
        assert {"query", "retrieve", "page_in", "first_token", "total"} <= set(answer.timings)
        seg = [b for b in answer.blocks if b.level == "segment"]
        assert all(b.frame_end - b.frame_start == 4 for b in seg)
        assert all(0.0 <= b.t_start <= b.t_end <= 11.0 for b in answer.blocks)
        assert any("clamped" in n for n in answer.notes)


def test_question_between_feeds_uses_what_was_fed(session, frames):
    session.feed(frames(3))
    a = session.ask("what happened?")
    assert "segment" not in a.levels() and a.levels()["frame"] == 3
    assert max(b.frame_end for b in a.blocks) <= 3
    session.feed(frames(5, seed=2))
    b = session.ask("what happened?")
    assert b.levels()["segment"] == 2 and b.levels()["frame"] == 8


def test_feed_in_pieces_equals_feed_at_once(tiny_model, frames):
    f = frames(9)
    with mukv.Session(model=tiny_model) as one, mukv.Session(model=tiny_model) as many:
        one.feed(f)
        for chunk in (f[:2], f[2:3], f[3:7], f[7:]):
            many.feed(chunk)
        for level in ("patch", "frame", "segment"):
            n = one.backend.count(level)
            assert n == many.backend.count(level)
            ids = torch.arange(n)
            assert torch.allclose(one.backend.load_kv(level, ids), many.backend.load_kv(level, ids), atol=1e-4)
        assert one.ask("q?").text == many.ask("q?").text


def test_feed_accepts_iterables_and_single_frames(session, frames):
    f = frames(6)
    session.feed(iter(list(f[:4])))  # a generator of single frames
    session.feed(f[4])  # one [H, W, 3] frame
    session.feed(torch.from_numpy(f[5:]))
    assert session.stats()["frames"] == 6


def test_timestamps_are_recorded(session, frames):
    session.feed(frames(4), timestamps=[10.0, 12.0, 14.0, 16.0])
    a = session.ask("when?")
    seg = [b for b in a.blocks if b.level == "segment"][0]
    assert (seg.t_start, seg.t_end) == (10.0, 16.0)
    with pytest.raises(InputError, match="continue the stream"):
        session.feed(frames(1), timestamps=[15.0])
    session.feed(frames(1))  # default spacing continues after 16.0
    assert session.stats()["last_time"] == 18.0


def test_third_party_scorer_changes_which_tokens_are_kept(tiny_model, frames):
    class KeyNorm:
        @mukv.hookimpl
        def mukv_register_scorers(self, register):
            register("runtime_key_norm", lambda blocks: blocks.keys.norm(dim=-1).mean(dim=1))

    class NegKeyNorm:
        @mukv.hookimpl
        def mukv_register_scorers(self, register):
            register("neg_key_norm", lambda blocks: -blocks.keys.norm(dim=-1).mean(dim=1))

    a, b = KeyNorm(), NegKeyNorm()
    mukv.register_plugin(a)
    mukv.register_plugin(b)
    try:
        f = frames(4)
        kept = {}
        for name in ("dual", "runtime_key_norm", "neg_key_norm"):
            with mukv.Session(model=tiny_model, config={"scoring": {"scorer": name}}) as s:
                s.feed(f)
                kept[name] = s.backend.token_index("frame", torch.arange(4))
        assert not torch.equal(kept["runtime_key_norm"], kept["dual"])
        assert not torch.equal(kept["runtime_key_norm"], kept["neg_key_norm"])
        # the kept tokens of a frame block are exactly its 19 largest key norms
        embeds = tiny_model.encode_frames(torch.from_numpy(f[:1]))
        kv, _, _ = tiny_model.prefill_blocks(tiny_model.prefix(), embeds)
        norms = kv[-1, 0].norm(dim=-1).mean(dim=1)  # [1, 196]
        expect = norms.topk(19, dim=1).indices.sort(dim=1).values
        assert torch.equal(kept["runtime_key_norm"][:1], expect)
    finally:
        mukv.unregister_plugin(a)
        mukv.unregister_plugin(b)


def test_policies_run_through_the_same_path(tiny_model, frames):
    f = frames(8)
    for policy, levels in [("rekv", {"frame": 8}), ("frame_topk", {"frame": 8}), ("uniform", {"frame": 8}), ("sliding_window", {"frame": 8}),
                           ("full_context", {"frame": 8}), ("mukv_spatial", {"patch": 20, "frame": 8, "segment": 2})]:
        with mukv.Session(model=tiny_model, policy=policy) as s:
            s.feed(f)
            assert s.ask("q?").levels() == levels, policy


def test_sliding_window_and_uniform_pick_the_right_frames(tiny_model, frames):
    with mukv.Session(model=tiny_model, policy="sliding_window", config={"levels": [
            {"name": "frame", "extractor": "frame", "keep_ratio": 1.0, "top_k": 3}]}) as s:
        s.feed(frames(10))
        assert sorted(b.frame_start for b in s.ask("q?").blocks) == [7, 8, 9]
    with mukv.Session(model=tiny_model, policy="uniform", config={"levels": [
            {"name": "frame", "extractor": "frame", "keep_ratio": 1.0, "top_k": 4}]}) as s:
        s.feed(frames(10))
        assert sorted(b.frame_start for b in s.ask("q?").blocks) == [0, 3, 6, 9]


def test_time_order_assembly(tiny_model, frames):
    with mukv.Session(model=tiny_model, policy="mukv_time") as s:
        s.feed(frames(8))
        a = s.ask("q?")
        starts = [b.t_start for b in a.blocks]
        assert starts == sorted(starts)


# ----------------------------------------------------------------------------- bad input
def test_bad_frames_are_rejected_and_nothing_is_lost(session, frames):
    session.feed(frames(5))
    before = session.stats()
    bad = [
        (frames(2).astype(np.float32), "uint8"),
        (frames(2)[..., :2], "shape"),
        (np.zeros((0, 64, 64, 3), np.uint8), "empty"),
        (frames(2, size=32), "frame size changed"),
        ("video.mp4", "ingest"),
        (42, "iterable"),
        (frames(2)[:, :, :, 0], "shape"),
    ]
    for value, msg in bad:
        with pytest.raises(InputError, match=msg):
            session.feed(value)
        assert session.stats() == before
    with pytest.raises(InputError, match="strictly increasing"):
        session.feed(frames(2), timestamps=[30.0, 29.0])
    with pytest.raises(InputError, match="2 timestamps"):
        session.feed(frames(3), timestamps=[30.0, 31.0])
    with pytest.raises(InputError, match="finite"):
        session.feed(frames(1), timestamps=[float("nan")])
    assert session.stats() == before
    session.feed(frames(3))  # still usable
    assert session.stats()["frames"] == 8


def test_ask_before_any_frame(session, frames):
    with pytest.raises(EmptyMemoryError, match="feed frames"):
        session.ask("anything?")
    session.feed(frames(1))
    assert session.ask("anything?").levels()["frame"] == 1


def test_bad_questions(session, frames):
    session.feed(frames(4))
    for q, msg in [("", "empty"), ("   ", "empty"), (None, "string"), ("a " * 5000, "too long")]:
        with pytest.raises(InputError, match=msg):
            session.ask(q)
    with pytest.raises(InputError, match="unknown levels"):
        session.ask("q?", top_k={"nope": 1})
    with pytest.raises(RetrievalError, match="only 4 frame"):
        session.ask("q?", top_k={"frame": 5})
    assert session.ask("q?", top_k={"frame": 2, "patch": 0, "segment": 1}).levels() == {"frame": 2, "segment": 1}


def test_short_stream_error_mode(tiny_model, frames):
    with mukv.Session(model=tiny_model, config={"retrieval": {"on_short_stream": "error"}}) as s:
        s.feed(frames(4))
        with pytest.raises(RetrievalError, match="top_k = 20"):
            s.ask("q?")


def test_missing_and_unreadable_video(session, tmp_path):
    with pytest.raises(InputError, match="not found"):
        session.ingest(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video")
    with pytest.raises(InputError, match="cannot read video"):
        session.ingest(junk)
    with pytest.raises(InputError, match="fps"):
        session.ingest(junk, fps=0)
    with pytest.raises(InputError, match="not a file"):
        session.ingest(tmp_path)


def test_bad_configuration_names_the_field(tiny_model):
    with pytest.raises(ConfigError, match="levels.0.keep_ratio"):
        mukv.Session(model=tiny_model, config={"levels": [
            {"name": "patch", "extractor": "patch_raster", "tokens": 49, "keep_ratio": 0.0, "top_k": 1}]})
    with pytest.raises(ConfigError, match="keep_ratio"):
        mukv.MukvConfig.build(levels=[{"name": "p", "extractor": "frame", "keep_ratio": 1.5, "top_k": 1}])
    with pytest.raises(UnknownPluginError, match="scoring.scorer.*registered scorers: attention"):
        mukv.Session(model=tiny_model, config={"scoring": {"scorer": "magic"}})
    with pytest.raises(UnknownPluginError, match="levels.1.extractor"):
        mukv.Session(model=tiny_model, config={"levels": [
            {"name": "a", "extractor": "frame", "keep_ratio": 0.5, "top_k": 1},
            {"name": "b", "extractor": "cubes", "keep_ratio": 0.5, "top_k": 1}]})
    with pytest.raises(UnknownPluginError, match="registered backends"):
        mukv.Session(model=tiny_model, backend="floppy")
    with pytest.raises(UnknownPluginError, match="policy"):
        mukv.Session(model=tiny_model, policy="magic")
    with pytest.raises(ConfigError, match="unknown model 'no-such-model'"):
        mukv.Session(model="no-such-model")
    with pytest.raises(ConfigError, match="retrieval.topk: Extra inputs"):
        mukv.MukvConfig.build(retrieval={"topk": 3})
    with pytest.raises(ConfigError, match="guide_level"):
        mukv.MukvConfig.build(retrieval={"guide_level": "scene"})


def test_closed_session_refuses_work(tiny_model, frames):
    s = mukv.Session(model=tiny_model)
    s.close()
    with pytest.raises(mukv.MukvError, match="closed"):
        s.feed(frames(1))


def test_concurrent_feed_and_ask(tiny_model, frames):
    import threading

    s = mukv.Session(model=tiny_model)
    s.feed(frames(4))
    errors = []

    def feeder():
        try:
            for i in range(6):
                s.feed(frames(2, seed=10 + i))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=feeder)
    t.start()
    answers = [s.ask("q?") for _ in range(4)]
    t.join()
    assert not errors and all(a.blocks for a in answers)
    assert s.stats()["frames"] == 16


def test_fork_shares_memory_and_refuses_storage_changes(tiny_model, frames):
    with mukv.Session(model=tiny_model, policy="frame_topk") as s:
        s.feed(frames(6))
        window = s.fork(policy="sliding_window", config={"levels": [
            {"name": "frame", "extractor": "frame", "keep_ratio": 1.0, "top_k": 2}]})
        assert sorted(b.frame_start for b in window.ask("q?").blocks) == [4, 5]
        s.feed(frames(2, seed=3))  # fed through the parent, seen by the fork
        assert sorted(b.frame_start for b in window.ask("q?").blocks) == [6, 7]
        with pytest.raises(ConfigError, match="cannot change levels"):
            s.fork(policy="mukv")
        with pytest.raises(ConfigError, match="compression"):
            s.fork(config={"compression": {"dedup": True}})
        window.close()  # closing a fork leaves the parent's store open
        assert s.ask("q?").levels() == {"frame": 8}


def test_record_gap_records_merges_persists_and_refuses_bad_gaps(tiny_model, frames, tmp_path):
    path = tmp_path / "g.mukv"
    with mukv.Session(model=tiny_model, backend="lancedb", path=path) as s:
        s.feed(frames(2))
        before = s.stats()
        for args in [(5.0, 1.0, 3), (float("nan"), 1.0, 3), (0.0, float("inf"), 3), (0.0, 1.0, 0), (0.0, 1.0, -1),
                     (0.0, 1.0, True), (0.0, 1.0, 2.5), (0.0, 1.0, 1 << 41), (0.0, 1.0, 10**19), ("0", 1.0, 3)]:
            with pytest.raises(InputError, match="gap"):
                s.record_gap(*args)
        with pytest.raises(InputError, match="reason"):
            s.record_gap(0.0, 1.0, 3, reason="x" * 201)
        assert s.stats() == before  # nothing recorded by a refused gap
        s.record_gap(4.0, 6.0, 2)
        s.record_gap(6.5, 8.0, 3)  # same place in the stream, same reason: one gap
        gaps = s.stats()["gaps"]
        assert len(gaps) == 1 and gaps[0]["frames"] == 5 and gaps[0]["after_frame"] == 2
        assert (gaps[0]["t_start"], gaps[0]["t_end"]) == (4.0, 8.0)
    with mukv.Session.open(path, model=tiny_model, read_only=True) as r:
        assert r.stats()["gaps"] == gaps  # committed at once, read back as recorded
