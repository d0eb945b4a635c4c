"""Reopening a stream in the middle of a segment window."""



def test_reopen_mid_segment_resumes_every_level_exactly(tiny_model, tmp_path):
    """The encoded frames of an unfinished segment window are committed with the stream: after a
    restart the segment level continues with them, as if the stream had never stopped."""
    import numpy as np
    import torch

    import mukv

    frames = np.random.default_rng(7).integers(0, 255, (11, 64, 64, 3), dtype=np.uint8)
    with mukv.Session(model=tiny_model, backend="lancedb", path=tmp_path / "s") as s:
        s.feed(frames[:6])  # one full segment (0-3), frames 4-5 pending at segment level
    with mukv.Session.open(tmp_path / "s", model=tiny_model) as s:
        assert s.stats()["uncovered_frames"] == {} and s.reopen_note is None
        s.feed(frames[6:11])  # segments 4-7; frames 8-10 pending
        meta = s.backend.metadata("segment", torch.arange(s.backend.count("segment")))
        assert meta.frame_start.tolist() == [0, 4] and meta.frame_end.tolist() == [4, 8]
        assert s.backend.count("frame") == 11 and s.backend.count("patch") == 44
        reopened = s.backend.get_state("pending")
        assert reopened["start"] == 8 and reopened["count"] == 3
    # the same segments as one uninterrupted stream
    with mukv.Session(model=tiny_model, backend="memory") as ref:
        ref.feed(frames[:6])
        ref.feed(frames[6:11])
        want = ref.backend.load_kv("segment", torch.arange(2))
    with mukv.Session.open(tmp_path / "s", model=tiny_model, read_only=True) as s:
        got = s.backend.load_kv("segment", torch.arange(2))
        assert torch.allclose(got.float(), want.float(), atol=1e-5)


def test_reopen_without_pending_frames_skips_them_and_says_so(tiny_model, tmp_path):
    """A pending-frames file that is gone or damaged is not trusted: the levels waiting for it
    resume at the next frame fed, never reusing other frames, and the session says why."""
    import numpy as np
    import torch

    import mukv

    frames = np.random.default_rng(7).integers(0, 255, (11, 64, 64, 3), dtype=np.uint8)
    with mukv.Session(model=tiny_model, backend="lancedb", path=tmp_path / "s") as s:
        s.feed(frames[:6])
        name = s.backend.get_state("pending")["file"]
    (tmp_path / "s" / "streams" / "default" / name).write_bytes(b"garbage")
    with mukv.Session.open(tmp_path / "s", model=tiny_model) as s:
        assert "checksum" in s.reopen_note
        assert s.stats()["uncovered_frames"] == {"segment": 2}
        s.feed(frames[6:11])  # segment level restarts at frame 6: one new segment 6-9
        meta = s.backend.metadata("segment", torch.arange(s.backend.count("segment")))
        assert meta.frame_start.tolist() == [0, 6] and meta.frame_end.tolist() == [4, 10]
        assert s.backend.count("frame") == 11 and s.backend.count("patch") == 44
    assert mukv.backends.disk.verify_store(str(tmp_path / "s")).ok
