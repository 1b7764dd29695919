"""Lightning DataModules, one per ``data=`` option, each a ``ControlDataModule`` (control_datamodule.py: the split,
datasets and loaders) that says where its samples live: ``Fill50kDataModule`` (the synthetic default and any
fill50k-format folder), ``FolderDataModule`` (an image folder with ``metadata.jsonl``) and ``HubDataModule`` (a Hugging
Face dataset id or a ``save_to_disk`` folder; ``data.streaming=true`` streams an id's rows instead of reading them
first, data/streaming.py). ``build_datamodule`` makes the configured one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from controlnet_lab.data.conditions import DETECTORS, STORED, condition_maker
from controlnet_lab.data.control_datamodule import ControlDataModule, fill50k_style
from controlnet_lab.data.dataset import ControlDataset
from controlnet_lab.data.fill50k import fill50k_samples
from controlnet_lab.data.readers import canonical_columns, folder_samples, hub_samples, load
from controlnet_lab.data.samples import CONDITION, IMAGE, TEXT, DatasetFormatError, Samples
from controlnet_lab.data.streaming import StreamedRows, StreamLoader, held_out_samples
from controlnet_lab.data.synthetic import SyntheticFill50kSpec, write_fill50k


class Fill50kDataModule(ControlDataModule):
    """A fill50k-format folder (``root``), or the synthetic one generated into the cache from ``generator``."""

    def __init__(self, root: str | None = None, generator: dict | None = None, **settings):
        super().__init__(**settings)
        if root is None and generator is None:
            raise ValueError("data.root must name a fill50k-format folder when data.generator is null")
        self.root, self.generator = root, generator

    def dataset_root(self) -> Path:
        if self.generator is None:
            return Path(self.root).expanduser()
        spec = SyntheticFill50kSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.generator.items()})
        spec.validate()
        key = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode()).hexdigest()[:16]
        return write_fill50k(spec, self.cache_dir / "data" / f"synthetic-{key}")

    def read(self, split: str) -> Samples:
        if split != "train":
            raise DatasetFormatError(f"data.split/data.val_split={split}: a fill50k-format folder has one split; "
                                     "its held-out set is drawn by data.split_seed (set data.val_split=null)")
        root = self.dataset_root()
        return fill50k_samples(root, self.manifest(str(root.resolve())))


def columns(image_column: str, conditioning_image_column: str, caption_column: str) -> dict[str, str]:
    """The configured column names (diffusers' --image_column, ...) by canonical name."""
    return {IMAGE: image_column, CONDITION: conditioning_image_column, TEXT: caption_column}


class FolderDataModule(ControlDataModule):
    """An image folder in diffusers' layout (readers.py); ``split`` and ``val_split`` name its split subfolders."""

    def __init__(self, root: str, image_column: str = IMAGE, conditioning_image_column: str = CONDITION,
                 caption_column: str = TEXT, **settings):
        super().__init__(**settings)
        if not root:
            raise ValueError("data.root must name an image folder with metadata.jsonl")
        self.root, self.columns = root, columns(image_column, conditioning_image_column, caption_column)

    def read(self, split: str) -> Samples:
        root = Path(self.root).expanduser()
        return folder_samples(root, self.columns, split, self.condition in STORED, self.cache_dir / "datasets",
                              self.manifest(str(root.resolve())))


class HubDataModule(ControlDataModule):
    """A Hugging Face dataset: ``name`` (an id, read with load_dataset) or ``path`` (a save_to_disk folder)."""

    def __init__(self, name: str | None = None, path: str | None = None, image_column: str = IMAGE,
                 conditioning_image_column: str = CONDITION, caption_column: str = TEXT, **settings):
        super().__init__(name=name or (Path(path).name if path else ""), **settings)
        self.dataset_name, self.path = name, path
        self.columns = columns(image_column, conditioning_image_column, caption_column)

    def read(self, split: str) -> Samples:
        origin = self.dataset_name or str(Path(self.path).expanduser().resolve())
        return hub_samples(self.dataset_name, self.path, split, self.columns, self.cache_dir / "datasets", self.manifest(origin))


def hub_datamodule(streaming: bool = False, shuffle_buffer: int = 1000, **settings) -> HubDataModule:
    """``data=hf``: the dataset read whole (``HubDataModule``), or streamed (``StreamedHubDataModule``)."""
    return StreamedHubDataModule(shuffle_buffer=shuffle_buffer, **settings) if streaming else HubDataModule(**settings)


class StreamedHubDataModule(HubDataModule):
    """A dataset id's rows streamed (data/streaming.py): the first ``val_size`` rows held out in memory, the rest a
    shuffled stream that only ``train_dataloader`` serves."""

    streaming = True

    def __init__(self, shuffle_buffer: int = 1000, **settings):
        super().__init__(**settings)
        if self.path or not self.dataset_name:
            raise ValueError("data.streaming=true streams data.name (a dataset id, or a local folder load_dataset reads); a save_to_disk "
                             "folder (data.path) is memory-mapped already: set data.streaming=false")
        if shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.shuffle_buffer = shuffle_buffer
        self.train_stream = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_stream is not None:
            return
        stream = self.open_stream(self.split)
        held_out_split = self.val_split or self.split
        self.val_samples = held_out_samples(self.open_stream(self.val_split) if self.val_split else stream, self.val_size,
                                            self.dataset_name, held_out_split)
        self.val_samples.resize = self.resize
        self.check_condition(self.val_samples)
        self.val_rows = np.arange(self.val_size)
        train = stream if self.val_split else stream.skip(self.val_size)
        self.train_stream = train if self.size is None else train.take(self.size)
        self.split_report = {
            "held_out": self.val_size,
            **self.held_out_parts(),
            "train": self.size,  # None: the whole stream, whose length is not read
            "val_split": self.val_split,
            "streaming": {"held_out_rows": f"the first {self.val_size} of split {held_out_split}", "shuffle_buffer": self.shuffle_buffer},
            "exact_duplicates_excluded": None,  # dropped as they stream by, not counted in advance
            "near_duplicates_excluded": None,
            "max_distance": None,
            "nearest_train_distance": None,
        }
        if self.condition in DETECTORS:
            self.detect_conditions(("val",))

    def open_stream(self, split: str):
        return canonical_columns(load(self.dataset_name, split, "data.name", cache_dir=str(self.cache_dir / "datasets"), streaming=True),
                                 self.columns, self.dataset_name)

    @property
    def origin(self) -> str:
        return self.dataset_name

    @property
    def fill50k_style(self) -> bool:
        return fill50k_style(self.val_samples)

    def prompts(self) -> list[str]:
        """The held-out prompts (the training prompts are not read in advance)."""
        return list(self.val_samples.prompts)

    def fingerprint(self) -> str:
        raise ValueError("data.streaming=true: a stream has no content fingerprint (it is not read in advance)")

    def dataset(self, part: str, prompt_dropout: float = 0.0, with_target: bool = True) -> ControlDataset:
        if part not in ("val", "validation", "test"):
            raise ValueError(f"data.streaming=true: the {part} rows are a stream, served by train_dataloader only")
        return super().dataset(part, prompt_dropout, with_target)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        held_out = self.val_samples
        keys = ({held_out.targets.keys[r] for r in self.val_rows},
                {held_out.conditions.keys[r] for r in self.val_rows} if held_out.has_conditions else set())
        make = condition_maker(self.condition, self.resolution, self.detector_weights, self.canny_thresholds)
        rows = StreamedRows(self.train_stream, self.resolution, self.resize, self.prompt_dropout, self.seed, self.shuffle_buffer,
                            make, keys, self.batch_size, rank, world_size, self.dataset_name)
        epoch, trained = self.resume_position()
        return StreamLoader(rows, epoch, trained // self.batch_size, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(self.seed))


def build_datamodule(data_cfg: DictConfig) -> ControlDataModule:
    """The run's DataModule from ``data._target_``, set up: every sample is read and checked now, before any training."""
    data = hydra.utils.instantiate(data_cfg, _convert_="all")
    data.setup()
    return data
