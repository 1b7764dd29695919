"""The method every ratio benchmark measures by, so that a ratio carries its own uncertainty.

Each round runs every setup once, in an order rotated from round to round (no setup is always first or last, where a
warm or a tired machine favours it); a ratio is taken **within a round** (its two figures measured minutes apart, under
the same machine state) and reported as the median over rounds with a bootstrap 95% interval (percentile method, 9,999
resamples, fixed seed), beside every round's raw figures. At least ``MIN_ROUNDS`` rounds make a result; fewer (a smoke
run, a test) are recorded as such.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import bootstrap

MIN_ROUNDS = 7
RESAMPLES = 9999


def rotated(setups: Sequence[str], round_index: int) -> list[str]:
    """The setups in round ``round_index``'s order: the list turned left by the round's number."""
    shift = round_index % len(setups)
    return [*setups[shift:], *setups[:shift]]


def run_rounds(setups: Sequence[str], rounds: int, measure: Callable[[str, int], dict]) -> list[dict]:
    """``measure(setup, round_index)`` for every setup of every round, in rotated order: one dict of figures per setup per
    round, plus the round's ``order``."""
    results = []
    for i in range(rounds):
        order = rotated(setups, i)
        results.append({"order": order, **{setup: measure(setup, i) for setup in order}})
    return results


def seconds_per_step(starts: Sequence[float], skip: int) -> float:
    """The mean time between successive batch starts after the first ``skip`` steps (``starts`` ends with the loop's
    end): a mean, not a median, so that periodic costs (logging, checkpoints) count."""
    window = starts[skip:]
    if len(window) < 2:
        raise ValueError(f"{len(starts)} batch starts leave no step after skipping {skip}")
    return (window[-1] - window[0]) / (len(window) - 1)


def median_interval(values: Sequence[float]) -> dict:
    """The median of ``values`` with its bootstrap 95% interval (None for fewer than 2 values)."""
    values = [float(v) for v in values]
    interval = None
    if len(values) >= 2 and len(set(values)) > 1:
        result = bootstrap((np.asarray(values),), np.median, n_resamples=RESAMPLES, method="percentile", rng=np.random.default_rng(0))
        interval = [round(float(result.confidence_interval.low), 4), round(float(result.confidence_interval.high), 4)]
    elif len(values) >= 2:
        interval = [values[0], values[0]]
    return {"median": round(statistics.median(values), 4), "ci95": interval, "n": len(values)}


def within_round_ratio(rounds: list[dict], numerator: str, denominator: str, figure: str | Callable[[dict], float]) -> dict:
    """``numerator``'s figure over ``denominator``'s, taken within each round: the median, its interval and each round's
    ratio. ``figure``: a key of the setups' dicts, or a function of one."""
    read = figure if callable(figure) else (lambda setup: setup[figure])
    ratios = [read(r[numerator]) / read(r[denominator]) for r in rounds]
    return {**median_interval(ratios), "per_round": [round(ratio, 4) for ratio in ratios]}


def method(rounds: int) -> dict:
    """How the ratios were taken, for the result file."""
    return {"rounds": rounds, "order": "rotated each round", "ratio": "median of within-round ratios",
            "interval": f"bootstrap percentile 95%, {RESAMPLES} resamples", "minimum_rounds": MIN_ROUNDS,
            "is_result": rounds >= MIN_ROUNDS}
