"""Sudden convergence (paper Sec. 3.3): the step at which a ControlNet starts following its condition.

Definition, on a curve of condition fidelity y_0..y_n measured at steps s_0 < ... < s_n
(the first measurement at or near step 0):

- the initial plateau is y_0; the final level is the mean of the last ``final_points``
  measurements;
- there is a jump only if final - initial >= ``min_gain`` (an absolute gain in the
  metric's units; fidelity here is in [0, 1]);
- the sudden-convergence step is the first s_i whose y_i reaches
  initial + ``fraction`` x (final - initial) (by default half-way) *and* stays at or
  above that mark at every later measurement, so one lucky evaluation does not count.

Returns None when there is no jump. The step found is a measurement step, so its
precision is the measuring interval (``eval.every_n_steps``).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sudden_convergence_step(steps: Sequence[int], values: Sequence[float], min_gain: float = 0.15,
                            fraction: float = 0.5, final_points: int = 2) -> int | None:
    if len(steps) != len(values):
        raise ValueError(f"steps and values differ in length ({len(steps)} vs {len(values)})")
    if len(values) < final_points + 1:
        return None
    values = np.asarray(values, dtype=float)
    initial, final = values[0], values[-final_points:].mean()
    if final - initial < min_gain:
        return None
    mark = initial + fraction * (final - initial)
    above = values >= mark
    # The first index from which every later measurement stays above the mark.
    stays_above = np.flip(np.logical_and.accumulate(np.flip(above)))
    return int(steps[int(np.argmax(stays_above))]) if stays_above.any() else None
