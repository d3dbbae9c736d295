"""The study's statistics, as pure functions (numpy and scipy only).

The unit is the pretraining seed: each arm's score minus the full recipe's score at the same
seed (same data order and masks) is one paired difference; the arm's effect is their mean with
a Student-t interval. Evaluation error (which held-out documents or dev examples happened to be
drawn) is a separate figure: a bootstrap over those units, resampled jointly for every seed.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def paired_differences(arm: dict, ref: dict) -> list[float]:
    """``arm[seed] - ref[seed]`` for the seeds both have, in seed order."""
    seeds = sorted(set(arm) & set(ref))
    return [float(arm[s]) - float(ref[s]) for s in seeds]


def t_interval(xs, level: float = 0.95) -> dict:
    """Mean, sample standard deviation and the two-sided Student-t interval of the mean
    (``half`` its half-width; nan with fewer than two values)."""
    x = np.asarray(xs, dtype=np.float64)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "sd": math.nan, "half": math.nan, "lo": math.nan,
                "hi": math.nan}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "half": half, "lo": mean - half, "hi": mean + half}


def excludes_zero(ci: dict) -> bool:
    return bool(ci["n"] >= 2 and (ci["lo"] > 0 or ci["hi"] < 0))


def minimal_detectable_effect(sd: float, n: int, alpha: float = 0.05,
                              power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired t-test at ``alpha`` finds with
    probability ``power`` given n pairs of standard deviation ``sd``:
    (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    df = n - 1
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * sd / math.sqrt(n))


def bootstrap_se(num, den, reps: int = 1000, seed: int = 0) -> float:
    """Standard error, over resamples of the units (documents, dev examples), of
    ``mean over rows of sum(num[row]) / sum(den)``.

    ``num``: (rows, units) per-unit sums, one row per seed (a 1-d array is one row); ``den``:
    (units,) per-unit counts, the same for every row (the same positions score every model).
    A difference of two models is passed as the difference of their per-unit sums. Every
    replicate draws one set of units for all rows: the seeds were scored on the same set."""
    num = np.atleast_2d(np.asarray(num, dtype=np.float64))
    den = np.asarray(den, dtype=np.float64)
    units = num.shape[1]
    if units < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(units, size=(reps, units))
    counts = np.stack([np.bincount(i, minlength=units) for i in idx])  # (reps, units)
    ratio = (counts @ num.T) / (counts @ den)[:, None]                  # (reps, rows)
    return float(ratio.mean(axis=1).std(ddof=1))


def pct_above_floor(x: float, floor: float, teacher: float) -> float:
    """``x`` as a share of the teacher's margin over the floor (majority class, unigram guess):
    0 % at the floor, 100 % at the teacher; nan when the teacher is not above the floor."""
    gap = teacher - floor
    return 100.0 * (x - floor) / gap if gap > 0 else math.nan


def per_unit_sums(values, unit_of, units: int):
    """Sum ``values`` per unit: (units,) from positions tagged with ``unit_of``."""
    return np.bincount(np.asarray(unit_of, dtype=np.int64),
                       weights=np.asarray(values, dtype=np.float64), minlength=units)
