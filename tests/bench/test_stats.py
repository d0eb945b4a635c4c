"""Bootstrap intervals of the harness (mukv.bench.stats)."""

from __future__ import annotations

import numpy as np
import pytest

from mukv.bench.stats import bootstrap_interval, paired_interval


def test_interval_of_constant_values_is_the_value():
    iv = bootstrap_interval({0: [1.0] * 10, 1: [1.0] * 5})
    assert (iv.mean, iv.low, iv.high, iv.n, iv.seeds) == (1.0, 1.0, 1.0, 15, 2)


def test_interval_is_deterministic_and_covers_the_mean():
    rng = np.random.default_rng(3)
    groups = {s: (rng.random(99) < 0.4).astype(float) for s in range(3)}
    a, b = bootstrap_interval(groups), bootstrap_interval(groups)
    assert a == b
    assert a.low < a.mean < a.high
    # more questions: a narrower interval
    wide = bootstrap_interval({0: groups[0][:20]})
    narrow = bootstrap_interval({0: groups[0]})
    assert narrow.half_width < wide.half_width


def test_one_seed_is_the_ordinary_bootstrap_over_questions():
    values = [1.0] * 30 + [0.0] * 70
    iv = bootstrap_interval([values], resamples=20000)
    se = (0.3 * 0.7 / 100) ** 0.5
    assert iv.mean == pytest.approx(0.3)
    assert iv.low == pytest.approx(0.3 - 1.96 * se, abs=0.02) and iv.high == pytest.approx(0.3 + 1.96 * se, abs=0.02)


def test_seeds_that_disagree_widen_the_interval():
    agree = bootstrap_interval({0: [1, 0] * 50, 1: [1, 0] * 50})
    disagree = bootstrap_interval({0: [1] * 90 + [0] * 10, 1: [1] * 10 + [0] * 90})
    assert agree.mean == disagree.mean == 0.5
    assert disagree.half_width > 2 * agree.half_width


def test_paired_difference_uses_common_questions_only():
    a = {0: {"q1": 1, "q2": 1, "q3": 0}, 1: {"q1": 1}}
    b = {0: {"q1": 0, "q2": 1, "q4": 1}, 1: {"q1": 1}}
    iv = paired_interval(a, b)
    assert iv.n == 3 and iv.mean == pytest.approx(1 / 3)
    same = paired_interval(a, a)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)


def test_empty_and_bad_arguments():
    assert np.isnan(bootstrap_interval({}).mean)
    with pytest.raises(ValueError):
        bootstrap_interval([[1.0]], level=1.5)
    with pytest.raises(ValueError):
        bootstrap_interval([[1.0]], resamples=0)
