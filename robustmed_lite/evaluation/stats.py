"""Small-sample statistics for results over seeds: t-intervals, paired differences, and claim verdicts.

Three seeds give a wide interval (the t quantile at 2 degrees of freedom is 4.30); that width is the honest
uncertainty of a three-seed comparison, and the verdict rule below is read from it, never written by hand.

Verdict rule for a claimed gain ``G`` of one method over a comparator, from the paired per-seed differences
``d_s`` and their 95% t-interval ``[lo, hi]``:

* **not reproduced** if ``hi < G``: the gain is credibly smaller than claimed (this includes a loss);
* **reproduced** if ``hi >= G`` and ``lo > 0``: the method is credibly better, and the claimed gain is within (or
  below) what the data allow;
* **inconclusive** otherwise (``lo <= 0`` and ``hi >= G``): the interval is too wide to tell, e.g. too few seeds.

What a study could have detected: ``minimum_detectable_effect`` is the smallest true mean gain that the paired
two-sided t-test at 5% finds with 80% power, were the seed-to-seed spread of the differences what was measured.
An inconclusive verdict with minimum detectable effect X reads: the study could not have told a gain smaller
than about X from none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize as _scipy_optimize
from scipy import stats as _scipy_stats

VERDICTS = ("reproduced", "not reproduced", "inconclusive")
VERDICT_RULE = (
    "From the paired per-seed differences d (method minus comparator) and their 95% t-interval "
    "[lo, hi]: 'not reproduced' if hi < claimed gain; else 'reproduced' if lo > 0; else "
    "'inconclusive'."
)


@dataclass(frozen=True)
class Interval:
    """Mean of a sample with a two-sided t-interval.

    Attributes:
        mean: Sample mean (NaN for an empty sample).
        low: Lower end of the interval (NaN with fewer than two values).
        high: Upper end.
        n: Number of finite values.
        std: Sample standard deviation (ddof = 1; NaN with fewer than two values).
    """

    mean: float
    low: float
    high: float
    n: int
    std: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def text(self, digits: int = 3, scale: float = 1.0) -> str:
        """``mean ± half-width`` (or the mean alone when there is no interval)."""
        if math.isnan(self.mean):
            return "n/a"
        if math.isnan(self.low):
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.half_width * scale:.{digits}f}"


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and two-sided t-interval, ``mean ± t_{(1+c)/2, n-1} * s / sqrt(n)``; non-finite values are dropped.

    Args:
        values: The sample, e.g. one accuracy per seed.
        confidence: Coverage of the interval.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, math.nan)
    std = float(x.std(ddof=1))
    half = float(_scipy_stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, std)


def paired_differences(a: dict, b: dict) -> dict:
    """Per-key differences ``a[k] - b[k]`` over the keys (seeds) both have, in sorted key order.

    Raises:
        ValueError: The two share no key: nothing can be paired.
    """
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"no seed in common to pair: {sorted(a)} vs {sorted(b)}")
    return {k: float(a[k]) - float(b[k]) for k in common}


def verdict(interval: Interval, claimed_gain: float) -> str:
    """The rule of the module docstring applied to the interval of paired gains; 'inconclusive' without one."""
    if math.isnan(interval.low) or math.isnan(interval.high):
        return "inconclusive"
    if interval.high < claimed_gain:
        return "not reproduced"
    if interval.low > 0:
        return "reproduced"
    return "inconclusive"


def detection_power(effect: float, n: int, std: float, confidence: float = 0.95) -> float:
    """The probability that the two-sided paired t-test at level ``1 - confidence`` rejects "no gain" when the true
    mean gain is ``effect`` and the ``n`` paired differences have standard deviation ``std`` (noncentral t)."""
    df = n - 1
    critical = float(_scipy_stats.t.ppf((1 + confidence) / 2, df))
    shift = effect * math.sqrt(n) / std
    # P(T > c) + P(T < -c), the second as P(-T > c) with -T noncentral at -shift
    return float(_scipy_stats.nct.sf(critical, df, shift) + _scipy_stats.nct.sf(critical, df, -shift))


def minimum_detectable_effect(n: int, std: float, power: float = 0.8, confidence: float = 0.95) -> float:
    """The smallest true mean gain the paired t-test (two-sided, level ``1 - confidence``) detects with probability
    ``power``, for ``n`` paired differences of standard deviation ``std``.

    Returns:
        The effect in the units of the differences; NaN with fewer than two pairs or no finite std, 0 when the
        differences do not vary.
    """
    if not 0 < power < 1:
        raise ValueError(f"power must lie in (0, 1), got {power}")
    if n < 2 or not math.isfinite(std):
        return math.nan
    if std == 0:
        return 0.0
    high = std
    while detection_power(high, n, std, confidence) < power:  # bracket the root (the power grows with the effect)
        high *= 2
    return float(_scipy_optimize.brentq(lambda e: detection_power(e, n, std, confidence) - power, 0.0, high))


def paired_gain(runs, a: str, b: str, col: str) -> dict:
    """Row ``a`` minus row ``b`` of per-run results (columns ``name``, ``seed`` and ``col``), paired by seed: the
    mean gain, its 95% t-interval and the number of pairs; empty when either row or the column is missing."""
    ra, rb = runs[runs["name"] == a], runs[runs["name"] == b]
    if ra.empty or rb.empty or col not in ra or col not in rb:
        return {}
    iv = t_interval(list(paired_differences(dict(zip(ra["seed"], ra[col])), dict(zip(rb["seed"], rb[col]))).values()))
    return {"gain_mean": iv.mean, "gain_ci_low": iv.low, "gain_ci_high": iv.high, "n_pairs": iv.n}
