import numpy as np

from conftest import PALETTE
from controlnet_lab.data.fill50k import read_index
from controlnet_lab.data.samples import load_rgb
from controlnet_lab.data.outlines import condition_mask
from controlnet_lab.metrics.oracle import centre_error, mask_iou, random_placement_iou, score_images


def _load(tiny_data):
    records = read_index(tiny_data)
    conditions = np.stack([load_rgb(r.source, 16) for r in records])
    targets = np.stack([load_rgb(r.target, 16) for r in records])
    return conditions, targets, [r.prompt for r in records]


def test_ground_truth_targets_score_perfectly(tiny_data):
    conditions, targets, prompts = _load(tiny_data)
    scores = score_images(targets, conditions, prompts, list(PALETTE))
    assert scores["mask_iou"] > 0.95 and scores["centre_error_px"] < 0.5
    assert scores["color_accuracy"] == 1.0


def test_the_centre_error_is_the_offset_of_the_circle_and_ignores_blotches():
    yy, xx = np.mgrid[:32, :32]
    reference = (yy - 14) ** 2 + (xx - 12) ** 2 <= 36
    shifted = (yy - 17) ** 2 + (xx - 16) ** 2 <= 36  # 3 down, 4 right: 5 px away
    assert centre_error(reference, reference) == 0.0
    assert abs(centre_error(shifted, reference) - 5.0) < 1e-6
    blotched = shifted.copy()
    blotched[0:3, 28:31] = True  # a stray patch of the circle's color in a corner: the IoU drops, the centre does not move
    assert centre_error(blotched, reference) == centre_error(shifted, reference) and mask_iou(blotched, reference) < mask_iou(shifted, reference)
    assert centre_error(np.zeros_like(reference), reference) == np.hypot(32, 32) / 2


def test_wrong_placement_and_wrong_colors_score_low(tiny_data):
    conditions, targets, prompts = _load(tiny_data)
    shifted = np.roll(targets, 1, axis=0)  # each image now belongs to another condition and prompt
    scores = score_images(shifted, conditions, prompts, list(PALETTE))
    assert scores["mask_iou"] < 0.5
    assert scores["color_accuracy"] < 0.5
    assert abs(scores["mask_iou"] - random_placement_iou(conditions)) < 0.05


def test_swapped_circle_and_background_colors_are_wrong(tiny_data):
    conditions, targets, prompts = _load(tiny_data)
    image, condition = targets[0].copy(), conditions[0]
    inside = condition_mask(condition)
    swapped = image.copy()
    swapped[inside], swapped[~inside] = image[~inside][0], image[inside][0]
    assert score_images(swapped[None], condition[None], prompts[:1], list(PALETTE))["color_accuracy"] == 0.0


def test_blank_image_has_no_circle(tiny_data):
    conditions, _, prompts = _load(tiny_data)
    blank = np.full((1, 16, 16, 3), 128, np.uint8)
    scores = score_images(blank, conditions[:1], prompts[:1], list(PALETTE))
    assert scores["mask_iou"] == 0.0 and scores["color_accuracy"] == 0.0


def test_mask_iou_basics():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, b) == 4 / 12
