"""Sudden convergence (paper Sec. 3.3): does a ControlNet start following its condition abruptly, and when?

On a curve of condition fidelity y_0..y_n measured at steps s_0 < ... < s_n (the first
at or near step 0), every ``interval`` steps (the median spacing: the curve's resolution):

- the initial level is y_0; the final level is the mean of the last ``final_points``
  measurements; there is a rise only if final - initial >= ``min_gain`` (an absolute
  gain in the metric's units; fidelity here is in [0, 1]);
- the step a curve *reaches* a level is the first s_i from which every later
  measurement stays at or above it, so one lucky evaluation does not count;
- the rise runs from reaching 10% of the way from initial to final (``start_step``) to
  reaching 90% (``end_step``); ``rise_share`` is its length over the steps taken to reach
  90% (``end_step - s_0``). Neither depends on how long training went on after the rise:
  the same curve with a longer flat tail gets the same verdict;
- the rise is **sudden** when it takes at most ``max_rise_share`` (0.25) of the steps it
  took to end: a curve that sits near its start and then climbs within a quarter of the
  time it waited (the paper: "within a few hundred steps", after thousands), where a
  linear ramp from step 0 takes 0.89 and a step takes 0. Each reached step is known only
  to within one ``interval`` (the level was crossed after the measurement before it), so
  the verdict is ``true`` only when the rise plus one interval is within the share,
  ``false`` only when the rise minus one interval exceeds it, and ``null`` otherwise: the
  curve is too coarse to tell (measure it more often: ``eval.every_n_steps``), as it is
  when the rise has not ended by the last point.

``sudden_convergence_step`` is the step the curve reaches half-way when the rise is sudden,
and null otherwise. ``curve_convergence`` applies this to a run's stored curve: the run's
results.json and the tables (which judge stored curves again by this rule) use it.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

MAX_RISE_SHARE = 0.25


def reached_at(steps: np.ndarray, values: np.ndarray, level: float) -> int | None:
    """The first step from which every later value stays at or above ``level``."""
    above = values >= level
    stays_above = np.flip(np.logical_and.accumulate(np.flip(above)))
    return int(steps[int(np.argmax(stays_above))]) if stays_above.any() else None


def sudden_verdict(rise_steps: int, steps_to_end: int, interval: float, max_rise_share: float) -> tuple[bool | None, str | None]:
    """(sudden, why undecided) for a measured rise, each end known to within one ``interval``."""
    allowed = max_rise_share * steps_to_end
    if rise_steps + interval <= allowed:
        return True, None
    if rise_steps - interval > allowed:
        return False, None
    return None, (f"a rise of {rise_steps} steps measured every {interval:g} steps could be {max(rise_steps - interval, 0):g}-"
                  f"{rise_steps + interval:g}, around the {allowed:g} allowed: measure the curve more often")


def rise(steps: Sequence[int], values: Sequence[float], min_gain: float = 0.15, final_points: int = 2,
         max_rise_share: float = MAX_RISE_SHARE) -> dict | None:
    """The curve's 10%-to-90% rise and whether it is sudden (module docstring), or None when it gains less than
    ``min_gain``."""
    if len(steps) != len(values):
        raise ValueError(f"steps and values differ in length ({len(steps)} vs {len(values)})")
    if len(values) < final_points + 1:
        return None
    steps, values = np.asarray(steps), np.asarray(values, dtype=float)
    initial, final = values[0], values[-final_points:].mean()
    gain = final - initial
    if gain < min_gain:
        return None
    start, half, end = (reached_at(steps, values, initial + f * gain) for f in (0.1, 0.5, 0.9))
    interval = float(np.median(np.diff(steps)))
    found = {"initial": round(float(initial), 4), "final": round(float(final), 4), "start_step": start, "half_step": half,
             "end_step": end, "curve_interval": interval, "max_rise_share": max_rise_share}
    if end is None:  # the last points straddle the 90% mark
        return {**found, "rise_steps": None, "rise_share": None, "sudden": None, "undecided": "the rise has not ended by the last point"}
    rise_steps, steps_to_end = end - start, max(end - int(steps[0]), 1)
    sudden, undecided = sudden_verdict(rise_steps, steps_to_end, interval, max_rise_share)
    return {**found, "rise_steps": rise_steps, "rise_share": round(rise_steps / steps_to_end, 4), "sudden": sudden, "undecided": undecided}


def sudden_step(found: dict | None) -> int | None:
    """The step a ``rise`` reaches half-way, when it is sudden; None without a rise, for a gradual one or an undecided one."""
    return found["half_step"] if found and found["sudden"] else None


def sudden_convergence_step(steps: Sequence[int], values: Sequence[float], **settings) -> int | None:
    return sudden_step(rise(steps, values, **settings))


def curve_convergence(curve: list[dict], metric: str) -> dict:
    """``rise`` and ``sudden_convergence_step`` of a fidelity curve (points ``{"step": s, metric: y}``)."""
    points = sorted((point for point in curve if point.get(metric) is not None), key=lambda point: point["step"])
    found = rise([point["step"] for point in points], [point[metric] for point in points])
    return {"rise": found, "sudden_convergence_step": sudden_step(found)}


def recent_slope(steps: Sequence[int], values: Sequence[float], points: int, level: float = 0.95) -> dict | None:
    """The least-squares slope of the last ``points`` values against their steps, per 1,000 steps, with its Student-t
    interval at ``level`` (None before there are ``points`` values)."""
    if len(values) < max(points, 3):
        return None
    x, y = np.asarray(steps[-points:], dtype=float) / 1000.0, np.asarray(values[-points:], dtype=float)
    fit = stats.linregress(x, y)
    half = float(stats.t.ppf(0.5 + level / 2, points - 2) * fit.stderr)
    return {"from_step": int(steps[-points]), "to_step": int(steps[-1]), "slope_per_1k": round(float(fit.slope), 5),
            "ci95_per_1k": [round(float(fit.slope) - half, 5), round(float(fit.slope) + half, 5)]}


def stopping_reading(steps: Sequence[int], values: Sequence[float], points: int, max_slope_per_1k: float, min_steps: int,
                     min_rise: float = 0.0) -> dict | None:
    """The stopping rule's reading of a curve so far: ``recent_slope`` over the last ``points`` points, how far the
    curve has ``risen`` above its first point, and whether it has ``converged``: the slope's upper 95% bound below
    ``max_slope_per_1k``, at least ``min_steps`` in, and risen by at least ``min_rise`` (a curve still flat at the
    base's level has not converged: its rise may not have begun, as in sudden convergence). None before ``points``
    points."""
    reading = recent_slope(steps, values, points)
    if reading is None:
        return None
    risen = round(float(values[-1] - values[0]), 5)
    converged = reading["to_step"] >= min_steps and reading["ci95_per_1k"][1] < max_slope_per_1k and risen >= min_rise
    return {**reading, "risen": risen, "converged": converged}


def first_converged_step(steps: Sequence[int], values: Sequence[float], **rule) -> int | None:
    """The step at which the stopping rule (``stopping_reading``'s keywords) first holds on this curve, read point by
    point as training reads it; None if it never does."""
    for end in range(1, len(values) + 1):
        reading = stopping_reading(steps[:end], values[:end], **rule)
        if reading is not None and reading["converged"]:
            return reading["to_step"]
    return None
