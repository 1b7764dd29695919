"""The DataModule every ``data=`` option shares: a fixed, content-disjoint held-out split of any dataset, nested
training subsets, detected or cached conditions, and the loaders (with the locked encodings attached where cached).
Subclasses (datamodule.py) say where the samples come from (``read``)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from controlnet_lab.data.colors import parse_prompt
from controlnet_lab.data.condition_cache import CachedConditions, cached_conditions
from controlnet_lab.data.conditions import (CONDITIONS, DETECTORS, STORED, SYNTHETIC, condition_maker, detector_device_for,
                                            detector_settings)
from controlnet_lab.data.dataset import ControlDataset
from controlnet_lab.data.encoded import EncodedDataset, LockedEncodings
from controlnet_lab.data.held_out import exact_duplicates, near_duplicates, source_ink
from controlnet_lab.data.manifest import Manifest, default_num_proc
from controlnet_lab.data.order import EpochOrder
from controlnet_lab.data.samples import Samples, check_resize


def permutation(total: int, val_size: int, split_seed: int) -> np.ndarray:
    """The split's seeded order: its first ``val_size`` items are the held-out set."""
    if val_size < 1 or val_size >= total:
        raise ValueError(f"data.val_size must be in [1, {total - 1}] for a dataset of {total} samples, got {val_size}")
    return np.random.default_rng(split_seed).permutation(total)


def training_subset(pool: np.ndarray, size: int | None, dropped: str) -> np.ndarray:
    """The first ``size`` rows of the training pool (all with None): smaller subsets nest inside larger ones."""
    if size is None:
        return pool
    if size < 1:
        raise ValueError(f"data.size must be >= 1, got {size}")
    if size > len(pool):
        raise ValueError(f"data.size={size} exceeds the {len(pool)} training samples available ({dropped})")
    return pool[:size]


def check_validation_size(validation_size: int, val_size: int) -> int:
    if not 0 <= validation_size < val_size:
        raise ValueError(f"data.validation_size must be in [0, data.val_size - 1 = {val_size - 1}] (the rest of the held-out set is "
                         f"the test set), got {validation_size}")
    return validation_size


class ControlDataModule(L.LightningDataModule):
    """The split, the datasets and the loaders; subclasses say where the samples come from (``read_samples``).

    The held-out set (``val_size`` samples, never trained on) has two disjoint parts: its first ``validation_size``
    samples are the **validation** set (the fidelity curve, the validation loss, the initial output change, the stopping
    rule: whatever may steer a run), the rest the **test** set (the final scores, and nothing else). With
    ``validation_size`` 0 (runs configured before the key existed) both are the whole held-out set."""

    streaming = False  # True: the training rows are a stream, not a table (StreamedHubDataModule)

    def __init__(self, name: str, resolution: int, batch_size: int, val_size: int, size: int | None = None,
                 prompt_dropout: float = 0.5, split_seed: int = 0, num_workers: int = 0, condition: str = "stored",
                 detector_weights: str | None = None, canny_thresholds: tuple[int, int] = (100, 200),
                 held_out: dict | None = None, split: str = "train", val_split: str | None = None, cache_dir: str | Path = ".cache",
                 seed: int = 0, resize: dict | None = None, num_proc: int | None = None, detector_device: str = "auto",
                 validation_size: int = 0):
        super().__init__()
        self.validation_size = check_validation_size(validation_size, val_size)
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ValueError(f"data.prompt_dropout must be in [0, 1], got {prompt_dropout}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if condition not in CONDITIONS:
            raise ValueError(f"data.condition={condition!r} is unknown; choose one of {', '.join(CONDITIONS)}")
        held_out = {"exclude_near_duplicates": False, "max_distance": 0.2, **(held_out or {})}
        self.name, self.resolution, self.batch_size, self.val_size, self.size = name, resolution, batch_size, val_size, size
        self.prompt_dropout, self.split_seed, self.num_workers = prompt_dropout, split_seed, num_workers
        self.condition, self.detector_weights, self.canny_thresholds = condition, detector_weights, tuple(canny_thresholds)
        self.exclude_near_duplicates, self.max_distance = held_out["exclude_near_duplicates"], held_out["max_distance"]
        self.split, self.val_split, self.cache_dir = split, val_split, Path(cache_dir)
        self.seed = seed  # of the training order and prompt-dropout draws (data/order.py)
        self.resize = check_resize(dict(resize or {}))  # how images and stored conditions are enlarged (samples.py)
        self.num_proc = default_num_proc(num_proc)  # processes of the first pass over the images (manifest.py)
        self.detector_device = detector_device_for(condition, detector_device)  # where a detector makes the maps
        self.train_samples: Samples | None = None
        self.val_samples: Samples | None = None
        self.train_rows = self.val_rows = self.pool_rows = np.zeros(0, np.int64)
        self.split_report: dict = {}
        self.detected: dict[str, CachedConditions] = {}
        # What the locked base computes for the training / held-out samples, when cached (locked_encodings.py).
        self.train_encodings: LockedEncodings | None = None
        self.val_encodings: LockedEncodings | None = None

    def read(self, split: str) -> Samples:
        """The samples of one split of the dataset: where the data comes from, in each subclass."""
        raise NotImplementedError

    def manifest(self, origin: str) -> Manifest:
        """The first pass over ``origin``'s image files, kept in this cache."""
        return Manifest(self.cache_dir, origin, self.num_proc)

    @property
    def origin(self) -> str:
        return self.train_samples.origin if self.train_samples else ""

    def setup(self, stage: str | None = None) -> None:
        """Read and check every sample, split, and make the detector conditions the split uses (once, cached)."""
        if self.train_samples is not None:
            return
        samples = self.read(self.split)
        samples.resize = self.resize
        self.check_condition(samples)
        if self.val_split:
            val_samples = self.read(self.val_split)
            val_samples.resize = self.resize
            if self.val_size < 1 or self.val_size > len(val_samples):
                raise ValueError(f"data.val_size must be in [1, {len(val_samples)}] for data.val_split={self.val_split}, got {self.val_size}")
            val = np.sort(np.random.default_rng(self.split_seed).permutation(len(val_samples))[: self.val_size])
            candidates = np.arange(len(samples))
        else:
            val_samples = samples
            order = permutation(len(samples), self.val_size, self.split_seed)
            val, candidates = order[: self.val_size], order[self.val_size :]
        self.train_samples, self.val_samples, self.val_rows = samples, val_samples, val
        duplicate = exact_duplicates(val_samples, val, samples, candidates)
        near, nearest = None, None
        if self.exclude_near_duplicates:
            if not (samples.has_conditions and val_samples.has_conditions):
                raise ValueError("data.held_out.exclude_near_duplicates=true compares stored conditions; this dataset stores none")
            kept = candidates[~duplicate]
            near_mask, nearest = near_duplicates(source_ink(val_samples, val, self.resolution),
                                                 source_ink(samples, kept, self.resolution), self.max_distance)
            near = kept[near_mask]
        pool = candidates[~duplicate]
        if near is not None:
            pool = pool[~np.isin(pool, near)]
        dropped = f"{len(samples)} in the dataset" + ("" if self.val_split else f" minus data.val_size={self.val_size}")
        excluded = int(duplicate.sum()) + (0 if near is None else len(near))
        self.pool_rows = pool
        self.train_rows = training_subset(pool, self.size, dropped + (f" minus {excluded} duplicates and near-duplicates of held-out samples" if excluded else ""))
        self.split_report = {
            "held_out": len(val),
            **self.held_out_parts(),
            "train": len(self.train_rows),
            "val_split": self.val_split,
            "exact_duplicates_excluded": int(duplicate.sum()),
            "near_duplicates_excluded": None if near is None else len(near),
            "max_distance": self.max_distance if self.exclude_near_duplicates else None,
            # over the held-out samples: the distance to the nearest source of the training pool, after exclusion
            "nearest_train_distance": None if nearest is None else {"min": round(float(nearest.min()), 4), "median": round(float(np.median(nearest)), 4)},
        }
        if self.condition in DETECTORS:
            self.detect_conditions()

    def held_out_parts(self) -> dict:
        """The validation and test parts of the held-out set, as results.json's ``split`` records them."""
        if not self.validation_size:
            return {"validation": 0, "test": self.val_size, "validation_and_test_disjoint": False}
        return {"validation": self.validation_size, "test": self.val_size - self.validation_size, "validation_and_test_disjoint": True,
                "validation_rows": f"held-out rows 0-{self.validation_size - 1}", "test_rows": f"held-out rows {self.validation_size}-{self.val_size - 1}"}

    def check_condition(self, samples: Samples) -> None:
        if self.condition in STORED and not samples.has_conditions:
            raise ValueError(f"data.condition={self.condition}: {samples.origin} stores no condition images; "
                             "set data.condition to a controlnet-aux detector that makes them from the images")
        if self.condition in SYNTHETIC and self.condition != "outline" and not fill50k_style(samples):
            raise ValueError(f"data.condition={self.condition} is drawn from fill50k circle outlines; {samples.origin} is not fill50k-format data")

    def detect_conditions(self, parts: tuple[str, ...] = ("train", "val")) -> None:
        detect = condition_maker(self.condition, self.resolution, self.detector_weights, self.canny_thresholds, self.detector_device)
        settings = {**detector_settings(self.condition, self.resolution, self.detector_weights, self.canny_thresholds, self.detector_device),
                    "enlarge": self.resize["image"]}  # the maps are made from the fitted targets
        for part in parts:
            samples, rows = (self.train_samples, self.train_rows) if part == "train" else (self.val_samples, self.val_rows)
            self.detected[part] = cached_conditions(samples, rows, detect, settings, self.cache_dir, self.num_proc,
                                                    in_workers=self.detector_device == "cpu")

    @property
    def fill50k_style(self) -> bool:
        """Stored outlines and every prompt in the fill50k grammar: what the oracle scores and ``fid_domain`` need."""
        return fill50k_style(self.train_samples) and (self.val_samples is self.train_samples or fill50k_style(self.val_samples))

    def prompts(self) -> list[str]:
        """The prompts of the training pool and the held-out set."""
        return [self.train_samples.prompts[r] for r in self.pool_rows] + [self.val_samples.prompts[r] for r in self.val_rows]

    def fingerprint(self) -> str:
        """The content of the training pool and the held-out set, in order: what a base pretrained on this split is keyed by."""
        return hashlib.sha256(f"{self.train_samples.fingerprint(self.pool_rows)}|{self.val_samples.fingerprint(self.val_rows)}".encode()).hexdigest()[:16]

    def dataset(self, part: str, prompt_dropout: float = 0.0, with_target: bool = True) -> ControlDataset:
        """``part``: train, pool, val (the whole held-out set), or its validation or test part (a prefix and the rest of
        it, so a validation item's ``index`` is its index in the held-out set too: the held-out encodings serve it)."""
        held_out = {"validation": self.val_rows[: self.validation_size or None], "test": self.val_rows[self.validation_size:]}
        samples, rows = {"train": (self.train_samples, self.train_rows), "val": (self.val_samples, self.val_rows),
                         "pool": (self.train_samples, self.pool_rows),
                         **{name: (self.val_samples, part_rows) for name, part_rows in held_out.items()}}[part]
        make = condition_maker(self.condition, self.resolution) if self.condition not in DETECTORS else None
        detected = self.detected.get("val" if part in held_out else part)
        return ControlDataset(samples, rows, self.resolution, prompt_dropout, make, detected, with_condition=part != "pool",
                              with_target=with_target)

    def train_dataset(self) -> ControlDataset:
        return self.dataset("train", self.prompt_dropout)

    def val_dataset(self) -> ControlDataset:
        return self.dataset("val")

    def validation_dataset(self) -> ControlDataset:
        return self.dataset("validation")

    def test_dataset(self) -> ControlDataset:
        return self.dataset("test")

    def pool_dataset(self, prompt_dropout: float) -> ControlDataset:
        """Every training candidate, whatever ``data.size``, without conditions: what a locked base is pretrained on."""
        return self.dataset("pool", prompt_dropout)

    def train_dataloader(self) -> DataLoader:
        """Batches in data/order.py's order; resumed in the middle of an epoch, the rest of that epoch."""
        latents_cached = self.train_encodings is not None and self.train_encodings.images is not None
        dataset = self.dataset("train", self.prompt_dropout, with_target=not latents_cached)
        epoch, skip = self.resume_position()
        return DataLoader(
            EncodedDataset(dataset, self.train_encodings) if self.train_encodings is not None else dataset,
            batch_size=self.batch_size,
            sampler=EpochOrder(len(dataset), self.prompt_dropout, self.seed, epoch, skip),
            drop_last=len(dataset) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds from here, not from the global random state
        )

    def resume_position(self) -> tuple[int, int]:
        """(epoch, samples of it already trained) where the trainer resumes; (0, 0) for a fresh run."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return trainer.current_epoch, batches * self.batch_size

    def val_dataloader(self) -> DataLoader:
        """The validation loss's batches: the validation part of the held-out set."""
        dataset = self.validation_dataset()
        dataset = EncodedDataset(dataset, self.val_encodings) if self.val_encodings is not None else dataset
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))


def fill50k_style(samples: Samples) -> bool:
    return samples.has_conditions and all(parse_prompt(prompt) is not None for prompt in samples.prompts)
