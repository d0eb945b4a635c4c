"""Question wording, the closed vocabulary, scoring and reports."""

import math

import numpy as np
import pytest

from mukv.bench import (
    KINDS,
    LEVELS,
    VOCABULARY,
    Question,
    Stream,
    StreamSpec,
    accuracy_report,
    answer_space,
    iter_clips,
    make_scene,
    normalize,
    parse,
    pose,
    score,
    tokenize,
)


def test_vocabulary_is_sorted_unique_lowercase():
    assert VOCABULARY == sorted(set(VOCABULARY))
    assert all(w == w.lower() and w.strip() == w and w for w in VOCABULARY)
    assert "?" in VOCABULARY and "," in VOCABULARY
    for kind in KINDS:
        for a in answer_space(kind):
            assert tokenize(a) == [a] and a in VOCABULARY


def test_every_question_uses_only_vocabulary_words():
    vocab = set(VOCABULARY)
    texts = []
    for seed in range(300):
        sc = make_scene(np.random.default_rng([seed, 7]), KINDS[seed % len(KINDS)])
        texts.append(pose(sc))
    texts += [(c.question, c.answer) for c in iter_clips(5, 60, num_frames=None)]
    texts += [(q.text, q.answer) for q in Stream(StreamSpec(seed=1, minutes=300, questions=55)).questions()]
    used = set()
    for text, answer in texts:
        toks = tokenize(text) + tokenize(answer)
        assert set(toks) <= vocab, set(toks) - vocab
        assert len(tokenize(answer)) == 1
        used |= set(toks)
    # Nearly every vocabulary word is actually used.
    assert len(vocab - used) <= 2, vocab - used


def test_pose_answers_lie_in_answer_space_and_parse_back():
    for seed in range(200):
        kind = KINDS[seed % len(KINDS)]
        sc = make_scene(np.random.default_rng([seed, 8]), kind)
        text, answer = pose(sc)
        assert answer in answer_space(kind)
        assert text[0].isupper() and text.endswith("?")
        p = parse(text)
        assert p is not None and p["kind"] == kind


@pytest.mark.parametrize(
    "pred,answer,ok",
    [
        ("Red", "red", True),
        ("  red.", "red", True),
        ("RED!!", "red", True),
        ("red circle", "red", True),
        ("The red one", "red", False),
        ("3", "three", True),
        ("Three.", "three", True),
        ("blue", "red", False),
        ("", "red", False),
        (None, "no", False),
        ("yes, it was", "yes", True),
        ("\nleft\n", "left", True),
    ],
)
def test_score_normalisation(pred, answer, ok):
    assert score(pred, answer) is ok


def test_normalize():
    assert normalize("Up!") == "up"
    assert normalize("") == "" and normalize("?!") == ""
    assert normalize("4 times") == "four"


def _q(kind, answer, depth):
    return Question(
        id="x", kind=kind, level=LEVELS[kind], text="t", answer=answer,
        ask_frame=10, evidence_start=0, evidence_end=2, depth_s=depth,
    )


def test_accuracy_report_groups():
    results = [
        (_q("motion", "left", 30.0), "left"),
        (_q("motion", "up", 4000.0), "down"),
        (_q("mark_color", "red", 90000.0), "Red."),
        {"kind": "count", "answer": "two", "prediction": "2"},
        {"kind": "object_color", "correct": False, "depth_s": 700.0},
    ]
    r = accuracy_report(results)
    assert r["n"] == 5 and r["correct"] == 3 and math.isclose(r["overall"], 0.6)
    assert r["by_kind"]["motion"] == {"accuracy": 0.5, "n": 2, "correct": 1}
    assert r["by_level"]["segment"]["n"] == 3 and r["by_level"]["patch"]["accuracy"] == 1.0
    assert list(r["by_level"]) == ["patch", "frame", "segment"]
    assert r["by_depth"]["<10min"]["n"] == 1 and r["by_depth"][">1d"]["correct"] == 1
    assert sum(v["n"] for v in r["by_depth"].values()) == 4
    empty = accuracy_report([])
    assert empty["n"] == 0 and math.isnan(empty["overall"])
    with pytest.raises(TypeError):
        accuracy_report([42])


def test_question_dict_round_trip():
    q = _q("event", "grew", 12.5)
    assert Question.from_dict(q.to_dict()) == q
    assert q.depth_frames == 9
