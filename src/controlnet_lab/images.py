"""Tensor <-> uint8 image conversions and grids written as PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor, low: float, high: float) -> np.ndarray:
    """(N, C, H, W) tensor with values in [low, high] -> (N, H, W, C) uint8."""
    scaled = (images.detach().float().cpu().clamp(low, high) - low) / (high - low) * 255.0
    return scaled.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(rows: list[np.ndarray], path: Path, upscale: int = 4) -> Path:
    """Write rows of (N, H, W, 3) uint8 images as one PNG; returns the path."""
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    image = Image.fromarray(grid)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
