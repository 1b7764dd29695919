"""Lightning DataModule over a fill50k-format folder: a fixed held-out split and nested training subsets."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from controlnet_lab.data.conditions import ConditionMaker, outline
from controlnet_lab.data.encoded import EncodedDataset, LockedEncodings
from controlnet_lab.data.fill50k import Fill50kDataset, Record, read_index
from controlnet_lab.data.held_out import exact_duplicate_count, near_duplicates, source_ink


def permutation(total: int, val_size: int, split_seed: int) -> np.ndarray:
    """The split's seeded order: its first ``val_size`` items are the held-out set."""
    if val_size < 1 or val_size >= total:
        raise ValueError(f"data.val_size must be in [1, {total - 1}] for a dataset of {total} samples, got {val_size}")
    return np.random.default_rng(split_seed).permutation(total)


def split_indices(total: int, val_size: int, size: int | None, split_seed: int,
                  excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices from one seeded permutation.

    The validation set is the permutation's first ``val_size`` items, the same for
    every training size; the training pool is the rest, less the indices in
    ``excluded`` (near-duplicates of held-out samples); training takes the first
    ``size`` of the pool, so smaller subsets are nested inside larger ones.
    """
    order = permutation(total, val_size, split_seed)
    pool = order[val_size:]
    if excluded is not None and len(excluded):
        pool = pool[~np.isin(pool, excluded)]
    available = len(pool)
    if size is None:
        size = available
    if size < 1:
        raise ValueError(f"data.size must be >= 1, got {size}")
    if size > available:
        dropped = total - val_size - available
        raise ValueError(f"data.size={size} exceeds the {available} training samples available ({total} in the dataset minus "
                         f"data.val_size={val_size}" + (f" minus {dropped} near-duplicates of held-out samples)" if dropped else ")"))
    return pool[:size], order[:val_size]


class Fill50kDataModule(L.LightningDataModule):
    def __init__(
        self,
        root: str | Path,
        resolution: int,
        batch_size: int,
        val_size: int,
        size: int | None = None,
        prompt_dropout: float = 0.5,
        split_seed: int = 0,
        num_workers: int = 0,
        make_condition: ConditionMaker = outline,
        exclude_near_duplicates: bool = False,
        max_distance: float = 0.2,
    ):
        super().__init__()
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ValueError(f"data.prompt_dropout must be in [0, 1], got {prompt_dropout}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.root = Path(root)
        self.resolution = resolution
        self.batch_size = batch_size
        self.val_size = val_size
        self.size = size
        self.prompt_dropout = prompt_dropout
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.make_condition = make_condition
        self.exclude_near_duplicates = exclude_near_duplicates
        self.max_distance = max_distance
        self.train_records: list[Record] = []
        self.val_records: list[Record] = []
        self.train_pool: list[Record] = []  # every training candidate, whatever data.size: fixed per dataset and split
        self.split_report: dict = {}
        # What the locked base computes for the training / held-out samples, when cached (locked_encodings.py).
        self.train_encodings: LockedEncodings | None = None
        self.val_encodings: LockedEncodings | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_records:
            return
        records = read_index(self.root)
        val = permutation(len(records), self.val_size, self.split_seed)[: self.val_size]
        excluded, nearest = self.near_duplicates_of(records, val) if self.exclude_near_duplicates else (None, None)
        train, _ = split_indices(len(records), self.val_size, self.size, self.split_seed, excluded)
        pool, _ = split_indices(len(records), self.val_size, None, self.split_seed, excluded)
        self.train_pool = [records[i] for i in pool]
        self.train_records = [records[i] for i in train]
        self.val_records = [records[i] for i in val]
        self.split_report = {
            "held_out": len(val),
            "train": len(train),
            "near_duplicates_excluded": None if excluded is None else len(excluded),
            "max_distance": self.max_distance if self.exclude_near_duplicates else None,
            # over the held-out samples: the distance to the nearest source of the training pool, after exclusion
            "nearest_train_distance": None if nearest is None else {"min": round(float(nearest.min()), 4), "median": round(float(np.median(nearest)), 4)},
            # byte-identical source files on both sides of the split (held-out vs the training samples used)
            "source_hash_duplicates": exact_duplicate_count(self.val_records, self.train_records),
        }

    def near_duplicates_of(self, records: list[Record], val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices of the records outside ``val`` whose source lies within ``max_distance`` of a held-out source,
        each held-out source's distance to the nearest remaining one); distances as in held_out.py."""
        others = np.setdiff1d(np.arange(len(records)), val)
        inks = source_ink(records, self.resolution)
        near, nearest = near_duplicates(inks[val], inks[others], self.max_distance)
        return others[near], nearest

    def train_dataset(self) -> Fill50kDataset:
        return Fill50kDataset(self.train_records, self.resolution, self.prompt_dropout, self.make_condition)

    def val_dataset(self) -> Fill50kDataset:
        return Fill50kDataset(self.val_records, self.resolution, 0.0, self.make_condition)

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        return DataLoader(
            EncodedDataset(dataset, self.train_encodings) if self.train_encodings is not None else dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(self.train_records) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        dataset = self.val_dataset()
        dataset = EncodedDataset(dataset, self.val_encodings) if self.val_encodings is not None else dataset
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
