"""Color names as fill50k writes them, and the prompt format that carries them.

fill50k names CSS colors split into words ("burly wood", "pale golden rod"); the
CSS table (matplotlib's CSS4_COLORS) spells them joined ("burlywood"). Lookups
therefore ignore spaces.
"""
from __future__ import annotations

import re

import numpy as np
from matplotlib.colors import CSS4_COLORS, to_rgb

PROMPT_PATTERN = re.compile(r"^\s*(?P<circle>.+?)\s+circle with\s+(?P<background>.+?)\s+background\s*$")


def rgb_of(name: str) -> tuple[int, int, int]:
    """RGB (0-255) of a CSS color name, written with or without spaces."""
    key = name.replace(" ", "").lower()
    if key not in CSS4_COLORS:
        raise KeyError(f"'{name}' is not a CSS color name (see matplotlib.colors.CSS4_COLORS)")
    return tuple(int(round(255 * c)) for c in to_rgb(CSS4_COLORS[key]))


def make_prompt(circle: str, background: str) -> str:
    return f"{circle} circle with {background} background"


def parse_prompt(prompt: str) -> tuple[str, str] | None:
    """(circle color, background color) named by a fill50k prompt, or None if it names none."""
    match = PROMPT_PATTERN.match(prompt)
    if match is None:
        return None
    return match["circle"], match["background"]


def palette_array(names: list[str]) -> np.ndarray:
    """(len(names), 3) float array of the palette's RGB values."""
    return np.array([rgb_of(n) for n in names], dtype=np.float32)
