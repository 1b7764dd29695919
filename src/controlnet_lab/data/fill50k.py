"""Reader for any fill50k-format folder (the real fill50k, or the synthetic one).

Conventions of the reference tutorial code: source scaled to [0, 1], target to
[-1, 1], RGB channel order. Images are resized to the configured resolution, as
diffusers' train_controlnet.py does. Every record is checked before training starts,
so a broken dataset fails at once with the file and line that are wrong.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from controlnet_lab.data.conditions import ConditionMaker, outline


class DatasetFormatError(ValueError):
    """A fill50k-format folder that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    source: Path
    target: Path
    prompt: str


def read_index(root: Path) -> list[Record]:
    """Parse and check ``root/prompt.json`` and every image it names (headers only)."""
    root = Path(root)
    index = root / "prompt.json"
    if not index.is_file():
        raise DatasetFormatError(f"{index}: missing; a fill50k-format folder needs prompt.json (one JSON object per line)")
    records = []
    with open(index) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{index}, line {number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetFormatError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(item, dict):
                raise DatasetFormatError(f"{where}: expected a JSON object with keys source, target, prompt")
            missing = [key for key in ("source", "target", "prompt") if key not in item]
            if missing:
                raise DatasetFormatError(f"{where}: lacks key(s) {', '.join(missing)}")
            record = Record(root / item["source"], root / item["target"], str(item["prompt"]))
            source_size = _image_size(record.source, where)
            target_size = _image_size(record.target, where)
            if source_size != target_size:
                raise DatasetFormatError(
                    f"{where}: source {record.source} is {source_size[0]}x{source_size[1]} "
                    f"but target {record.target} is {target_size[0]}x{target_size[1]}"
                )
            records.append(record)
    if not records:
        raise DatasetFormatError(f"{index}: holds no records")
    return records


def _image_size(path: Path, where: str) -> tuple[int, int]:
    if not path.is_file():
        raise DatasetFormatError(f"{where}: image {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetFormatError(f"{where}: image {path} is unreadable ({err})") from None


def load_rgb(path: Path, resolution: int) -> np.ndarray:
    """An RGB uint8 image resized to resolution x resolution (cv2 reads BGR)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetFormatError(f"image {path} is unreadable")
    if image.shape[:2] != (resolution, resolution):
        # INTER_AREA for shrinking keeps thin outlines visible; nearest keeps flat colors flat.
        interpolation = cv2.INTER_AREA if image.shape[0] > resolution else cv2.INTER_NEAREST
        image = cv2.resize(image, (resolution, resolution), interpolation=interpolation)
    return np.ascontiguousarray(image[..., ::-1])


class Fill50kDataset(Dataset):
    """(condition, source, target, prompt) samples; the prompt is replaced by "" with probability ``prompt_dropout``.

    ``condition`` is what the ControlNet sees, made from the sample by ``make_condition``
    (the stored source by default); ``source`` stays the stored outline, which the
    oracle scores measure against. The dropout is re-drawn each time a sample is
    served, from Python's ``random``, which Lightning's
    ``seed_everything(workers=True)`` seeds in every worker.
    """

    def __init__(self, records: list[Record], resolution: int, prompt_dropout: float = 0.0,
                 make_condition: ConditionMaker = outline):
        self.records = records
        self.resolution = resolution
        self.prompt_dropout = prompt_dropout
        self.make_condition = make_condition

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        source = load_rgb(record.source, self.resolution)
        target = load_rgb(record.target, self.resolution)
        condition = self.make_condition(source, target, f"{record.source.parent.name}/{record.source.name}")
        prompt = "" if random.random() < self.prompt_dropout else record.prompt
        return {
            "condition": _chw(condition.astype(np.float32) / 255.0),
            "source": _chw(source.astype(np.float32) / 255.0),
            "target": _chw(target.astype(np.float32) / 127.5 - 1.0),
            "prompt": prompt,
            "true_prompt": record.prompt,
            "index": index,
        }


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
