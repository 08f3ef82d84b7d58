"""Interval, paired-difference and verdict arithmetic against hand-computed values."""

import math

import pytest

from robustmed_lite.evaluation.stats import Interval, paired_differences, t_interval, verdict

T_975_2 = 4.302652729911275  # the t quantile at 0.975 with 2 degrees of freedom (tables: 4.303)


def test_t_interval_of_three_values():
    # mean 2, s = 1, half-width t * s / sqrt(3) = 4.30265 / 1.73205 = 2.48414
    iv = t_interval([1.0, 2.0, 3.0])
    assert iv.mean == pytest.approx(2.0) and iv.std == pytest.approx(1.0) and iv.n == 3
    assert iv.low == pytest.approx(2 - 2.484137711843753) and iv.high == pytest.approx(2 + 2.484137711843753)
    assert iv.half_width == pytest.approx(T_975_2 / math.sqrt(3))
    assert iv.text(2) == "2.00 ± 2.48"


def test_t_interval_edge_cases():
    one = t_interval([0.7])
    assert one.mean == 0.7 and math.isnan(one.low) and one.text() == "0.700"
    assert math.isnan(t_interval([]).mean) and t_interval([]).n == 0
    same = t_interval([0.5, 0.5, 0.5])
    assert same.low == same.high == 0.5
    # Non-finite values (a metric undefined for a run) are left out, and the interval says so through n.
    assert t_interval([1.0, float("nan"), 3.0]).n == 2
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1, 2], confidence=1.5)


def test_paired_differences_and_their_interval():
    method = {0: 0.90, 1: 0.80, 2: 0.85}
    prior = {0: 0.80, 1: 0.82, 2: 0.80, 3: 0.99}  # seed 3 has no partner and is not used
    diffs = paired_differences(method, prior)
    assert list(diffs) == [0, 1, 2]
    assert [round(d, 10) for d in diffs.values()] == [0.1, -0.02, 0.05]
    iv = t_interval(list(diffs.values()))
    # mean 0.04333, s = 0.060277 (deviations 0.05667, -0.06333, 0.00667), half-width 4.30265 * s / sqrt(3)
    assert iv.mean == pytest.approx(0.043333333333)
    assert iv.std == pytest.approx(0.060277137733)
    assert iv.half_width == pytest.approx(0.149736711006)
    with pytest.raises(ValueError, match="no seed in common"):
        paired_differences({0: 1.0}, {1: 1.0})


@pytest.mark.parametrize(
    "low, high, claimed, expected",
    [
        (0.05, 0.40, 0.25, "reproduced"),  # credibly better, the claim inside the interval
        (0.30, 0.50, 0.25, "reproduced"),  # credibly better by more than claimed
        (0.01, 0.10, 0.25, "not reproduced"),  # better, but credibly by less than claimed
        (-0.20, -0.05, 0.034, "not reproduced"),  # credibly worse
        (-0.05, 0.30, 0.25, "inconclusive"),  # too wide to tell
        (0.0, 0.30, 0.25, "inconclusive"),  # lo must be > 0
    ],
)
def test_verdict_rule(low, high, claimed, expected):
    assert verdict(Interval((low + high) / 2, low, high, 3, 0.1), claimed) == expected


def test_verdict_without_an_interval_is_inconclusive():
    assert verdict(t_interval([0.5]), 0.034) == "inconclusive"
