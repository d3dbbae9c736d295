"""The study's statistics against values computed by hand."""
import math

import numpy as np
import pytest

from distil_scale.tools.study_stats import (bootstrap_se, excludes_zero,
                                            minimal_detectable_effect, paired_differences,
                                            pct_above_floor, per_unit_sums, t_interval)


def test_paired_differences_pair_by_seed_and_skip_unpaired():
    arm = {0: 10.0, 1: 12.0, 3: 9.0, 2: 11.0}
    full = {2: 10.0, 0: 11.0, 1: 11.5}
    assert paired_differences(arm, full) == [-1.0, 0.5, 1.0]  # seeds 0, 1, 2; 3 has no pair


def test_t_interval_by_hand():
    # x = 1, 2, 3, 4: mean 2.5, sd sqrt(5/3) = 1.290994; t(0.975, 3) = 3.182446
    ci = t_interval([1, 2, 3, 4])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert ci["n"] == 4 and ci["mean"] == 2.5
    assert ci["sd"] == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
    assert ci["half"] == pytest.approx(half, rel=1e-9)
    assert (ci["lo"], ci["hi"]) == pytest.approx((2.5 - half, 2.5 + half))
    assert excludes_zero(ci)
    assert not excludes_zero(t_interval([-1, 2, 3, 4]))
    one = t_interval([3.0])
    assert one["mean"] == 3.0 and math.isnan(one["half"]) and not excludes_zero(one)


def test_minimal_detectable_effect_by_hand():
    # n = 4 pairs, sd 2: (t(0.975, 3) + t(0.8, 3)) * 2 / 2 = 3.182446 + 0.978472
    assert minimal_detectable_effect(2.0, 4) == pytest.approx(3.182446 + 0.978472, abs=1e-5)
    assert math.isnan(minimal_detectable_effect(2.0, 1))
    # more seeds resolve smaller effects
    assert minimal_detectable_effect(2.0, 8) < minimal_detectable_effect(2.0, 4)


def test_bootstrap_se_of_a_ratio_matches_the_analytic_se_of_a_mean():
    # one position per unit: the ratio is a mean of 0/1, whose SE is sqrt(p(1-p)/n)
    rng = np.random.default_rng(1)
    x = (rng.random(400) < 0.3).astype(float)
    se = bootstrap_se(x, np.ones(400), reps=4000, seed=0)
    assert se == pytest.approx(math.sqrt(x.mean() * (1 - x.mean()) / 400), rel=0.06)


def test_bootstrap_se_resamples_units_jointly_across_rows():
    # two seeds whose per-document differences are identical: their mean varies as one row
    num = np.array([[1.0, -1.0, 2.0, 0.0], [1.0, -1.0, 2.0, 0.0]])
    den = np.array([2.0, 2.0, 2.0, 2.0])
    assert bootstrap_se(num, den, seed=3) == pytest.approx(bootstrap_se(num[0], den, seed=3))
    # a constant difference per document has no evaluation error
    assert bootstrap_se(np.full(5, 0.5), np.ones(5)) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(bootstrap_se([1.0], [1.0]))


def test_pct_above_floor_and_per_unit_sums():
    assert pct_above_floor(30.0, 10.0, 50.0) == 50.0  # halfway from the floor to the teacher
    assert pct_above_floor(10.0, 10.0, 50.0) == 0.0
    assert math.isnan(pct_above_floor(30.0, 50.0, 40.0))  # teacher below the floor
    assert per_unit_sums([1, 2, 3, 4], [0, 2, 0, 2], 3).tolist() == [4.0, 0.0, 6.0]
