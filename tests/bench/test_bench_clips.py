"""Training clips: shape, determinism and context completeness; the preview script."""

from collections import Counter

import numpy as np
import pytest

from mukv.bench import KINDS, LEVELS, ClipDataset, clip_at, iter_clips, sample_clip, solve


def test_clip_shapes_and_fields():
    c = sample_clip(0, num_frames=12, size=64)
    assert c.frames.dtype == np.uint8 and c.frames.shape == (12, 64, 64, 3)
    assert 0 <= c.evidence_start < c.evidence_end <= 12
    assert c.level == LEVELS[c.kind]
    bare = sample_clip(1, num_frames=None, size=96)
    assert bare.frames.shape[1:] == (96, 96, 3)
    assert (bare.evidence_start, bare.evidence_end) == (0, len(bare.frames))
    with pytest.raises(ValueError):
        sample_clip(0, num_frames=3)
    with pytest.raises(ValueError):
        sample_clip(0, kinds=["nope"])


def test_clips_are_deterministic():
    a = list(iter_clips(3, 12, num_frames=8))
    b = list(iter_clips(3, 12, num_frames=8))
    for x, y in zip(a, b):
        assert np.array_equal(x.frames, y.frames) and (x.question, x.answer) == (y.question, y.answer)
    assert np.array_equal(clip_at(3, 7, num_frames=8).frames, a[7].frames)
    ds = ClipDataset(3, 12, num_frames=8)
    assert len(ds) == 12 and ds[5].question == a[5].question and ds[-1].answer == a[11].answer
    with pytest.raises(IndexError):
        ds[12]
    gen = np.random.default_rng(9)
    assert isinstance(sample_clip(gen).question, str)  # a Generator is accepted too
    c = list(iter_clips(4, 12, num_frames=8))
    assert any(x.question != y.question for x, y in zip(a, c))


@pytest.mark.parametrize("num_frames", [4, 8, 16])
def test_clips_are_context_complete(num_frames):
    clips = list(iter_clips(num_frames, 66, num_frames=num_frames))
    assert Counter(c.kind for c in clips).keys() == set(KINDS)
    for c in clips:
        assert len(c.frames) == num_frames
        # The whole clip, and the evidence span alone, both determine the answer.
        assert solve(c.question, c.frames) == c.answer, c.question
        assert solve(c.question, c.frames[c.evidence_start : c.evidence_end]) == c.answer


def test_clips_without_distractors():
    for c in iter_clips(2, 22, num_frames=10, distractors=False):
        assert solve(c.question, c.frames) == c.answer
        pad = np.concatenate([c.frames[: c.evidence_start], c.frames[c.evidence_end :]])
        if len(pad):
            assert (pad == pad[:, :1, :1]).all()  # plain background


def test_kind_restriction():
    kinds = ["count", "after"]
    assert {c.kind for c in iter_clips(0, 20, kinds=kinds)} <= set(kinds)


def test_preview_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from mukv.bench.preview import main

    out = tmp_path / "sheet.png"
    assert main([str(out), "--clips", "2", "--frames", "5", "--scale", "1"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out2 = tmp_path / "stream.png"
    assert main([str(out2), "--stream-minutes", "20", "--questions", "2", "--scale", "1"]) == 0
    assert out2.exists()
