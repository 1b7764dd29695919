"""Reader for any fill50k-format folder (the real fill50k, or the synthetic one): ``prompt.json`` + source/ + target/.

Every record is checked before training starts, so a broken dataset fails at once with
the file and line that are wrong; the checked records become ``Samples`` (a
``datasets.Dataset`` of file paths) whose stored condition is the source outline.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
from PIL import Image, UnidentifiedImageError

from controlnet_lab.data.samples import CONDITION, IMAGE, TEXT, DatasetFormatError, Samples, json_lines


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
    for where, item in json_lines(index, "source, target, prompt"):
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


def fill50k_samples(root: Path) -> Samples:
    """The folder's checked records as ``Samples``: target as ``image``, source outline as ``conditioning_image``."""
    records = read_index(root)
    table = datasets.Dataset.from_dict({
        IMAGE: [str(r.target) for r in records], CONDITION: [str(r.source) for r in records], TEXT: [r.prompt for r in records],
    }).cast_column(IMAGE, datasets.Image()).cast_column(CONDITION, datasets.Image())
    return Samples(table, str(root))
