"""Reopening a stream in the middle of a segment window."""



def test_reopen_mid_segment_resumes_without_reading_wrong_frames(tiny_model, tmp_path):
    """Frames of an unfinished segment window are gone after a restart: the segment
    level resumes at the next frame fed and says so, never reusing other frames."""
    import numpy as np
    import torch

    import mukv

    frames = np.random.default_rng(7).integers(0, 255, (11, 64, 64, 3), dtype=np.uint8)
    with mukv.Session(model=tiny_model, backend="lancedb", path=tmp_path / "s") as s:
        s.feed(frames[:6])  # one full segment (0-3), frames 4-5 pending at segment level
    with mukv.Session.open(tmp_path / "s", model=tiny_model) as s:
        assert s.stats()["uncovered_frames"] == {"segment": 2}
        s.feed(frames[6:11])  # segment level restarts at frame 6: one new segment 6-9
        meta = s.backend.metadata("segment", torch.arange(s.backend.count("segment")))
        assert meta.frame_start.tolist() == [0, 6] and meta.frame_end.tolist() == [4, 10]
        assert s.backend.count("frame") == 11 and s.backend.count("patch") == 44
