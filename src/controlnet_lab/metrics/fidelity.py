"""Condition fidelity by re-detection (as ControlNet++ measures controllability).

The detector that made the condition runs again on each generated image and its output
is compared with the input condition:

- edge conditions (outline, sketch, canny, lineart_standard, and the weight-loading
  edge detectors): F1 of edge pixels. The generated image's edges come from the
  condition's own detector (controlnet-aux ``CannyDetector`` for outline and sketch,
  which are drawn, not detected). Both maps are binarised at ``EDGE_THRESHOLD``; a
  predicted edge pixel counts as right if a condition edge pixel lies within
  ``tolerance`` pixels (Chebyshev distance), and a condition edge pixel as found if a
  predicted one does: precision and recall with that slack, then F1 (``tolerance=0``
  is ControlNet++'s exact pixel F1).
- ``seg``: mIoU over the two classes (circle, background) of the generated image
  segmented by the oracle segmenter (2-means, metrics/oracle.py) against the input map.
"""
from __future__ import annotations

import cv2
import numpy as np

from controlnet_lab.data.conditions import SEG_COLORS, condition_maker, detector_device_for
from controlnet_lab.metrics.oracle import mask_iou, segment_circle

EDGE_THRESHOLD = 32  # of 255: a pixel of an edge map is an edge above this
EDGE_CONDITIONS = {"outline": "canny", "sketch": "canny", "canny": "canny", "lineart_standard": "lineart_standard",
                   "hed": "hed", "pidi": "pidi", "lineart": "lineart", "mlsd": "mlsd"}
FIDELITY_CONDITIONS = (*EDGE_CONDITIONS, "seg")  # the condition types with a re-detection fidelity


def edges_of(image: np.ndarray) -> np.ndarray:
    return image.max(axis=-1) > EDGE_THRESHOLD


def edge_f1(predicted: np.ndarray, reference: np.ndarray, tolerance: int = 1) -> float:
    """F1 of two boolean edge maps, each pixel matched within ``tolerance`` pixels of the other map."""
    if not predicted.any() and not reference.any():
        return 1.0
    if not predicted.any() or not reference.any():
        return 0.0
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    near_reference = cv2.dilate(reference.astype(np.uint8), kernel) > 0
    near_predicted = cv2.dilate(predicted.astype(np.uint8), kernel) > 0
    precision = (predicted & near_reference).sum() / predicted.sum()
    recall = (reference & near_predicted).sum() / reference.sum()
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def seg_miou(image: np.ndarray, seg: np.ndarray) -> float:
    """Two-class mIoU of the image's oracle segmentation against a seg condition map."""
    circle, _, _ = segment_circle(image)
    reference = np.all(seg == SEG_COLORS["circle"], axis=-1)
    return (mask_iou(circle, reference) + mask_iou(~circle, ~reference)) / 2


class ConditionFidelity:
    """Scores generated images against their input conditions for one condition type."""

    def __init__(self, condition: str, resolution: int, tolerance: int = 1, detector_weights: str | None = None,
                 canny_thresholds: tuple[int, int] = (100, 200), detector_device: str = "cpu"):
        if condition == "seg":
            self.metric, self.detector_name = "seg_miou", "oracle 2-means segmenter"
        elif condition in EDGE_CONDITIONS:
            self.metric, self.detector_name = "edge_f1", EDGE_CONDITIONS[condition]
            self.detect = condition_maker(self.detector_name, resolution, detector_weights, canny_thresholds,
                                          detector_device_for(self.detector_name, detector_device))
        else:
            raise ValueError(f"data.condition={condition}: no re-detection fidelity for this condition type "
                             f"(edge F1 covers {', '.join(EDGE_CONDITIONS)}; seg has mIoU)")
        self.condition, self.tolerance = condition, tolerance

    def score(self, images: np.ndarray, conditions: np.ndarray) -> dict:
        """images, conditions: (N, H, W, 3) uint8. Mean score, per-image scores and what was used."""
        if self.metric == "seg_miou":
            scores = [seg_miou(image, seg) for image, seg in zip(images, conditions, strict=True)]
        else:
            scores = [edge_f1(edges_of(self.detect(image, image, "")), edges_of(condition), self.tolerance)
                      for image, condition in zip(images, conditions, strict=True)]
        return {**self.describe(len(scores)), "value": float(np.mean(scores)), "per_image": scores}

    def describe(self, images: int) -> dict:
        """What a score of ``images`` images was measured with."""
        return {"metric": self.metric, "detector": self.detector_name, "images": images,
                "tolerance_px": self.tolerance if self.metric == "edge_f1" else None}
