"""Reader for any fill50k-format folder (the real fill50k, or the synthetic one): ``prompt.json`` + source/ + target/.

Every record is checked before training starts, so a broken dataset fails at once with
the file and line that are wrong (the images themselves by the first pass, manifest.py,
paid once); the checked records become ``Samples`` (a ``datasets.Dataset`` of file
paths) whose stored condition is the source outline.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import datasets

from controlnet_lab.data.manifest import Manifest
from controlnet_lab.data.samples import CONDITION, IMAGE, TEXT, DatasetFormatError, Samples, json_lines


@dataclass(frozen=True)
class Record:
    source: Path
    target: Path
    prompt: str
    where: str = ""   # the prompt.json line that names it


def read_index(root: Path) -> list[Record]:
    """Parse and check ``root/prompt.json``: each line's keys (the images it names are checked by the first pass)."""
    root = Path(root)
    index = root / "prompt.json"
    if not index.is_file():
        raise DatasetFormatError(f"{index}: missing; a fill50k-format folder needs prompt.json (one JSON object per line)")
    records = []
    for where, item in json_lines(index, "source, target, prompt"):
        missing = [key for key in ("source", "target", "prompt") if key not in item]
        if missing:
            raise DatasetFormatError(f"{where}: lacks key(s) {', '.join(missing)}")
        records.append(Record(root / item["source"], root / item["target"], str(item["prompt"]), where))
    if not records:
        raise DatasetFormatError(f"{index}: holds no records")
    return records


def fill50k_samples(root: Path, manifest: Manifest | None = None) -> Samples:
    """The folder's checked records as ``Samples``: target as ``image``, source outline as ``conditioning_image``;
    a source whose size differs from its target's is an error naming the line."""
    records = read_index(root)
    table = datasets.Dataset.from_dict({
        IMAGE: [str(r.target) for r in records], CONDITION: [str(r.source) for r in records], TEXT: [r.prompt for r in records],
    }).cast_column(IMAGE, datasets.Image()).cast_column(CONDITION, datasets.Image())
    named = functools.cache(lambda: {os.path.abspath(path): r.where for r in records for path in (r.source, r.target)})
    samples = Samples(table, str(root), manifest, lambda path: named().get(path))
    for row, record in enumerate(records):
        source, target = samples.conditions.size(row), samples.targets.size(row)
        if source != target:
            raise DatasetFormatError(f"{record.where}: source {record.source} is {source[1]}x{source[0]} "
                                     f"but target {record.target} is {target[1]}x{target[0]}")
    return samples
