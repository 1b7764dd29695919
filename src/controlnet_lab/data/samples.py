"""A dataset's rows as the harness reads them: target image, stored condition image (when there is one), caption.

Every source (a fill50k-format folder, an image folder, a Hugging Face dataset) becomes
a ``datasets.Dataset`` with the canonical columns ``image``, ``conditioning_image``
(when stored) and ``text``; ``Samples`` adds what training needs on top: the image
geometry rule and a content key per image (the sha256 of its encoded bytes), which key
the caches and make the held-out split content-disjoint.

Geometry: an image is resized so that its shorter side is ``resolution`` (area
averaging when shrinking, nearest neighbour when enlarging, so flat colors and thin
outlines stay as they are), then center-cropped to ``resolution`` x ``resolution``. A
condition whose size differs from its target's is first resized to the target's size,
so both get the same crop.

Images are decoded by ``datasets.Image(mode="RGB")`` from the file, or from the stored
bytes where the dataset keeps them (``save_to_disk``); the files' paths are read once,
so serving a sample does not go through the Arrow table.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import datasets
import numpy as np
import PIL.Image
from PIL import UnidentifiedImageError
from tqdm import tqdm

IMAGE, CONDITION, TEXT = "image", "conditioning_image", "text"


class DatasetFormatError(ValueError):
    """A dataset that cannot be read; the message names the file and line, or the config key."""


def json_lines(path: Path, expected: str):
    """(where, object) for each non-empty line of a JSON-lines file, ``where`` naming the file and line; a line that
    is not a JSON object is an error naming it (``expected`` says which keys an object should have)."""
    with open(path) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetFormatError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(item, dict):
                raise DatasetFormatError(f"{where}: expected a JSON object with keys {expected}")
            yield where, item


def fit_square(image: np.ndarray, resolution: int) -> np.ndarray:
    """The geometry rule of the module docstring: shorter side to ``resolution``, then a center crop."""
    height, width = image.shape[:2]
    if (height, width) != (resolution, resolution):
        scale = resolution / min(height, width)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
        image = cv2.resize(image, size, interpolation=interpolation)
        top, left = (image.shape[0] - resolution) // 2, (image.shape[1] - resolution) // 2
        image = image[top : top + resolution, left : left + resolution]
    return np.ascontiguousarray(image)


RGB = datasets.Image(mode="RGB")


def decode_rgb(encoded: bytes | None, path: str | None, where: str) -> np.ndarray:
    """An RGB uint8 (H, W, 3) image from its bytes, or from its file when no bytes are stored."""
    try:
        return np.asarray(RGB.decode_example({"path": path, "bytes": encoded}))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DatasetFormatError(f"{where}: image {path or '(stored bytes)'} is unreadable ({err})") from None


def load_rgb(path: Path | str, resolution: int) -> np.ndarray:
    """An image file as RGB uint8, fitted to ``resolution`` by the geometry rule."""
    return fit_square(decode_rgb(None, str(path), str(path)), resolution)


class ImageColumn:
    """One image column: file paths where the images are files, the stored bytes read on demand otherwise."""

    def __init__(self, table: datasets.Dataset, column: str):
        self.refs = table.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        self.column = column
        self.paths: list[str | None] = []
        self.keys: list[str] = []
        for batch in tqdm(self.refs.iter(batch_size=1024), total=-(-len(table) // 1024), desc=f"hashing {column}",
                          unit="batch", leave=False, disable=len(table) < 4096):
            for row in batch[column]:
                if row is None:
                    raise DatasetFormatError(f"column {column!r}, row {len(self.keys)}: no image")
                self.paths.append(row["path"] if row["bytes"] is None else None)
                self.keys.append(content_key(row["bytes"], row["path"], f"column {column!r}, row {len(self.keys)}"))

    def read(self, index: int) -> np.ndarray:
        path = self.paths[index]
        encoded = None if path else self.refs[index][self.column]["bytes"]
        return decode_rgb(encoded, path, f"column {self.column!r}, row {index}")

    def size(self, index: int) -> tuple[int, int]:
        """(height, width) from the image's header, without decoding its pixels."""
        path = self.paths[index]
        source = path or io.BytesIO(self.refs[index][self.column]["bytes"])
        try:
            with PIL.Image.open(source) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError) as err:
            raise DatasetFormatError(f"column {self.column!r}, row {index}: image {path or '(stored bytes)'} is unreadable ({err})") from None
        return height, width


def content_key(encoded: bytes | None, path: str | None, where: str) -> str:
    if encoded is None:
        if not path or not Path(path).is_file():
            raise DatasetFormatError(f"{where}: image {path} does not exist")
        encoded = Path(path).read_bytes()
    return hashlib.sha256(encoded).hexdigest()[:20]


@dataclass
class Samples:
    """Rows of one dataset split: ``table`` has the canonical columns; ``origin`` says where it was read from."""

    table: datasets.Dataset
    origin: str

    def __post_init__(self):
        self.targets = ImageColumn(self.table, IMAGE)
        self.conditions = ImageColumn(self.table, CONDITION) if CONDITION in self.table.column_names else None
        self.prompts: list[str] = list(self.table[TEXT])

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_conditions(self) -> bool:
        return self.conditions is not None

    def target(self, index: int, resolution: int) -> np.ndarray:
        return fit_square(self.targets.read(index), resolution)

    def pair(self, index: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
        """(target, stored condition), the condition given its target's geometry."""
        target = self.targets.read(index)
        return fit_square(target, resolution), self._fit_condition(index, target.shape[:2], resolution)

    def condition(self, index: int, resolution: int) -> np.ndarray:
        """The stored condition as ``pair`` gives it, with only its target's header read."""
        return self._fit_condition(index, self.targets.size(index), resolution)

    def _fit_condition(self, index: int, target_size: tuple[int, int], resolution: int) -> np.ndarray:
        condition = self.conditions.read(index)
        if condition.shape[:2] != tuple(target_size):
            condition = cv2.resize(condition, tuple(target_size)[::-1], interpolation=cv2.INTER_AREA)
        return fit_square(condition, resolution)

    def key(self, index: int) -> str:
        """The row's content: its target's and stored condition's bytes, and its caption."""
        condition = self.conditions.keys[index] if self.conditions else ""
        return hashlib.sha256(f"{self.targets.keys[index]}|{condition}|{self.prompts[index]}".encode()).hexdigest()[:20]

    def fingerprint(self, indices=None) -> str:
        """A hash of the rows (all, or ``indices`` in that order): what caches of these rows are keyed by."""
        rows = range(len(self)) if indices is None else indices
        return hashlib.sha256("\n".join(self.key(int(i)) for i in rows).encode()).hexdigest()[:16]
