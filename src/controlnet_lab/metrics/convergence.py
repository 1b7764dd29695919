"""Sudden convergence (paper Sec. 3.3): does a ControlNet start following its condition abruptly, and when?

On a curve of condition fidelity y_0..y_n measured at steps s_0 < ... < s_n (the first
at or near step 0):

- the initial level is y_0; the final level is the mean of the last ``final_points``
  measurements; there is a rise only if final - initial >= ``min_gain`` (an absolute
  gain in the metric's units; fidelity here is in [0, 1]);
- the step a curve *reaches* a level is the first s_i from which every later
  measurement stays at or above it, so one lucky evaluation does not count;
- the rise runs from reaching 10% of the way from initial to final (``start_step``) to
  reaching 90% (``end_step``); ``rise_fraction`` is its length over the curve's span
  s_n - s_0;
- the rise is **sudden** when ``rise_fraction`` <= ``max_rise_fraction`` (0.2: the
  10-90% rise takes at most a fifth of training; a linear ramp's takes 0.8 of it, a step's
  0). ``sudden_convergence_step`` is then the step the curve reaches half-way, and null
  otherwise (no rise, or a gradual one).

The steps found are measurement steps, so their precision is the measuring interval
(``eval.every_n_steps``).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_RISE_FRACTION = 0.2


def reached_at(steps: np.ndarray, values: np.ndarray, level: float) -> int | None:
    """The first step from which every later value stays at or above ``level``."""
    above = values >= level
    stays_above = np.flip(np.logical_and.accumulate(np.flip(above)))
    return int(steps[int(np.argmax(stays_above))]) if stays_above.any() else None


def rise(steps: Sequence[int], values: Sequence[float], min_gain: float = 0.15, final_points: int = 2,
         max_rise_fraction: float = MAX_RISE_FRACTION) -> dict | None:
    """The curve's 10%-to-90% rise (module docstring), or None when it gains less than ``min_gain``."""
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
    if end is None:  # the last points straddle the 90% mark: the rise has not ended
        end = int(steps[-1])
    fraction = (end - start) / max(int(steps[-1] - steps[0]), 1)
    return {"initial": round(float(initial), 4), "final": round(float(final), 4), "start_step": start, "half_step": half,
            "end_step": end, "rise_fraction": round(float(fraction), 4), "max_rise_fraction": max_rise_fraction,
            "sudden": bool(fraction <= max_rise_fraction)}


def sudden_step(found: dict | None) -> int | None:
    """The step a ``rise`` reaches half-way, when it is sudden; None without a rise or for a gradual one."""
    return found["half_step"] if found and found["sudden"] else None


def sudden_convergence_step(steps: Sequence[int], values: Sequence[float], **settings) -> int | None:
    return sudden_step(rise(steps, values, **settings))
