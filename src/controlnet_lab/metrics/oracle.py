"""Exact scores that fill50k-style data makes possible: where the circle is, and which colors it has.

- ``condition_mask`` (data/outlines.py): the filled circle an outline condition describes.
- ``segment_circle``: the circle in a generated two-color image: 2-means on the pixel
  colors; the cluster holding most border pixels is the background.
- ``mask_iou``: IoU of the generated circle with the circle of the sample's outline.
- ``color_accuracy``: the fraction of images whose circle color and background color
  are each nearest, among the palette's colors, to the colors the prompt names.
- ``centre_error_px``: the distance in pixels from the centroid of the generated circle's
  largest connected piece to the centroid of the outline's circle. Unlike the IoU it does
  not count stray blotches of the circle's color elsewhere (what an unconditional
  background often has), only where the circle is. An image without any circle pixel
  counts as half the image's diagonal.
"""
from __future__ import annotations

import cv2
import numpy as np

from controlnet_lab.data.colors import palette_array, parse_prompt
from controlnet_lab.data.outlines import condition_mask


def _border(mask_shape: tuple[int, int]) -> np.ndarray:
    border = np.zeros(mask_shape, bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    return border


def segment_circle(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(circle mask, circle mean RGB, background mean RGB) of an RGB uint8 image."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    cv2.setRNGSeed(0)
    _, labels, centers = cv2.kmeans(pixels, 2, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    labels = labels.reshape(image.shape[:2])
    border = _border(labels.shape)
    background = int(np.argmax(np.bincount(labels[border], minlength=2)))
    circle = labels != background
    return circle, centers[1 - background], centers[background]


def mask_iou(predicted: np.ndarray, reference: np.ndarray) -> float:
    union = np.logical_or(predicted, reference).sum()
    return float(np.logical_and(predicted, reference).sum() / union) if union else 1.0


def centre_error(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Pixels from the centroid of ``predicted``'s largest 4-connected piece to ``reference``'s centroid."""
    if not predicted.any() or not reference.any():
        return float(np.hypot(*predicted.shape) / 2)
    _, _, stats, centroids = cv2.connectedComponentsWithStats(predicted.astype(np.uint8), connectivity=4)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    ys, xs = np.nonzero(reference)
    return float(np.hypot(centroids[largest][0] - xs.mean(), centroids[largest][1] - ys.mean()))


def nearest_color(rgb: np.ndarray, palette: list[str]) -> str:
    distances = np.linalg.norm(palette_array(palette) - rgb[None], axis=1)
    return palette[int(np.argmin(distances))]


def score_images(images: np.ndarray, outlines: np.ndarray, prompts: list[str], palette: list[str]) -> dict:
    """Per-image oracle scores and their means.

    images, outlines: (N, H, W, 3) uint8 RGB (outlines: the samples' fill50k sources);
    prompts: the prompts whose named colors are checked.
    """
    ious, colors_right, centres = [], [], []
    for image, outline, prompt in zip(images, outlines, prompts, strict=True):
        circle, circle_rgb, background_rgb = segment_circle(image)
        reference = condition_mask(outline)
        ious.append(mask_iou(circle, reference))
        centres.append(centre_error(circle, reference))
        named = parse_prompt(prompt)
        if named is None:
            raise ValueError(f"prompt {prompt!r} does not have the form '<color> circle with <color> background'")
        right = circle.any() and (nearest_color(circle_rgb, palette), nearest_color(background_rgb, palette)) == named
        colors_right.append(bool(right))
    return {
        "mask_iou": float(np.mean(ious)),
        "color_accuracy": float(np.mean(colors_right)),
        "centre_error_px": float(np.mean(centres)),
        "per_image_mask_iou": ious,
        "per_image_color_right": colors_right,
    }


def random_placement_iou(outlines: np.ndarray) -> float:
    """Mean IoU between each outline's circle and the next one's: a circle placed at random from the data."""
    masks = [condition_mask(c) for c in outlines]
    return float(np.mean([mask_iou(masks[i], masks[(i + 1) % len(masks)]) for i in range(len(masks))]))
