"""The circle a fill50k outline describes: what the seg and sketch conditions are drawn from and the oracle scores against."""
from __future__ import annotations

import cv2
import numpy as np


def condition_mask(outline: np.ndarray, threshold: int = 32, half_ink: int = 128) -> np.ndarray:
    """Boolean (H, W) mask of the circle enclosed by an outline image (H, W, 3) uint8.

    Pixels inked above ``threshold`` are the outline; the circle is everything the
    image border cannot reach by flood fill through the rest. An anti-aliased (or
    downscaled) outline inks the pixels on its outer edge in proportion to how much of
    them it covers, so such an edge pixel (one touching the outside) belongs to the
    circle only when it is at least half inked (``half_ink``). On the synthetic data
    this mask matches the target's filled circle to a mean IoU above 0.99 (tests/test_held_out.py).
    """
    ink = outline.max(axis=-1)
    lines = ink > threshold
    flooded = lines.astype(np.uint8)
    height, width = lines.shape
    fill_mask = np.zeros((height + 2, width + 2), np.uint8)
    for y, x in [(y, x) for y in range(height) for x in (0, width - 1)] + [(y, x) for x in range(width) for y in (0, height - 1)]:
        if flooded[y, x] == 0:
            cv2.floodFill(flooded, fill_mask, (x, y), 2)
    outside = flooded == 2
    touches_outside = cv2.dilate(outside.astype(np.uint8), np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], np.uint8)) > 0
    faint_outer_edge = lines & touches_outside & (ink < half_ink)
    return ~outside & ~faint_outer_edge
