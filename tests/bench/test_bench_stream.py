"""Streams: determinism, lazy random access, layout and uniqueness of keys."""

import hashlib

import numpy as np
import pytest

from mukv.bench import Stream, StreamSpec
from mukv.bench.scene import split_identity


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def stream():
    return Stream(StreamSpec(seed=11, minutes=240, questions=44))


def test_frames_dtype_shape_and_time(stream):
    f = stream.frame(5)
    assert f.dtype == np.uint8 and f.shape == (64, 64, 3)
    assert stream.num_frames == 240 * 60 // 2 == len(stream)
    ts = stream.timestamps
    assert ts.dtype == np.float64 and ts.shape == (stream.num_frames,)
    assert ts[10] == 20.0 == stream.timestamp(10)
    assert np.array_equal(stream.frame(-1), stream.frame(stream.num_frames - 1))
    with pytest.raises(IndexError):
        stream.frame(stream.num_frames)
    with pytest.raises(IndexError):
        stream.frames(10, stream.num_frames + 1)
    assert stream.frames(7, 7).shape == (0, 64, 64, 3)


def test_deterministic_across_instances():
    spec = StreamSpec(seed=3, minutes=120, questions=10)
    a, b = Stream(spec), Stream(spec)
    idx = np.random.default_rng(0).integers(0, a.num_frames, 50)
    for i in idx:
        assert np.array_equal(a.frame(i), b.frame(i))
    assert _digest(a.frames(0, 600)) == _digest(b.frames(0, 600))
    assert [q.to_dict() for q in a.questions()] == [q.to_dict() for q in b.questions()]
    c = Stream(StreamSpec(seed=4, minutes=120, questions=10))
    assert _digest(a.frames(0, 600)) != _digest(c.frames(0, 600))


def test_random_access_equals_sequential(stream):
    seq = stream.frames(0, 1500)
    fresh = Stream(stream.spec)  # empty scene cache, visited in random order
    for i in np.random.default_rng(1).permutation(1500)[:300]:
        assert np.array_equal(fresh.frame(int(i)), seq[i])
    # Ranges that start and stop mid-episode.
    for a, b in [(3, 40), (17, 18), (100, 777), (1499, 1500)]:
        assert np.array_equal(Stream(stream.spec).frames(a, b), seq[a:b])
    assert np.array_equal(stream[20:30], seq[20:30])
    batches = list(stream.iter_frames(0, 1000, batch=300))
    assert [s for s, _ in batches] == [0, 300, 600, 900]
    assert np.array_equal(np.concatenate([f for _, f in batches]), seq[:1000])


def test_week_long_stream_random_access():
    spec = StreamSpec(seed=2, minutes=7 * 24 * 60, questions=60)
    s = Stream(spec)
    assert s.num_frames == 302_400
    last = s.frame(302_399)
    assert np.array_equal(Stream(spec).frames(302_390, 302_400)[-1], last)
    mid = 123_456
    assert np.array_equal(Stream(spec).frames(mid - 3, mid + 3)[3], s.frame(mid))
    qs = s.questions()
    assert len(qs) == 60
    # Needles cover depths from about a minute to days.
    depths = np.array([q.depth_s for q in qs])
    assert depths.min() < 5 * 60 and depths.max() > 2 * 24 * 3600


def test_episodes_tile_the_stream(stream):
    eps = stream.episodes()
    assert eps[0].start == 0 and eps[-1].stop == stream.num_frames
    assert all(a.stop == b.start for a, b in zip(eps, eps[1:]))
    assert all(e.length > 0 for e in eps)
    assert sum(e.needle >= 0 for e in eps) == 44
    for e in eps[::7]:
        assert stream.episode_index(e.start) == e.index == stream.episode_index(e.stop - 1)
    for q in stream.questions():
        e = stream.episode(q.episode)
        assert (e.start, e.stop) == (q.evidence_start, q.evidence_end) and e.needle >= 0
        # Needles are surrounded by filler episodes.
        assert stream.episode(q.episode - 1).needle < 0
        assert q.episode + 1 == stream.num_episodes or stream.episode(q.episode + 1).needle < 0
        assert q.evidence_end - 1 <= q.ask_frame < stream.num_frames


def test_key_pair_occurs_only_in_its_needle(stream):
    idents = [stream.scene(k).identities() for k in range(stream.num_episodes)]
    for q in stream.questions():
        key = set(stream.scene(q.episode).key)
        holders = [k for k, ids in enumerate(idents) if key <= ids]
        assert holders == [q.episode]


def test_state_matches_scene(stream):
    q = stream.questions()[0]
    sc = stream.scene(q.episode)
    for t in range(sc.n):
        st = stream.state(q.evidence_start + t)
        keys = {(d["color"], d["shape"]) for d in st if d["role"] == "key"}
        assert keys == {split_identity(i) for i in sc.key}


def test_spec_validation_and_short_streams():
    import mukv

    with pytest.raises(ValueError):
        StreamSpec(seed=0, minutes=10, questions=10_000)
    for minutes in (float("nan"), float("inf"), -1.0):
        with pytest.raises(mukv.InputError, match="positive finite"):
            StreamSpec(seed=0, minutes=minutes)
    # once built in memory until the process was killed (mukv demo --minutes 1e9)
    with pytest.raises(mukv.InputError, match="at most 10,000,000 frames"):
        StreamSpec(seed=0, minutes=1e9)
    with pytest.raises(ValueError):
        StreamSpec(seed=0, minutes=10, kinds=("nope",))
    with pytest.raises(ValueError):
        Stream(StreamSpec(seed=0, minutes=2, questions=40))
    s = Stream(StreamSpec(seed=0, minutes=2, questions=2))
    assert len(s.questions()) == 2
    plain = Stream(StreamSpec(seed=0, minutes=30))
    assert plain.questions() == [] and all(e.needle < 0 for e in plain.episodes())
    spec = StreamSpec(seed=5, minutes=30, fps=1.0, size=96, questions=5)
    assert StreamSpec.from_dict(spec.to_dict()) == spec
    assert Stream(spec).frame(0).shape == (96, 96, 3)
