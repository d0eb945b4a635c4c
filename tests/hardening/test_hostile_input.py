"""Property tests of the public API with hostile input (issue 7, part 1).

The invariant of every property: a call either does what it says, or raises a
:class:`mukv.MukvError` whose message names the problem, and then the session
holds exactly what it held before (same frames, times, blocks, KV bytes) and
still answers questions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mukv
from hardening_helpers import FAST, LEVELS, SIDE, assert_clear_error, frames, snapshot

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def call(fn, *args, **kwargs):
    """``(result, None)`` or ``(None, error)`` for a MukvError; any other exception fails the test."""
    try:
        return fn(*args, **kwargs), None
    except mukv.MukvError as exc:
        assert_clear_error(exc)
        return None, exc


def answers(session) -> None:
    a = session.ask("what color was the car?")
    assert isinstance(a.text, str) and a.blocks


# ------------------------------------------------------------------------------ frames
DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_,
          np.complex64]
FRAME_SHAPES = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5),
    st.tuples(st.integers(0, 3), st.sampled_from([1, 2, 5, SIDE, 17]), st.sampled_from([1, 3, SIDE]),
              st.sampled_from([1, 3, 4])),
    st.tuples(st.integers(1, 3), st.just(SIDE), st.just(SIDE), st.just(3)),  # valid batches
    st.just((SIDE, SIDE, 3)),  # one valid frame
)


@st.composite
def hostile_frames(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(FRAME_SHAPES)
    arr = draw(hnp.arrays(dtype, shape, elements=None if dtype is not np.bool_ else st.booleans()))
    kind = draw(st.sampled_from(["numpy", "torch", "noncontiguous", "list"]))
    if kind == "torch" and dtype is not np.complex64:
        return torch.from_numpy(arr)
    if kind == "noncontiguous" and arr.ndim >= 2:
        return np.flip(arr, axis=-2)
    if kind == "list" and arr.size <= 64:
        return arr.tolist()
    return arr


def _valid_frames(x, hw, top: bool = True) -> bool:
    if isinstance(x, list):  # fed directly: an iterable of frames, valid if each item is; as an item: not a frame
        return top and all(_valid_frames(it, hw, top=False) for it in x)
    if isinstance(x, np.ndarray):
        ok_dtype, shape = x.dtype == np.uint8, x.shape
    elif isinstance(x, torch.Tensor):
        ok_dtype, shape = x.dtype == torch.uint8, tuple(x.shape)
    else:
        return False
    if len(shape) == 3:
        shape = (1, *shape)
    return (ok_dtype and len(shape) == 4 and shape[0] >= 1 and shape[3] == 3 and min(shape[1:3]) >= 2
            and (hw is None or tuple(shape[1:3]) == hw))


@settings(max_examples=60, **SETTINGS)
@given(x=hostile_frames())
def test_feed_hostile_frames(fast_session, x):
    s = fast_session
    before = snapshot(s)
    valid = _valid_frames(x, s._frame_hw)
    got, err = call(s.feed, x)
    if err is not None or not valid:
        # lists of lists are an iterable of frames; they are refused as such, like other non-arrays
        assert err is not None, f"accepted invalid frames {type(x).__name__} {getattr(x, 'shape', None)}"
        assert snapshot(s) == before
        return
    n = 1 if np.ndim(x) == 3 else len(x)
    assert s.stats()["frames"] == before["frames"] + n
    assert got >= n  # at least one frame block per frame (0 for an empty iterable)


@settings(max_examples=20, **SETTINGS)
@given(items=st.lists(st.one_of(st.just("ok"), hostile_frames()), min_size=0, max_size=6))
def test_feed_iterables_store_whole_chunks_before_a_bad_item(fast_session, items):
    """An iterable is a live source: the chunks before a bad item are stored, nothing from its chunk on."""
    s = fast_session
    chunk = FAST["stream"]["encode_batch_frames"]
    seq = [frames(1, seed=i)[0] if isinstance(it, str) else it for i, it in enumerate(items)]
    hw = s._frame_hw
    good = 0  # frames of complete chunks before the first bad item
    run = 0
    first_bad = None
    for i, it in enumerate(seq):
        if not _valid_frames(it, hw, top=False):
            first_bad = i
            break
        run += 1 if np.ndim(it) == 3 else len(it)
        if run >= chunk:
            good, run = good + run, 0
    before = snapshot(s)
    _, err = call(s.feed, iter(seq))
    if first_bad is None:
        assert err is None
        assert s.stats()["frames"] == before["frames"] + good + run
    else:
        assert err is not None
        assert s.stats()["frames"] == before["frames"] + good
        if good == 0:
            assert snapshot(s) == before


# ------------------------------------------------------------------------------ timestamps
@pytest.fixture(scope="module")
def ts_session(tiny_model):
    """A session of its own: accepted timestamps may be huge (a stream time that 1 / fps cannot advance)."""
    s = mukv.Session(model=tiny_model, backend="memory", config=FAST)
    yield s
    s.close()


NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**400), 10**400),
                    st.booleans(), st.complex_numbers(max_magnitude=10), st.text(max_size=3), st.none())


@settings(max_examples=50, **SETTINGS)
@given(n=st.integers(1, 3),
       ts=st.one_of(NUMBERS, st.lists(NUMBERS, max_size=4), st.lists(st.lists(NUMBERS, max_size=2), max_size=3),
                    st.lists(st.floats(0, 1e12, allow_nan=False), min_size=1, max_size=3).map(sorted),
                    st.dictionaries(st.text(max_size=2), NUMBERS, max_size=2)))
def test_feed_hostile_timestamps(ts_session, n, ts):
    s = ts_session
    before = snapshot(s)
    _, err = call(s.feed, frames(n, seed=n), timestamps=ts)
    if err is not None:
        # default times fail only after a stream time that 1 / fps cannot advance (e.g. 1e300 accepted earlier)
        assert ts is not None or "too large to continue" in str(err), err
        assert snapshot(s) == before
        return
    if ts is None:  # the default: 1 / fps apart, continuing the stream
        assert s._last_time > (before["last_time"] or -1.0)
        return
    got = np.asarray(ts, dtype=np.float64).reshape(-1)
    assert got.size == n and np.isfinite(got).all() and (np.diff(got) > 0).all()
    if s.wall_origin is not None and got[0] >= 1e9:  # Unix seconds: stream time counts from the origin
        got = got - s.wall_origin
    assert np.abs(got).max() <= 1e10  # stream times stay bounded
    assert before["last_time"] is None or got[0] > before["last_time"]
    assert s._last_time == got[-1]


@pytest.mark.parametrize("ts, words", [
    (np.zeros((2, 2)), "one number per frame, shape [4]; got shape [2, 2]"),
    ([[0.0], [1.0], [2.0], [3.0]], "one number per frame"),
    ([True, False, True, False], "not booleans"),
    (np.array([["2026-12-06T14:03:00Z", "2026-12-06T14:03:01Z"]] * 2), "one time per frame, shape [n]; got shape [2, 2]"),
    (np.arange(4, dtype=np.float64).reshape(2, 2) + 1.7e9, "one time per frame"),
    (torch.tensor([True, True, False, False]), "not booleans"),
    (np.array([1 + 2j, 2, 3, 4]), "not complex"),  # astype(float64) would drop the imaginary part
])
def test_timestamps_of_another_shape_or_booleans_are_refused(ts_session, ts, words):
    # once flattened or read as 0/1: a [2, 2] array of times for four frames, or booleans, was taken as times
    before = snapshot(ts_session)
    _, err = call(ts_session.feed, frames(4, seed=4), timestamps=ts)
    assert isinstance(err, mukv.InputError) and words in str(err), err
    assert snapshot(ts_session) == before


def test_stream_time_out_of_range_is_refused(tiny_model):
    # fps=1e-300 once pushed stream time to 1e300, after which every feed was refused: times are bounded now
    s = mukv.Session(model=tiny_model, backend="memory", config=FAST)
    s.feed(frames(2), timestamps=[0.0, 9.9e9])
    before = snapshot(s)
    _, err = call(s.feed, frames(1), timestamps=[1e308])
    assert err is not None and "stream seconds" in str(err)
    assert snapshot(s) == before
    _, err = call(s.feed, frames(1))  # 9.9e9 + 2 s is still inside
    assert err is None
    s.close()
    with pytest.raises(mukv.InputError, match="between"):
        mukv.Session(model=tiny_model, backend="memory", config=FAST).ingest("x.mp4", fps=1e-300)


# ------------------------------------------------------------------------------ questions
QUESTIONS = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),  # any code point, surrogates too
    st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Co", "Cn", "Mn"]), max_size=20),
    st.builds(lambda w, n: " ".join([w] * n), st.sampled_from(["car", "what", "\u202e", "a'b", '"; DROP']),
              st.integers(0, 300)),
    st.sampled_from(["", " ", "\n\t", "\x00", "\ufeff", "\u200b", "\ud800", "a\udfffb", "<|im_end|>",
                     "<|im_start|>assistant\n", "<video>" * 50, "'; DROP TABLE blocks; --"]),
    st.one_of(st.none(), st.integers(), st.binary(max_size=8), st.lists(st.text(max_size=3), max_size=2)),
)


@settings(max_examples=60, **SETTINGS)
@given(q=QUESTIONS)
def test_ask_hostile_questions(fast_session, q):
    s = fast_session
    before = snapshot(s)
    got, err = call(s.ask, q)
    assert snapshot(s) == before  # asking never changes the store
    if err is None:
        assert isinstance(q, str) and q.strip()
        assert isinstance(got.text, str)
        got.text.encode("utf-8")
    else:
        assert isinstance(err, mukv.InputError), err
    answers(s)


@pytest.mark.parametrize("question, ok", [("a" * (1 << 20), True),  # 1 MB, one word: short in tokens
                                          ("car " * (1 << 18), False),  # 1 MB of words: too many tokens
                                          ("é" * (1 << 19), True)], ids=["1MB-one-word", "1MB-words", "1MB-utf8"])
def test_ask_megabyte_questions(fast_session, question, ok):
    before = snapshot(fast_session)
    got, err = call(fast_session.ask, question)
    assert (err is None) == ok, err
    if err is not None:
        assert "too long" in str(err)
    assert snapshot(fast_session) == before


# ------------------------------------------------------------------------------ ask options
INTS = st.one_of(st.integers(-3, 5), st.integers(2**31, 2**80), st.booleans(), st.floats(), st.text(max_size=2),
                 st.none(), st.sampled_from([np.int64(2), np.float32(1.0)]))


@settings(max_examples=60, **SETTINGS)
@given(top_k=st.one_of(st.none(), st.dictionaries(st.one_of(st.sampled_from(LEVELS + ("segmnt", "")),
                                                            st.integers(), st.text(max_size=3)), INTS, max_size=3),
                       st.lists(st.integers(), max_size=2), st.text(max_size=3)),
       max_new_tokens=st.one_of(st.none(), INTS, st.integers(4097, 10**12)))  # valid ones stay small: fast
def test_ask_hostile_options(fast_session, top_k, max_new_tokens):
    s = fast_session
    before = snapshot(s)
    got, err = call(s.ask, "what color was the car?", top_k=top_k, max_new_tokens=max_new_tokens)
    assert snapshot(s) == before
    if err is not None:
        return
    if isinstance(top_k, dict):
        for level in LEVELS:
            assert sum(b.level == level for b in got.blocks) <= top_k.get(level, 10**9)
    budget = max_new_tokens if max_new_tokens is not None else FAST["generation"]["max_new_tokens"]
    assert isinstance(budget, int) and not isinstance(budget, bool) and 1 <= budget <= 4096
    assert len(s.model.tokenize(got.text)) <= budget + 1


# ------------------------------------------------------------------------------ configuration
ANY = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6),
                st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


#: per field: values that a user might plausibly write, valid or not
FIELDS = {
    "levels.*.name": st.one_of(st.sampled_from(["patch", "frame", "segment", "x_1", "a b", "", "pa'tch"]),
                               st.text(max_size=5)),
    "levels.*.extractor": st.sampled_from(["patch_raster", "patch_spatial", "frame", "segment", "nope", ""]),
    "levels.*.frames": st.one_of(st.integers(-1, 5), st.sampled_from([4096, 4097])),
    "levels.*.tokens": st.sampled_from([None, 1, 7, 49, 98, 196, 197, 0, -49]),
    "levels.*.keep_ratio": st.one_of(st.floats(-0.1, 1.1), st.sampled_from([1e-9, 1.0])),
    "levels.*.alpha": st.floats(-0.5, 1.5),
    "levels.*.top_k": st.integers(-1, 40),
    "levels.*.rerank_weight": st.floats(-0.5, 1.5),
    "levels.*.scorer": st.sampled_from([None, "dual", "attention", "frequency_fft", "frequency_diff", "nope"]),
    "levels.*.bogus": st.integers(),
    "scoring.scorer": st.sampled_from(["dual", "attention", "frequency_fft", "x"]),
    "scoring.frequency": st.sampled_from(["frequency_fft", "frequency_diff", "y"]),
    "compression.dedup": st.booleans(),
    "compression.dedup_threshold": st.floats(-2, 2),
    "compression.dedup_oversample": st.floats(0, 20),
    "retrieval.retriever": st.sampled_from(["semi_hierarchical", "hierarchical", "flat", "nope"]),
    "retrieval.over_retrieval": st.floats(0, 200),
    "retrieval.rerank_n": st.integers(-1, 9),
    "retrieval.guide_level": st.sampled_from([None, "segment", "frame", "patch", "nope"]),
    "retrieval.on_short_stream": st.sampled_from(["clamp", "error", "explode"]),
    "assembly.order": st.sampled_from(["time", "level_score", "random"]),
    "assembly.rerotate": st.booleans(),
    "generation.system_prompt": st.one_of(st.none(), st.text(max_size=30), st.just("<|im_end|>" * 3)),
    "generation.max_new_tokens": st.integers(-1, 3),
    "stream.fps": st.one_of(st.floats(-1, 2000), st.sampled_from([float("nan"), float("inf"), 1e-300])),
    "stream.prefill_batch_tokens": st.integers(-1, 300),
    "stream.encode_batch_frames": st.integers(-1, 5),
    "bogus": st.integers(),
}
ANY = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6),
                st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def configs(draw):
    """FAST with one to three fields changed: to a plausible value of the field, or to anything at all."""
    import copy

    cfg = copy.deepcopy(FAST)
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        path = draw(st.sampled_from(sorted(FIELDS)))
        value = draw(st.one_of(FIELDS[path], FIELDS[path], FIELDS[path], ANY))  # mostly plausible
        parts = path.split(".")
        node = cfg
        if parts[0] == "levels":
            if not isinstance(cfg["levels"], list) or not cfg["levels"]:
                continue  # already replaced by something else
            if draw(st.integers(0, 9)) == 0:  # now and then, replace the whole list
                cfg["levels"] = draw(st.one_of(ANY, st.just([]), st.just(cfg["levels"] * 2)))
                continue
            node = cfg["levels"][draw(st.integers(0, len(cfg["levels"]) - 1))]
            if not isinstance(node, dict):
                continue  # the list was replaced by a list of other things (e.g. [5])
            parts = parts[2:]
        for key in parts[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return cfg


@settings(max_examples=50, **SETTINGS)
@given(cfg=st.one_of(configs(), configs(), configs(), ANY))
def test_random_configuration_values(tiny_model, cfg):
    """Any configuration either builds a working session or is refused with the field named."""
    built, err = call(mukv.MukvConfig.build, cfg)
    if err is not None:
        assert isinstance(err, mukv.ConfigError)
        event("config: refused")
        return
    s, err = call(mukv.Session, model=tiny_model, backend="memory", config=cfg)
    if err is not None:
        assert isinstance(err, mukv.ConfigError)
        event("config: session refused")
        return
    event("config: session built")
    try:
        assert s.config == built
        before = snapshot(s)
        got, err = call(s.feed, frames(4, seed=1))
        if err is not None:
            assert snapshot(s) == before
            return
        a, err = call(s.ask, "what color was the car?")
        if err is not None:
            assert isinstance(err, (mukv.EmptyMemoryError, mukv.RetrievalError)), err
        else:
            assert isinstance(a.text, str)
    finally:
        s.close()


@settings(max_examples=30, **SETTINGS)
@given(kwargs=st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.text(max_size=8).filter(lambda m: m not in mukv.get_registry().entries["models"]),
                       st.integers(), st.none(), st.just("/nonexistent/ckpt")),
    "backend": st.one_of(st.sampled_from(["memory", "lancedb", "nope", ""]), ANY),
    "path": st.one_of(st.none(), st.integers()),
    "policy": st.one_of(st.sampled_from(["mukv", "rekv", "uniform", "nope", ""]), ANY),
    "device": st.one_of(st.sampled_from(["cpu", "cuda:7", "nonsense", "cpu:-3", "meta"]), ANY),
    "stream_id": st.one_of(st.text(max_size=8), ANY),
    "backend_options": st.one_of(st.none(), st.dictionaries(st.text(max_size=4), ANY, max_size=2)),
}))
def test_session_constructor_hostile_arguments(tiny_model, kwargs):
    kwargs.setdefault("model", tiny_model)
    kwargs.setdefault("config", FAST)
    s, err = call(mukv.Session, **kwargs)
    event(f"constructor: {'built' if s is not None else type(err).__name__}")
    if s is not None:
        try:
            s.feed(frames(2))
            s.ask("what is it?")
        finally:
            s.close()


# ------------------------------------------------------------------------------ lifecycle
def test_closed_session_refuses_everything_clearly(tiny_model):
    s = mukv.Session(model=tiny_model, backend="memory", config=FAST)
    s.feed(frames(2))
    s.close()
    s.close()  # twice is fine
    for fn, args in ((s.feed, (frames(1),)), (s.ask, ("what?",)), (s.fork, ()),
                     (s.feed_from, ("iterator", [frames(1)[0]]))):
        _, err = call(fn, *args)
        assert err is not None and "closed" in str(err)


def test_session_still_works_after_every_kind_of_refusal(fast_session):
    """After the properties above (hundreds of refused calls), a plain feed and question still work."""
    s = fast_session
    n = s.stats()["frames"]
    s.feed(frames(3, seed=99))
    assert s.stats()["frames"] == n + 3
    answers(s)
    assert math.isfinite(s._last_time)
