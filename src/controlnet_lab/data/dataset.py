"""The samples a ControlNet trains and is evaluated on: (condition, target, prompt) of some rows of a dataset.

Conventions of the reference tutorial code: condition and stored condition (``source``)
scaled to [0, 1], target to [-1, 1], RGB channel order, images fitted to the
resolution by samples.py's geometry rule.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from controlnet_lab.data.condition_cache import CachedConditions
from controlnet_lab.data.conditions import ConditionMaker, outline
from controlnet_lab.data.samples import Samples, crop_geometry


class ControlDataset(Dataset):
    """Items ``condition``, ``target``, ``prompt``, ``true_prompt``, ``index``, ``geometry`` (the target's original
    size and crop, ``crop_geometry``: SDXL's size conditioning) and, where the dataset stores conditions, ``source``
    (the stored one, which the fill50k oracle scores measure against).

    ``condition`` is what the ControlNet sees: a detector's cached map (``detected``), or
    ``make_condition`` of the stored condition (the stored one itself by default); with
    ``with_condition=False`` items carry none (pretraining a base needs none); with
    ``with_target=False`` they carry no ``target`` and its pixels are never decoded (training on
    cached VAE latents needs none: the fill50k loader then takes 5.1 ms a batch of 32 instead of 7.3). An item is
    asked for by (index, drop the prompt), as the training order draws them (order.py), or
    by index alone: the prompt is then replaced by "" with probability ``prompt_dropout``,
    drawn from Python's ``random``, which Lightning's ``seed_everything(workers=True)`` seeds
    in every worker.
    """

    def __init__(self, samples: Samples, rows, resolution: int, prompt_dropout: float = 0.0,
                 make_condition: ConditionMaker = outline, detected: CachedConditions | None = None, with_condition: bool = True,
                 with_target: bool = True):
        self.samples = samples
        self.rows = np.asarray(rows, dtype=np.int64)
        self.resolution = resolution
        self.prompt_dropout = prompt_dropout
        self.make_condition = make_condition
        self.detected = detected
        self.with_condition = with_condition
        self.with_target = with_target

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def prompts(self) -> list[str]:
        return [self.samples.prompts[row] for row in self.rows]

    def fingerprint(self) -> str:
        return self.samples.fingerprint(self.rows)

    def target(self, index: int) -> np.ndarray:
        return self.samples.target(int(self.rows[index]), self.resolution)

    def __getitem__(self, key: int | tuple[int, bool]) -> dict:
        index, dropped = key if isinstance(key, tuple) else (key, self.prompt_dropout > 0 and random.random() < self.prompt_dropout)
        row = int(self.rows[index])
        item = {}
        if self.samples.has_conditions:
            if self.with_target:
                target, source = self.samples.pair(row, self.resolution)
            else:
                target, source = None, self.samples.condition(row, self.resolution)
            item["source"] = chw(source.astype(np.float32) / 255.0)
        else:
            target, source = self.samples.target(row, self.resolution) if self.with_target else None, None
        if self.with_condition:
            condition = self.detected.read(row) if self.detected is not None else self.make_condition(source, target, self.name(row))
            item["condition"] = chw(condition.astype(np.float32) / 255.0)
        true_prompt = self.samples.prompts[row]
        if target is not None:
            item["target"] = chw(target.astype(np.float32) / 127.5 - 1.0)
        item.update({"prompt": "" if dropped else true_prompt, "true_prompt": true_prompt, "index": index,
                     "geometry": crop_geometry(*self.samples.targets.size(row), self.resolution)})
        return item

    def name(self, row: int) -> str:
        """A stable name of the row's stored condition (``source/3.png`` for fill50k files): what seeds a drawn sketch."""
        path = self.samples.conditions.paths[row] if self.samples.has_conditions else None
        return f"{Path(path).parent.name}/{Path(path).name}" if path else self.samples.key(row)


def chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
