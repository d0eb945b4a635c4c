"""Confidence intervals for the harness: a bootstrap over seeds and questions.

A cell of the results (one policy at one stream length) holds the questions of
several streams (seeds). Questions of one stream share its scenes and its
difficulty, so the interval is a two-stage (hierarchical) bootstrap: each
resample draws the seeds with replacement, then each drawn seed's questions
with replacement, and takes the mean over every drawn question. With one seed
it is the ordinary bootstrap over questions.

:func:`paired_interval` does the same for the difference between two policies
asked the same questions (per question ``a - b``), which is how a lead of one
policy over another is judged: the questions' own difficulty cancels.

Both are deterministic for a given ``rng_seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

#: Bootstrap resamples per interval.
RESAMPLES = 4000
#: Coverage of the reported intervals.
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap confidence interval.

    Attributes:
        mean: the mean over every value (every question of every seed).
        low: lower bound of the interval.
        high: upper bound of the interval.
        n: number of values.
        seeds: number of seeds (groups) the values come from.
    """

    mean: float
    low: float
    high: float
    n: int
    seeds: int

    @property
    def half_width(self) -> float:
        """Half the interval's width (the "+-" figure)."""
        return (self.high - self.low) / 2

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "seeds": self.seeds}

    def fmt(self, digits: int = 2) -> str:
        """``0.42 [0.35, 0.49]``."""
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap_interval(groups: Mapping[object, Sequence[float]] | Sequence[Sequence[float]],
                       resamples: int = RESAMPLES, level: float = LEVEL, rng_seed: int = 0) -> Interval:
    """Mean and two-stage bootstrap interval of values grouped by seed.

    Args:
        groups: the values of each seed (a mapping seed -> values, or a list of lists);
            empty groups are ignored.
        resamples: bootstrap resamples.
        level: coverage (0.95: the 2.5th and 97.5th percentiles).
        rng_seed: seed of the resampling.

    Returns:
        An :class:`Interval`; ``nan`` bounds when there is no value.

    Raises:
        ValueError: ``level`` outside (0, 1) or ``resamples`` < 1.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1; got {resamples}")
    values = list(groups.values()) if isinstance(groups, Mapping) else list(groups)
    arrays = [np.asarray(v, dtype=np.float64).reshape(-1) for v in values]
    arrays = [a for a in arrays if a.size]
    n = int(sum(a.size for a in arrays))
    if n == 0:
        nan = float("nan")
        return Interval(nan, nan, nan, 0, 0)
    mean = float(np.concatenate(arrays).mean())
    rng = np.random.default_rng(rng_seed)
    # stage 2 first: per seed, the sums of `resamples` resamples of its questions -> [S, R]
    sums = np.stack([a[rng.integers(0, a.size, (resamples, a.size))].sum(axis=1) for a in arrays])
    sizes = np.array([a.size for a in arrays], dtype=np.float64)
    s = len(arrays)
    if s == 1:
        boot = sums[0] / sizes[0]
    else:  # stage 1: which seeds each resample draws
        pick = rng.integers(0, s, (resamples, s))  # [R, S]
        r = np.arange(resamples)[:, None]
        boot = sums[pick, r].sum(axis=1) / sizes[pick].sum(axis=1)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return Interval(mean, float(low), float(high), n, s)


def paired_interval(a: Mapping[object, Mapping[object, float]], b: Mapping[object, Mapping[object, float]],
                    resamples: int = RESAMPLES, level: float = LEVEL, rng_seed: int = 0) -> Interval:
    """The mean difference ``a - b`` over the questions both answered, with its interval.

    Args:
        a, b: per seed, per question id, a value (1.0 correct, 0.0 wrong, or any score).
            Only questions present in both count.

    Returns:
        An :class:`Interval` of the per-question difference, bootstrapped as in
        :func:`bootstrap_interval` (seeds, then questions).
    """
    groups = {}
    for seed, qa in a.items():
        qb = b.get(seed, {})
        common = [q for q in qa if q in qb]
        groups[seed] = [float(qa[q]) - float(qb[q]) for q in common]
    return bootstrap_interval(groups, resamples, level, rng_seed)
