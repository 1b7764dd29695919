"""Detector conditions made once: a controlnet-aux detector's map of each image, computed on the first pass and kept.

The maps live in ``<cache>/conditions/<key>/<image>.png``: ``key`` hashes the detector's
settings (detector_settings: name, class, weights, resolution, thresholds) and
``<image>`` is the target's content key (samples.py), so a map is computed once per
image, detector and resolution, whatever dataset, split or run asks for it. Each map is
written to a temporary name and renamed, so an interrupted pass leaves only whole maps;
one that no longer decodes is made again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from controlnet_lab.data.conditions import ConditionMaker
from controlnet_lab.data.samples import Samples


log = logging.getLogger(__name__)

class CachedConditions:
    """The maps of some rows of ``samples``, read from their files."""

    def __init__(self, folder: Path, samples: Samples):
        self.folder, self.samples = folder, samples

    def path(self, row: int) -> Path:
        return self.folder / f"{self.samples.targets.keys[row]}.png"

    def read(self, row: int) -> np.ndarray:
        return np.ascontiguousarray(cv2.imread(str(self.path(row)), cv2.IMREAD_COLOR)[..., ::-1])


def cached_conditions(samples: Samples, rows, detect: ConditionMaker, settings: dict, cache_dir: Path) -> CachedConditions:
    """The detector's maps of ``rows``, computing (with a progress bar) only those not cached yet."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache = CachedConditions(Path(cache_dir) / "conditions" / f"{settings['detector']}-{key}", samples)
    cache.folder.mkdir(parents=True, exist_ok=True)
    (cache.folder / "settings.json").write_text(json.dumps(settings, indent=2))
    missing = sorted({int(row) for row in rows if not readable(cache.path(int(row)))})
    for row in tqdm(missing, desc=f"making {settings['detector']} conditions (once; cached)", unit="img", disable=not missing):
        target = samples.target(row, settings["resolution"])
        condition = detect(target, target, "")
        partial = cache.folder / f".{samples.targets.keys[row]}.{os.getpid()}.png"
        cv2.imwrite(str(partial), np.ascontiguousarray(condition[..., ::-1]))
        os.replace(partial, cache.path(row))
    return cache


def readable(path: Path) -> bool:
    """Whether a cached map exists and decodes; one that does not (cut short, damaged) is reported and made again."""
    if not path.is_file():
        return False
    if cv2.imread(str(path), cv2.IMREAD_COLOR) is None:
        log.warning(f"the cached condition map {path} is unreadable: making it again")
        return False
    return True
