"""Benchmarks: generation, JSON round trip, and answerability from evidence."""

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from mukv.bench import KINDS, LEVELS, Benchmark, Stream, solve


def _digest(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def bench():
    return Benchmark.generate(seed=7, minutes=600, questions=44)


def test_generate_balances_kinds_and_spreads_depths(bench):
    qs = bench.questions
    assert len(qs) == 44 == len(bench)
    counts = Counter(q.kind for q in qs)
    assert set(counts) == set(KINDS) and max(counts.values()) - min(counts.values()) <= 1
    assert all(q.level == LEVELS[q.kind] for q in qs)
    assert len({q.id for q in qs}) == 44 and len({q.text for q in qs}) == 44
    assert [q.ask_frame for q in qs] == sorted(q.ask_frame for q in qs)
    depths = np.array([q.depth_s for q in qs])
    assert depths.min() >= 59 and depths.min() < 5 * 60
    assert depths.max() > 0.3 * 600 * 60
    for q in qs:
        assert q.evidence_start < q.evidence_end <= q.ask_frame + 1
        assert 2 <= q.evidence_end - q.evidence_start <= 8
        assert q.depth_s == pytest.approx((q.ask_frame - q.evidence_end + 1) / bench.spec.fps)


def test_kinds_subset():
    b = Benchmark.generate(seed=1, minutes=120, questions=9, kinds=["motion", "count", "dot_color"])
    assert Counter(q.kind for q in b.questions) == {"motion": 3, "count": 3, "dot_color": 3}


def test_json_round_trip_is_bit_exact(bench, tmp_path):
    path = bench.save(tmp_path / "sub" / "bench.json")
    data = json.loads(path.read_text())
    assert data["format"] == "mukv.bench" and data["spec"]["seed"] == 7
    assert "frames" not in data  # frames are never stored
    loaded = Benchmark.load(path)
    assert loaded.spec == bench.spec
    assert [q.to_dict() for q in loaded.questions] == [q.to_dict() for q in bench.questions]
    loaded.verify()
    a, b = bench.stream, loaded.stream
    assert a is not b
    for q in bench.questions[:10]:
        assert _digest(a.frames(q.evidence_start, q.evidence_end)) == _digest(b.frames(q.evidence_start, q.evidence_end))
    for i in np.random.default_rng(0).integers(0, a.num_frames, 40):
        assert np.array_equal(a.frame(i), b.frame(i))
    assert _digest(a.frames(0, 400)) == _digest(b.frames(0, 400))


def test_verify_detects_tampering(bench, tmp_path):
    path = bench.save(tmp_path / "bench.json")
    data = json.loads(path.read_text())
    data["questions"][3]["answer"] = "bogus"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError):
        Benchmark.load(path).verify()
    data["format"] = "other"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError):
        Benchmark.load(path)


def test_every_question_answerable_from_its_evidence_alone(bench):
    st = bench.stream
    for q in bench.questions:
        ev = bench.evidence(q)
        assert ev.shape == (q.evidence_end - q.evidence_start, 64, 64, 3)
        assert solve(q.text, ev) == q.answer, q
        # Surrounding distractor episodes do not confuse the scene's identity.
        lo, hi = max(0, q.evidence_start - 12), min(st.num_frames, q.evidence_end + 12)
        assert solve(q.text, st.frames(lo, hi)) == q.answer, q


def test_segment_questions_need_more_than_one_frame(bench):
    # A single evidence frame shows no motion, change, event or succession; for
    # counts it can only ever suggest "one".
    for q in bench.questions:
        if q.level != "segment":
            continue
        ev = bench.evidence(q)
        singles = {solve(q.text, ev[i : i + 1]) for i in range(len(ev))}
        assert singles <= ({None, "one"} if q.kind == "count" else {None}), q


def test_frame_and_patch_questions_answerable_from_one_frame(bench):
    for q in bench.questions:
        if q.level == "segment":
            continue
        ev = bench.evidence(q)
        for i in range(len(ev)):
            assert solve(q.text, ev[i : i + 1]) == q.answer, q


def test_week_long_benchmark_generates(tmp_path):
    b = Benchmark.generate(seed=0, minutes=7 * 24 * 60, questions=33)
    assert b.spec.num_frames == 302_400
    b2 = Benchmark.load(b.save(tmp_path / "week.json"))
    q = b2.questions[-1]
    assert np.array_equal(b2.evidence(q), Stream(b.spec).frames(q.evidence_start, q.evidence_end))
    assert solve(q.text, b2.evidence(q)) == q.answer
