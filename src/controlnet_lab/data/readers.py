"""Reading a dataset into ``Samples``: an image folder or any Hugging Face dataset, through ``datasets``.

- ``folder_samples``: a folder in diffusers' layout, read by ``datasets``' imagefolder
  builder: ``metadata.jsonl`` (in the folder, or in split subfolders such as ``train/``)
  names each row's target image as ``file_name`` (the ``image`` column), further image
  columns as ``<column>_file_name`` (``conditioning_image_file_name``), and the caption.
  Every line is checked first, so a broken folder stops before any work with the file
  and line that is wrong; the images themselves are checked by the first pass
  (manifest.py), whose errors name the same line.
- ``hub_samples``: a dataset id (``datasets.load_dataset``) or a folder written by
  ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``datasets.load_from_disk``).

The configured column names (diffusers' ``--image_column``, ``--conditioning_image_column``,
``--caption_column``) are renamed to the canonical ones of samples.py.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.data_files import NON_WORDS_CHARS, SPLIT_KEYWORDS

from controlnet_lab.data.manifest import Manifest
from controlnet_lab.data.samples import CONDITION, IMAGE, TEXT, DatasetFormatError, Samples, json_lines
from controlnet_lab.files import build_published

log = logging.getLogger(__name__)


def metadata_key(column: str) -> str:
    """The metadata.jsonl key of an image column, as datasets' imagefolder reads it."""
    return "file_name" if column == IMAGE else f"{column}_file_name"


def check_metadata(path: Path, columns: dict[str, str], needs_conditions: bool) -> dict[str, str]:
    """Every line of an imagefolder's ``metadata.jsonl``: a JSON object with the configured columns and a string
    caption. ``columns`` maps the canonical names to the configured ones. Returns where each image is named (its
    absolute path: the file and line); whether the images exist and decode is the first pass's check (manifest.py)."""
    named = {}
    image_key, caption = metadata_key(columns[IMAGE]), columns[TEXT]
    condition_key = metadata_key(columns[CONDITION])
    folder = os.path.abspath(path.parent)
    with_conditions = None
    for where, row in json_lines(path, f"{image_key}, {caption}"):
        for key, setting in ((image_key, "data.image_column"), (caption, "data.caption_column")):
            if key not in row:
                raise DatasetFormatError(f"{where}: lacks {key!r} ({setting}={columns[IMAGE] if key == image_key else caption}); "
                                         f"the line has {sorted(row)}")
        if not isinstance(row[caption], str):
            raise DatasetFormatError(f"{where}: the caption {caption!r} is {type(row[caption]).__name__} {row[caption]!r}, not a string")
        named[os.path.normpath(os.path.join(folder, str(row[image_key])))] = where
        if with_conditions is None:
            with_conditions = condition_key in row
        if (condition_key in row) != with_conditions:
            raise DatasetFormatError(f"{where}: {'has' if condition_key in row else 'lacks'} {condition_key!r}, "
                                     f"unlike the lines before it (data.conditioning_image_column={columns[CONDITION]})")
        if with_conditions:
            named[os.path.normpath(os.path.join(folder, str(row[condition_key])))] = where
    if with_conditions is None:
        raise DatasetFormatError(f"{path}: holds no rows")
    if needs_conditions and not with_conditions:
        raise DatasetFormatError(f"{path}: no line has {condition_key!r} (data.conditioning_image_column={columns[CONDITION]}), and "
                                 "data.condition=stored trains on stored conditions: add them, or set data.condition to a "
                                 "controlnet-aux detector that makes them from the images")
    return named


def metadata_splits(root: Path, metadata: list[Path]) -> dict[str, list[str]]:
    """Which split each ``metadata.jsonl`` holds, by the rule datasets' imagefolder applies to folder names (its
    ``SPLIT_KEYWORDS``: a subfolder named ``train``, ``validation``, ``val``, ``test``..., alone or joined to other words
    by ``-._ `` or digits); without such subfolders, every file is the ``train`` split. Given these files, datasets
    reads the rows from them alone: inferring the splits itself globs the whole folder with each of its 66 patterns,
    which took 88 of 125 s of a first start at 16,000 images (benchmarks/data_scale.py)."""
    def split_of(folder_name: str) -> str | None:
        for split, keywords in SPLIT_KEYWORDS.items():
            if any(re.fullmatch(rf"(.*[{NON_WORDS_CHARS}])?{keyword}([{NON_WORDS_CHARS}].*)?", folder_name) for keyword in keywords):
                return str(split)
        return None

    splits: dict[str, list[str]] = {}
    for path in metadata:
        split = split_of(path.parent.name) if path.parent != root else None
        if split:
            splits.setdefault(split, []).append(str(path.resolve()))
    return splits or {"train": [str(path.resolve()) for path in metadata]}


def folder_samples(root: str | Path, columns: dict[str, str], split: str, needs_conditions: bool, cache_dir: Path,
                   manifest: Manifest | None = None) -> Samples:
    """One split of an image folder (module docstring), checked line by line when first read."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetFormatError(f"data.root={root}: no such folder")
    metadata = sorted(root.glob("metadata.jsonl")) + sorted(root.glob("*/metadata.jsonl"))
    if not metadata:
        raise DatasetFormatError(f"data.root={root}: no metadata.jsonl in the folder or its split subfolders "
                                 "(one JSON object per line: file_name, conditioning_image_file_name, text)")

    @functools.cache
    def lines() -> dict[str, str]:
        """Where each image is named, every line checked: before datasets first reads the folder, and for an error."""
        return {path: where for file in metadata for path, where in check_metadata(file, columns, needs_conditions).items()}

    def build() -> datasets.Dataset:
        lines()
        splits = metadata_splits(root, metadata)
        if split not in splits:
            raise DatasetFormatError(f"data.split/data.val_split={split}: data.root={root} has the splits {sorted(splits)} "
                                     "(split subfolders such as train/, validation/, test/)")
        return datasets.load_dataset("imagefolder", split=split, data_files={split: splits[split]}, cache_dir=str(cache_dir))

    table = kept_table(Path(cache_dir), metadata, split, build)
    return canonical(table, columns, str(root), manifest, lambda path: lines().get(path))


def kept_table(cache_dir: Path, metadata: list[Path], split: str, build) -> datasets.Dataset:
    """The imagefolder table of these ``metadata`` files (``build()`` loads it), kept after its first load as its
    columns with each image as its file's path (a small Parquet file) and read back on later starts: each
    ``load_dataset`` matches every file of the folder against the builder's split patterns again, which grows with the
    folder's size (benchmarks/data_scale.py), and ``save_to_disk`` would copy the images' bytes into the cache. The
    table holds only what the metadata says, so it is keyed by those files' paths, sizes and times."""
    stamps = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in metadata]
    key = hashlib.sha256(json.dumps({"metadata": stamps, "split": split, "datasets": datasets.__version__}).encode()).hexdigest()[:16]
    folder = cache_dir / "tables" / key
    if (folder / "columns.json").is_file():
        try:
            return with_image_columns(pq.read_table(folder / "table.parquet"), json.loads((folder / "columns.json").read_text()))
        except Exception as err:  # noqa: BLE001 - pyarrow and datasets raise several types for a damaged file
            log.warning(f"the kept table {folder} is unreadable ({type(err).__name__}: {err}): loading the folder again")
            shutil.rmtree(folder, ignore_errors=True)
    table = build()
    images = [name for name, feature in table.features.items() if isinstance(feature, datasets.Image)]
    if table._indices is not None or any(chunk.field("bytes").null_count < len(chunk) for name in images
                                         for chunk in table.data.column(name).chunks):
        return table  # images stored in the table itself: nothing to gain
    columns = {name: pa.chunked_array([chunk.field("path") for chunk in table.data.column(name).chunks], pa.string())
               if name in images else table.data.column(name) for name in table.column_names}

    def write(staging: Path) -> None:
        pq.write_table(pa.table(columns), staging / "table.parquet")
        (staging / "columns.json").write_text(json.dumps(images))

    build_published(folder, "columns.json", write)
    return table


def with_image_columns(arrow: pa.Table, images: list[str]) -> datasets.Dataset:
    table = datasets.Dataset(arrow)
    for name in images:
        table = table.cast_column(name, datasets.Image())
    return table


def hub_samples(name: str | None, path: str | None, split: str, columns: dict[str, str], cache_dir: Path,
                manifest: Manifest | None = None) -> Samples:
    """One split of a Hub dataset (``data.name``) or of a ``save_to_disk`` folder (``data.path``)."""
    if bool(name) == bool(path):
        raise DatasetFormatError("data=hf reads data.name (a dataset id) or data.path (a save_to_disk folder): set exactly one")
    if path:
        if not Path(path).expanduser().is_dir():
            raise DatasetFormatError(f"data.path={path}: no such folder (a folder written by Dataset.save_to_disk)")
        try:
            loaded = datasets.load_from_disk(str(Path(path).expanduser()))
        except FileNotFoundError as err:
            raise DatasetFormatError(f"data.path={path}: not a folder written by save_to_disk ({err})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DatasetFormatError(f"data.split={split}: data.path={path} has the splits {sorted(loaded)}")
            loaded = loaded[split]
        return canonical(loaded, columns, str(path), manifest)
    return canonical(load(name, split, "data.name", cache_dir=str(cache_dir)), columns, name, manifest)


def load(name: str, split: str, key: str, **kwargs) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, split=split, **kwargs)
    except ValueError as err:
        if "split" in str(err).lower():
            raise DatasetFormatError(f"data.split/data.val_split={split}: {err}") from None
        raise
    except (FileNotFoundError, ConnectionError, OSError) as err:
        raise DatasetFormatError(
            f"{key}={name}: the dataset is not on this machine and could not be fetched "
            f"({type(err).__name__}: {str(err)[:200]}). Without network, save it elsewhere with save_to_disk and set data.path."
        ) from None


def canonical(table: datasets.Dataset, columns: dict[str, str], origin: str, manifest: Manifest | None = None,
              named: Callable[[str], str | None] | None = None) -> Samples:
    """The samples of ``table``'s configured columns."""
    return Samples(canonical_columns(table, columns, origin), origin, manifest, named)


def canonical_columns(table, columns: dict[str, str], origin: str):
    """``table`` (a Dataset or an IterableDataset) with the configured columns checked and renamed to the canonical
    ones, others dropped."""
    if table.features is None:
        raise DatasetFormatError(f"{origin}: its stream declares no features (column types), so its columns cannot be checked; "
                                 "set data.streaming=false")
    present = dict(table.features)
    renames = {}
    for canonical_name, configured in columns.items():
        key = {IMAGE: "data.image_column", CONDITION: "data.conditioning_image_column", TEXT: "data.caption_column"}[canonical_name]
        if configured not in present:
            if canonical_name == CONDITION:
                continue
            raise DatasetFormatError(f"{key}={configured}: {origin} has no such column; its columns are {sorted(present)}")
        feature = present[configured]
        if canonical_name == TEXT and not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise DatasetFormatError(f"{key}={configured}: in {origin} the column holds {feature}, not strings")
        if canonical_name != TEXT and not isinstance(feature, datasets.Image):
            raise DatasetFormatError(f"{key}={configured}: in {origin} the column holds {feature}, not images")
        renames[configured] = canonical_name
    return table.select_columns(list(renames)).rename_columns({k: v for k, v in renames.items() if k != v})
