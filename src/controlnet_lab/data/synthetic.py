"""A generator of fill50k-format data: circle outlines (source) and filled circles (target).

It writes exactly what the real fill50k holds (``prompt.json`` with one JSON object a
line, ``source/N.png``, ``target/N.png``), so the same reader serves both.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from controlnet_lab.data.colors import make_prompt, rgb_of
from controlnet_lab.files import publish


@dataclass(frozen=True)
class SyntheticFill50kSpec:
    """Everything that determines the generated files; its fields key the cache."""

    count: int
    resolution: int
    palette: tuple[str, ...]
    radius_range: tuple[float, float]  # as fractions of the resolution, drawn uniformly as real numbers
    outline_thickness: int
    seed: int

    def validate(self) -> None:
        if self.count < 1:
            raise ValueError(f"data.generator.count must be >= 1, got {self.count}")
        if self.resolution < 8:
            raise ValueError(f"data.generator.resolution must be >= 8, got {self.resolution}")
        if len(self.palette) < 2:
            raise ValueError("data.generator.palette needs at least two colors")
        for name in self.palette:
            try:
                rgb_of(name)
            except KeyError as err:
                raise ValueError(f"data.generator.palette: {err.args[0]}") from None
        low, high = self.radius_range
        if not 0 < low <= high < 0.5:
            raise ValueError(f"data.generator.radius_range must satisfy 0 < low <= high < 0.5, got {self.radius_range}")


SUPERSAMPLE = 8  # drawn at 8x the resolution, then area-averaged: sub-pixel geometry, anti-aliased edges
SHIFT = 8        # cv2's fixed-point fraction bits for centre and radius at the supersampled size (1/256 px)


def draw_sample(rng: np.random.Generator, spec: SyntheticFill50kSpec) -> tuple[np.ndarray, np.ndarray, str]:
    """One (source, target, prompt); images are RGB uint8, the circle lies wholly inside.

    Centre and radius are real numbers (in pixels of the final image), so two samples
    practically never share an outline. The outline is a ring ``outline_thickness`` px
    wide whose outer edge is the circle's edge, so the region it encloses (the oracle's
    ``condition_mask``) is the filled circle of the target.
    """
    size = spec.resolution
    radius = rng.uniform(*spec.radius_range) * size
    center = rng.uniform(radius + 1, size - radius - 1, size=2)
    circle_name, background_name = rng.choice(len(spec.palette), size=2, replace=False)
    circle_name, background_name = spec.palette[circle_name], spec.palette[background_name]

    ring = spec.outline_thickness * SUPERSAMPLE
    source = _supersampled(size, (0, 0, 0), lambda big: cv2.circle(
        big, _fixed(center * SUPERSAMPLE - 0.5), _fixed(radius * SUPERSAMPLE - ring / 2), (255, 255, 255), ring, cv2.LINE_8, SHIFT))
    target = _supersampled(size, rgb_of(background_name), lambda big: cv2.circle(
        big, _fixed(center * SUPERSAMPLE - 0.5), _fixed(radius * SUPERSAMPLE), rgb_of(circle_name), -1, cv2.LINE_8, SHIFT))
    return source, target, make_prompt(circle_name, background_name)


def _fixed(value) -> int | tuple[int, ...]:
    """A coordinate (or several) in cv2's fixed-point form with SHIFT fraction bits."""
    scaled = np.round(np.asarray(value, dtype=np.float64) * (1 << SHIFT)).astype(int)
    return tuple(int(v) for v in scaled) if scaled.ndim else int(scaled)


def _supersampled(size: int, fill: tuple[int, int, int], draw) -> np.ndarray:
    big = np.empty((size * SUPERSAMPLE, size * SUPERSAMPLE, 3), np.uint8)
    big[:] = fill
    draw(big)
    return cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA)


def write_fill50k(spec: SyntheticFill50kSpec, root: Path) -> Path:
    """Generate ``spec.count`` samples into ``root`` (atomically: a half-written folder never appears)."""
    spec.validate()
    root = Path(root)
    if (root / "prompt.json").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        (staging / "source").mkdir()
        (staging / "target").mkdir()
        rng = np.random.default_rng(spec.seed)
        with open(staging / "prompt.json", "w") as index:
            for i in tqdm(range(spec.count), desc="generating synthetic fill50k", unit="img"):
                source, target, prompt = draw_sample(rng, spec)
                # cv2 writes BGR; the files hold RGB images as fill50k's do.
                cv2.imwrite(str(staging / "source" / f"{i}.png"), source[..., ::-1])
                cv2.imwrite(str(staging / "target" / f"{i}.png"), target[..., ::-1])
                index.write(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": prompt}) + "\n")
        publish(staging, root, "prompt.json")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root
