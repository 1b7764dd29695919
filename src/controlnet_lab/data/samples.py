"""A dataset's rows as the harness reads them: target image, stored condition image (when there is one), caption.

Every source (a fill50k-format folder, an image folder, a Hugging Face dataset) becomes
a ``datasets.Dataset`` with the canonical columns ``image``, ``conditioning_image``
(when stored) and ``text``; ``Samples`` adds what training needs on top: the image
geometry rule and a content key per image (the sha256 of its encoded bytes), which key
the caches and make the held-out split content-disjoint.

Geometry: an image is resized so that its shorter side is ``resolution`` (area
averaging when shrinking; when enlarging, ``data.resize.image`` for targets, bilinear
by default as diffusers' script, and ``data.resize.condition`` for stored conditions:
bilinear, or nearest where a condition's values are labels or thin lines, as fill50k's
outlines), then center-cropped to ``resolution`` x ``resolution``. A condition whose
size differs from its target's is first resized to the target's size, so both get the
same crop. The rule is part of the rows' fingerprint: caches of resized images follow it.

Images are decoded by ``datasets.Image()`` from the file, or from the stored bytes where
the dataset keeps them (``save_to_disk``), and converted to RGB keeping what each PIL
mode's pixels mean (``to_rgb``); the files' paths are read once, so serving a sample
does not go through the Arrow table.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import datasets
import numpy as np
import torch
import PIL.Image
import pyarrow as pa
from PIL import UnidentifiedImageError
from tqdm import tqdm

from controlnet_lab.data.manifest import FileFacts, Manifest, UnreadableImage, content_key, stored_keys

IMAGE, CONDITION, TEXT = "image", "conditioning_image", "text"


class DatasetFormatError(ValueError):
    """A dataset that cannot be read; the message names the file and line, or the config key."""


def json_lines(path: Path, expected: str):
    """(where, object) for each non-empty line of a JSON-lines file, ``where`` naming the file and line; a line that
    is not a JSON object is an error naming it (``expected`` says which keys an object should have)."""
    # As datasets reads it (pyarrow's JSON reader): UTF-8 with or without a byte-order mark, any line ending.
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DatasetFormatError(f"{path}, line {line}: not UTF-8 text ({err.reason}); datasets reads JSON lines as UTF-8: "
                                 "save the file as UTF-8") from None
    for number, line in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
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


ENLARGE = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}
DEFAULT_RESIZE = {"image": "bilinear", "condition": "bilinear"}


def check_resize(resize: dict) -> dict:
    """``data.resize`` with each rule named by its key when unknown."""
    resize = {**DEFAULT_RESIZE, **(resize or {})}
    for part, rule in resize.items():
        if part not in DEFAULT_RESIZE or rule not in ENLARGE:
            raise ValueError(f"data.resize.{part}={rule!r}: the keys are {', '.join(DEFAULT_RESIZE)}, the rules {', '.join(ENLARGE)}")
    return resize


def resized(image: np.ndarray, size: tuple[int, int], enlarge: str) -> np.ndarray:
    """``image`` at (width, height) ``size``: area averaging where it shrinks, the ``enlarge`` rule where it grows."""
    shrinking = size[0] * size[1] < image.shape[0] * image.shape[1]
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrinking else ENLARGE[enlarge])


def square_crop(height: int, width: int, resolution: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The geometry rule on an image of (``height``, ``width``): (its resized (height, width), the crop's (top, left))."""
    scale = resolution / min(height, width)
    size = max(resolution, round(height * scale)), max(resolution, round(width * scale))
    return size, ((size[0] - resolution) // 2, (size[1] - resolution) // 2)


def crop_geometry(height: int, width: int, resolution: int) -> torch.Tensor:
    """(original height, original width, crop top, crop left) of the geometry rule on an image of that size: what
    SDXL's size conditioning takes, as diffusers' SDXL training scripts record per sample."""
    return torch.tensor([height, width, *square_crop(height, width, resolution)[1]])


def fit_square(image: np.ndarray, resolution: int, enlarge: str = "bilinear") -> np.ndarray:
    """The geometry rule of the module docstring: shorter side to ``resolution``, then a center crop."""
    height, width = image.shape[:2]
    if (height, width) != (resolution, resolution):
        size, (top, left) = square_crop(height, width, resolution)
        image = resized(image, size[::-1], enlarge)
        image = image[top : top + resolution, left : left + resolution]
    return np.ascontiguousarray(image)


def fit_condition(condition: np.ndarray, target_size: tuple[int, int], resolution: int, enlarge: str) -> np.ndarray:
    """A stored condition given its target's geometry: resized to the target's (height, width), then fitted."""
    if condition.shape[:2] != tuple(target_size):
        condition = resized(condition, tuple(target_size)[::-1], enlarge)
    return fit_square(condition, resolution, enlarge)


DECODE = datasets.Image()
LOSSLESS_MODES = ("RGB", "L", "1")
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": None, "F": None}


def decode_rgb(encoded: bytes | None, path: str | None, where: str) -> np.ndarray:
    """An RGB uint8 (H, W, 3) image from its bytes, or from its file when no bytes are stored, decoded by ``datasets``
    and converted faithfully (``to_rgb``); an image that cannot be is an error naming it."""
    name = path or "(stored bytes)"
    try:
        image = DECODE.decode_example({"path": path, "bytes": encoded})
        image.load()
        return to_rgb(image, f"{where}: image {name}")
    except DatasetFormatError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DatasetFormatError(f"{where}: image {name} is unreadable ({err})") from None


def to_rgb(image: PIL.Image.Image, where: str) -> np.ndarray:
    """RGB uint8 of any PIL mode, keeping what the pixels mean: 16- and 32-bit integer images scaled from their bit
    depth (not clipped at 255, which whitens them), float images in [0, 1] scaled to 255, transparency composited over
    white, palette, CMYK and YCbCr through PIL. An image with more than one value that would come out as one flat color
    is refused (``where`` names it), never trained on."""
    if image.mode in LOSSLESS_MODES:  # the common case, on every item a step reads: nothing can be flattened
        return np.asarray(image.convert("RGB"))
    if image.mode in WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        top = WIDE_MODES[image.mode] or (65535 if image.mode == "I" and 0 <= values.min() and values.max() <= 65535 else None)
        if image.mode == "F" and 0 <= values.min() and values.max() <= 1:
            top = 1.0
        if top is None:
            raise DatasetFormatError(f"{where}: mode {image.mode} with values in [{values.min():g}, {values.max():g}] has no "
                                     "known range to map to 8 bits; save it as 8- or 16-bit PNG")
        gray = np.round(values / top * 255).astype(np.uint8)
        rgb, source_varies = np.repeat(gray[..., None], 3, axis=2), values.min() != values.max()
    else:
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = PIL.Image.alpha_composite(white, image.convert("RGBA"))
        extrema = image.getextrema()
        source_varies = any(low != high for low, high in (extrema if isinstance(extrema[0], tuple) else [extrema]))
        rgb = np.asarray(image.convert("RGB"))
    if source_varies and rgb.min() == rgb.max():
        raise DatasetFormatError(f"{where}: decoding mode {image.mode} gives one flat color from an image whose values vary; "
                                 "convert it to 8-bit RGB first")
    return rgb


def load_rgb(path: Path | str, resolution: int, enlarge: str = "bilinear") -> np.ndarray:
    """An image file as RGB uint8, fitted to ``resolution`` by the geometry rule."""
    return fit_square(decode_rgb(None, str(path), str(path)), resolution, enlarge)


class ImageColumn:
    """One image column: file paths where the images are files, the stored bytes read on demand otherwise; each row's
    content key and size come from the first pass (manifest.py), paid once per file."""

    def __init__(self, table: datasets.Dataset, column: str, manifest: Manifest, where: Callable[[str], str | None] | None = None):
        self.refs = table.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        if self.refs._indices is not None:
            self.refs = self.refs.flatten_indices()
        self.column = column
        # The paths and which rows store bytes, read from the Arrow columns without reading the bytes themselves.
        struct = self.refs.data.column(column)
        self.paths: list[str | None] = [p if p is None or os.path.isabs(p) else os.path.abspath(p) for p in
                                        pa.chunked_array([chunk.field("path") for chunk in struct.chunks], pa.string()).to_pylist()]
        stored = pa.chunked_array([chunk.field("bytes").is_valid() for chunk in struct.chunks], pa.bool_()).to_pylist()
        for row, (path, has_bytes) in enumerate(zip(self.paths, stored)):
            if has_bytes:
                self.paths[row] = None
            elif path is None:
                raise DatasetFormatError(f"column {column!r}, row {row}: no image")
        files = [row for row, path in enumerate(self.paths) if path is not None]

        def named(i: int) -> str:
            return (where and where(os.path.abspath(self.paths[files[i]]))) or f"column {column!r}, row {files[i]}"

        try:
            facts = manifest.facts([self.paths[r] for r in files], named)
        except UnreadableImage as err:
            raise DatasetFormatError(str(err)) from None
        self.facts: list[FileFacts | None] = [None] * len(self.paths)
        for row, found in zip(files, facts):
            self.facts[row] = found
        in_table = [row for row, path in enumerate(self.paths) if path is None]
        stored_rows = stored_keys(manifest.cache_dir, table._fingerprint, column, lambda: self._hash_stored(in_table)) if in_table else []
        self.keys: list[str] = [f.key if f is not None else "" for f in self.facts]
        self.stored_sizes: dict[int, tuple[int, int]] = {}  # (height, width) of rows stored as bytes, read on first use
        for row, key in zip(in_table, stored_rows):
            self.keys[row] = key

    def _hash_stored(self, rows: list[int]) -> list[str]:
        keys = []
        for start in tqdm(range(0, len(rows), 1024), desc=f"hashing the stored images of {self.column} (once; kept in a manifest)",
                          unit="batch", disable=len(rows) < 4096):
            batch = self.refs.select(rows[start : start + 1024])[self.column]
            keys.extend(content_key(item["bytes"]) for item in batch)
        return keys

    def read(self, index: int) -> np.ndarray:
        path = self.paths[index]
        encoded = None if path else self.refs[index][self.column]["bytes"]
        return decode_rgb(encoded, path, f"column {self.column!r}, row {index}")

    def size(self, index: int) -> tuple[int, int]:
        """(height, width): the first pass's, or from the image's header, without decoding its pixels (read once a row:
        every item asks it, for its size conditioning)."""
        if self.facts[index] is not None:
            return self.facts[index].height, self.facts[index].width
        if index not in self.stored_sizes:
            self.stored_sizes[index] = self._header_size(index)
        return self.stored_sizes[index]

    def _header_size(self, index: int) -> tuple[int, int]:
        try:
            with PIL.Image.open(io.BytesIO(self.refs[index][self.column]["bytes"])) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError) as err:
            raise DatasetFormatError(f"column {self.column!r}, row {index}: image (stored bytes) is unreadable ({err})") from None
        return height, width


@dataclass
class Samples:
    """Rows of one dataset split: ``table`` has the canonical columns; ``origin`` says where it was read from."""

    table: datasets.Dataset
    origin: str
    manifest: Manifest | None = None  # where the first pass over the files is kept (None: not kept)
    where: Callable[[str], str | None] | None = None  # where a file (absolute path) is named, e.g. its metadata line; for errors
    resize: dict = field(default_factory=lambda: dict(DEFAULT_RESIZE))  # data.resize: the enlarging rule of each part

    def __post_init__(self):
        manifest = self.manifest or Manifest(None, self.origin)
        self.targets = ImageColumn(self.table, IMAGE, manifest, self.where)
        self.conditions = ImageColumn(self.table, CONDITION, manifest, self.where) if CONDITION in self.table.column_names else None
        self.prompts: list[str] = self.table.with_format("arrow")[TEXT].to_pylist()

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_conditions(self) -> bool:
        return self.conditions is not None

    def target(self, index: int, resolution: int) -> np.ndarray:
        return fit_square(self.targets.read(index), resolution, self.resize["image"])

    def pair(self, index: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
        """(target, stored condition), the condition given its target's geometry."""
        target = self.targets.read(index)
        return fit_square(target, resolution, self.resize["image"]), self._fit_condition(index, target.shape[:2], resolution)

    def condition(self, index: int, resolution: int) -> np.ndarray:
        """The stored condition as ``pair`` gives it, with only its target's header read."""
        return self._fit_condition(index, self.targets.size(index), resolution)

    def _fit_condition(self, index: int, target_size: tuple[int, int], resolution: int) -> np.ndarray:
        return fit_condition(self.conditions.read(index), target_size, resolution, self.resize["condition"])

    def key(self, index: int) -> str:
        """The row's content: its target's and stored condition's bytes, and its caption."""
        condition = self.conditions.keys[index] if self.conditions else ""
        return hashlib.sha256(f"{self.targets.keys[index]}|{condition}|{self.prompts[index]}".encode()).hexdigest()[:20]

    def fingerprint(self, indices=None) -> str:
        """A hash of the rows (all, or ``indices`` in that order): what caches of these rows are keyed by."""
        rows = range(len(self)) if indices is None else indices
        geometry = json.dumps(self.resize, sort_keys=True)
        return hashlib.sha256("\n".join([geometry, *(self.key(int(i)) for i in rows)]).encode()).hexdigest()[:16]
