"""Intervals over seeds, and when a difference between two methods is called.

A sweep gives each method a few seeds. A cell is reported as its mean, its sample standard
deviation and a Student-t interval. Two methods are compared by the difference of their
means: paired by seed where both have the same seeds (the seed fixes the ControlNet's start,
the data order and the evaluation noise, so the per-seed differences cancel what they share),
Welch's unpaired interval otherwise. A difference is called only when its interval excludes
0; otherwise it is inconclusive at this power, and the report says how many seeds would
decide it: the smallest n at which a difference of the observed size, with the observed
spread, would be detected with 80% power (a t-test at the same level). A paired difference
that is the same nonzero value in every seed has an interval of no width; it is reported as
"no spread", not called: with a few seeds that is most often one step of the metric's
resolution (one image of 64, one curve interval), which a t-interval cannot weigh.

Against an equivalence margin d fixed before the runs (``against_margin``), the same interval says more: inside
[-d, +d] the two are equivalent at that margin (two one-sided tests, each rejecting a difference of d or more at
(1 - level) / 2: stricter than the usual TOST at 1 - level, which reads a 1 - 2 (1 - level) interval), wholly beyond
-d or +d they differ by more than d, otherwise it is undecided.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

POWER = 0.8  # of the detectable effect and the seeds that would decide
MAX_SEEDS = 1000  # beyond this "would decide" is reported as undecidable in practice


def half_width(std, count, level: float = 0.95):
    """Half the width of the Student-t interval of a mean from ``count`` values with sample std ``std`` (arrays work
    too); NaN for fewer than 2 values."""
    count = np.asarray(count, dtype=float)
    dof = np.where(count >= 2, count - 1, np.nan)
    return stats.t.ppf(0.5 + level / 2, dof) * np.asarray(std, dtype=float) / np.sqrt(count)


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the mean of ``values``; the interval is (nan, nan) for fewer than 2 values."""
    values = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    half = float(half_width(values.std(ddof=1) if len(values) > 1 else math.nan, len(values), level))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Difference:
    """``treatment`` minus ``reference``: the mean difference and its interval at ``level``."""

    mean: float
    low: float
    high: float
    seeds: int            # pairs where paired; the smaller arm otherwise
    paired: bool
    detectable: float     # the smallest |difference| this design detects with 80% power, at the observed spread
    seeds_to_decide: int | None  # where inconclusive: seeds (per arm) at which the observed difference would be called

    @property
    def verdict(self) -> str:
        if math.isnan(self.low):
            return "too few seeds"
        if self.low == self.high == 0:
            return "identical"  # every pair equal (e.g. the base alone, which the arms share)
        if self.low == self.high:
            return "no spread"  # the same nonzero difference in every seed
        if self.low > 0:
            return "higher"
        if self.high < 0:
            return "lower"
        return "inconclusive"

    def within(self, margin: float) -> bool:
        """Whether the interval lies inside [-margin, +margin]: equivalent at that margin."""
        return -margin <= self.low and self.high <= margin

    def against_margin(self, margin: float) -> str:
        """Where the interval lies against [-margin, +margin] (see the module's docstring)."""
        if math.isnan(self.low):
            return "too few seeds"
        if self.within(margin):
            return f"equivalent within ±{margin:g}"
        if self.high < -margin:
            return f"lower by more than {margin:g}"
        if self.low > margin:
            return f"higher by more than {margin:g}"
        return "undecided"


def difference(treatment: dict, reference: dict, level: float = 0.95) -> Difference:
    """Compare two methods' scores, each given as {seed: value}; NaN scores are left out."""
    treatment = {seed: v for seed, v in treatment.items() if not math.isnan(v)}
    reference = {seed: v for seed, v in reference.items() if not math.isnan(v)}
    alpha = 1 - level
    paired = set(treatment) == set(reference) and len(treatment) >= 2
    if paired:
        diffs = np.array([treatment[s] - reference[s] for s in sorted(treatment)])
        mean, n = float(diffs.mean()), len(diffs)
        spread, df = float(diffs.std(ddof=1)), n - 1
        se = spread / math.sqrt(n)
    else:
        a, b = np.array(list(treatment.values())), np.array(list(reference.values()))
        mean, n = (float(a.mean() - b.mean()) if len(a) and len(b) else math.nan), min(len(a), len(b))
        if len(a) < 2 or len(b) < 2:
            return Difference(mean, math.nan, math.nan, n, False, math.nan, None)
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)  # Welch
        se = math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se > 0 else len(a) + len(b) - 2
        spread = math.sqrt(a.var(ddof=1) + b.var(ddof=1))  # sd of a difference of one draw from each arm
    half = stats.t.ppf(1 - alpha / 2, df) * se
    called = mean - half > 0 or mean + half < 0
    decide = None if called else _seeds_to_decide(abs(mean), spread, alpha, arms=1 if paired else 2)
    return Difference(mean, mean - half, mean + half, n, paired, _detectable(spread, n, df, alpha), decide)


def _detectable(sd: float, n: int, df: float, alpha: float) -> float:
    return (stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(POWER, df)) * sd / math.sqrt(n)


def _seeds_to_decide(effect: float, sd: float, alpha: float, arms: int) -> int | None:
    """The smallest n >= 2 seeds (pairs, or seeds per arm for ``arms=2``) whose detectable effect is at most ``effect``
    (a t-test with ``arms`` x (n - 1) degrees of freedom); None if the effect is 0 or needs more than MAX_SEEDS."""
    if effect == 0 or math.isnan(effect):
        return None
    if sd == 0:
        return 2
    for n in range(2, MAX_SEEDS + 1):
        if _detectable(sd, n, arms * (n - 1), alpha) <= effect:
            return n
    return None
