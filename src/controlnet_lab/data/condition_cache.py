"""Detector conditions made once: a controlnet-aux detector's map of each image, computed on the first pass and kept.

The maps live in ``<cache>/conditions/<key>/<image>.png``: ``key`` hashes the detector's
settings (detector_settings: name, class, weights, resolution, thresholds) and
``<image>`` is the target's content key (samples.py), so a map is computed once per
image, detector and resolution, whatever dataset, split or run asks for it. Each map is
written to a temporary name and renamed, so an interrupted pass leaves only whole maps;
one that no longer decodes is made again. DataLoader workers read the targets; a
detector on the CPU runs in them too, one on a GPU in the main process that feeds it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from controlnet_lab.data.conditions import ConditionMaker
from controlnet_lab.data.samples import Samples


log = logging.getLogger(__name__)
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk: length, type, CRC

class CachedConditions:
    """The maps of some rows of ``samples``, read from their files."""

    def __init__(self, folder: Path, samples: Samples):
        self.folder, self.samples = folder, samples

    def path(self, row: int) -> Path:
        return self.folder / f"{self.samples.targets.keys[row]}.png"

    def write(self, row: int, condition: np.ndarray) -> None:
        partial = self.folder / f".{self.samples.targets.keys[row]}.{os.getpid()}.png"
        cv2.imwrite(str(partial), np.ascontiguousarray(condition[..., ::-1]))
        os.replace(partial, self.path(row))

    def read(self, row: int) -> np.ndarray:
        image = cv2.imread(str(self.path(row)), cv2.IMREAD_COLOR)
        if image is None:
            raise OSError(f"the cached condition map {self.path(row)} does not decode: delete it and it is made again")
        return np.ascontiguousarray(image[..., ::-1])


class MapMaker(Dataset):
    """One row per item, so that DataLoader workers work in parallel: its target read and, with ``detect``, its map
    made and written (the item is the row); without, the target is the item, for a detector on a GPU."""

    def __init__(self, cache: CachedConditions, rows: list[int], detect: ConditionMaker | None, resolution: int):
        self.cache, self.rows, self.detect, self.resolution = cache, rows, detect, resolution

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> int | tuple[int, np.ndarray]:
        row = self.rows[index]
        target = self.cache.samples.target(row, self.resolution)
        if self.detect is None:
            return row, target
        self.cache.write(row, self.detect(target, target, ""))
        return row


def as_read(item):
    """The DataLoader's item as the dataset gives it (its default would make the target a tensor)."""
    return item


def cached_conditions(samples: Samples, rows, detect: ConditionMaker, settings: dict, cache_dir: Path,
                      num_proc: int = 1, in_workers: bool = True) -> CachedConditions:
    """The detector's maps of ``rows``, computing (with a progress bar, ``num_proc`` DataLoader workers reading the
    targets) only those not cached yet; the detector runs in the workers, or (``in_workers=False``: a GPU's) here."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache = CachedConditions(Path(cache_dir) / "conditions" / f"{settings['detector']}-{key}", samples)
    cache.folder.mkdir(parents=True, exist_ok=True)
    (cache.folder / "settings.json").write_text(json.dumps(settings, indent=2))
    missing = sorted({int(row) for row in rows if not readable(cache.path(int(row)))})
    if missing:
        workers = num_proc if len(missing) >= 64 and num_proc > 1 else 0
        # Its own generator: making the maps draws nothing from the run's random state.
        loader = DataLoader(MapMaker(cache, missing, detect if in_workers else None, settings["resolution"]), batch_size=None,
                            num_workers=workers, collate_fn=as_read, generator=torch.Generator())
        for item in tqdm(loader, desc=f"making {settings['detector']} conditions (once; cached)", unit="img", total=len(missing)):
            if not in_workers:
                row, target = item
                cache.write(row, detect(target, target, ""))
    return cache


def readable(path: Path) -> bool:
    """Whether a cached map exists and is whole: a PNG ends with its IEND chunk, so reading the last 12 bytes (not
    decoding the map, which every start would pay for every image) tells one cut short; such a map is reported and
    made again. Maps are written whole and renamed, so one damaged otherwise is a disk fault, found when it is read."""
    try:
        with open(path, "rb") as handle:
            handle.seek(-12, os.SEEK_END)
            whole = handle.read(12) == PNG_END
    except FileNotFoundError:
        return False
    except OSError:  # shorter than 12 bytes
        whole = False
    if not whole:
        log.warning(f"the cached condition map {path} is unreadable: making it again")
    return whole
