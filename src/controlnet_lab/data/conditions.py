"""The condition image a ControlNet sees (``data.condition``).

- ``stored``: the dataset's own condition image (``conditioning_image``); ``outline`` is
  its name on fill50k-format data, whose stored condition is the circle outline.
- ``seg``: a segmentation map, one flat color per class (circle, background); the
  circle is the region the outline encloses (the oracle segmenter of the synthetic data).
- ``sketch``: a hand-drawn-looking outline of the same circle: wobbly radius, uneven
  pen pressure and width, and one or two gaps; fixed per sample (seeded by the file name).
- any controlnet-aux detector by name (``canny``, ``lineart_standard``, ``hed``, ...),
  run on the target image, on any dataset. Detectors that need weights load them from
  ``data.detector_weights`` (a local folder holding lllyasviel/Annotators files) and run
  where ``data.detector_device`` says (a GPU when ``auto`` finds one); the OpenCV ones
  (canny, lineart_standard) run on the CPU. The data module runs them once per image
  and caches the maps (condition_cache.py).

Every maker maps (stored condition, target, record name) as RGB uint8 (H, W, 3) arrays
to an RGB uint8 condition of the same size. ``seg`` and ``sketch`` are drawn from the
circle a fill50k outline encloses, so they need fill50k-format data.
"""
from __future__ import annotations

import importlib
import re
import zlib
from typing import Callable

import cv2
import numpy as np
import torch

from controlnet_lab.data.outlines import condition_mask

ConditionMaker = Callable[[np.ndarray, np.ndarray, str], np.ndarray]

SEG_COLORS = {"background": (0, 0, 0), "circle": (255, 255, 255)}

# name -> (controlnet_aux class, needs weights). Those without weights run offline.
DETECTORS = {
    "canny": ("CannyDetector", False),
    "lineart_standard": ("LineartStandardDetector", False),
    "hed": ("HEDdetector", True),
    "pidi": ("PidiNetDetector", True),
    "lineart": ("LineartDetector", True),
    "mlsd": ("MLSDdetector", True),
    "midas": ("MidasDetector", True),
    "normalbae": ("NormalBaeDetector", True),
    "openpose": ("OpenposeDetector", True),
}
STORED = ("stored", "outline")
SYNTHETIC = ("outline", "seg", "sketch")  # need the fill50k outline as the stored condition
CONDITIONS = ("stored", *SYNTHETIC, *DETECTORS)


def outline(source: np.ndarray, target: np.ndarray, name: str) -> np.ndarray:
    """The stored condition as it is."""
    return source


def segmentation(source: np.ndarray, target: np.ndarray, name: str) -> np.ndarray:
    mask = condition_mask(source)
    seg = np.empty_like(source)
    seg[:] = SEG_COLORS["background"]
    seg[mask] = SEG_COLORS["circle"]
    return seg


def sketch(source: np.ndarray, target: np.ndarray, name: str, supersample: int = 4) -> np.ndarray:
    """A jittered, uneven, sometimes broken outline of the circle the source encloses."""
    mask = condition_mask(source)
    size = source.shape[0]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    ys, xs = np.nonzero(mask)
    center = np.array([xs.mean(), ys.mean()]) + 0.5
    radius = np.sqrt(mask.sum() / np.pi)

    points = 96
    angles = np.linspace(0.0, 2 * np.pi, points, endpoint=False) + rng.uniform(0, 2 * np.pi)
    wobble = sum(rng.normal(0, 0.05) * np.sin(k * angles + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    radii = radius * (1.0 + wobble + rng.normal(0, 0.015, points))
    # The stroke overshoots its start a little, as a pen closing a circle does.
    overshoot = int(rng.integers(0, points // 12 + 1))
    order = np.arange(points + overshoot) % points
    xy = np.stack([center[0] + radii[order] * np.cos(angles[order]), center[1] + radii[order] * np.sin(angles[order])], axis=1)

    gaps = np.zeros(len(order), bool)
    for _ in range(int(rng.integers(1, 3))):
        start = int(rng.integers(0, len(order)))
        gaps[start : start + int(rng.integers(3, 9))] = True

    canvas = np.zeros((size * supersample, size * supersample), np.uint8)
    scaled = np.round(xy * supersample * 16).astype(np.int32)  # 4 fractional bits for cv2's shift
    for i in range(len(order) - 1):
        if gaps[i]:
            continue
        pressure = int(rng.integers(150, 256))
        width = int(rng.integers(supersample // 2, supersample + 2))
        cv2.line(canvas, tuple(scaled[i]), tuple(scaled[i + 1]), pressure, width, cv2.LINE_AA, shift=4)
    small = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    return np.repeat(small[..., None], 3, axis=2)


def detector_device_for(name: str, setting: str = "auto") -> str:
    """Where detector ``name`` runs (``data.detector_device``): a controlnet-aux network (a detector with weights) on
    the GPU when ``auto`` finds one, or on the device named; the OpenCV detectors and the other conditions on the CPU."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(setting)):
        raise ValueError(f"data.detector_device={setting!r}: choose auto, cpu, cuda or cuda:<index>")
    if name not in DETECTORS or not DETECTORS[name][1]:
        return "cpu"
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"data.detector_device={setting}: this machine has no CUDA device; set it to auto or cpu")
    return setting


def detector_maker(name: str, resolution: int, weights: str | None, canny_thresholds: tuple[int, int],
                   device: str = "cpu") -> ConditionMaker:
    """A controlnet-aux detector run on the target.

    controlnet-aux resizes to multiples of 64 px, so the detector runs at the nearest
    such size (at least 64) and its map is resized to ``data.resolution``.
    """
    class_name, needs_weights = DETECTORS[name]
    detector_class = getattr(importlib.import_module("controlnet_aux"), class_name)
    if needs_weights:
        if weights is None:
            raise ValueError(
                f"data.condition={name} runs controlnet-aux's {class_name}, which needs weights: set data.detector_weights "
                "to a local folder holding the lllyasviel/Annotators files (or a Hub id where the network allows)"
            )
        detector = detector_class.from_pretrained(weights).to(device)
    else:
        detector = detector_class()
    detect_resolution = max(64, int(round(resolution / 64)) * 64)
    options = {"low_threshold": canny_thresholds[0], "high_threshold": canny_thresholds[1]} if name == "canny" else {}

    def detect(source: np.ndarray, target: np.ndarray, record_name: str) -> np.ndarray:
        detected = np.asarray(detector(target, detect_resolution=detect_resolution, image_resolution=detect_resolution,
                                       output_type="np", **options))
        if detected.ndim == 2:
            detected = np.repeat(detected[..., None], 3, axis=2)
        height, width = target.shape[:2]
        return cv2.resize(detected, (width, height), interpolation=cv2.INTER_AREA)

    return detect


def detector_settings(name: str, resolution: int, weights: str | None, canny_thresholds: tuple[int, int], device: str = "cpu") -> dict:
    """Everything that determines a detector's maps at this resolution: what their cache is keyed by. A network run on
    a GPU computes in other float kernels than on the CPU, so its maps are kept apart (``device``, only then)."""
    on_gpu = {"device": "cuda"} if device.startswith("cuda") else {}
    return {"detector": name, "class": DETECTORS[name][0], "weights": weights, "resolution": resolution,
            "canny_thresholds": list(canny_thresholds) if name == "canny" else None, **on_gpu}


def condition_maker(name: str, resolution: int, weights: str | None = None, canny_thresholds: tuple[int, int] = (100, 200),
                    device: str = "cpu") -> ConditionMaker:
    """The maker for ``data.condition=name`` (a detector on ``device``, detector_device_for's answer); an unknown name is an
    error that lists the known ones."""
    if name not in CONDITIONS:
        raise ValueError(f"data.condition={name!r} is unknown; choose one of {', '.join(CONDITIONS)}")
    if name in STORED + SYNTHETIC:
        return {"stored": outline, "outline": outline, "seg": segmentation, "sketch": sketch}[name]
    return detector_maker(name, resolution, weights, canny_thresholds, device)
