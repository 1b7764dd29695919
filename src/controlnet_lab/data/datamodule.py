"""Lightning DataModule over a fill50k-format folder: a fixed held-out split and nested training subsets."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from controlnet_lab.data.conditions import ConditionMaker, outline
from controlnet_lab.data.fill50k import Fill50kDataset, Record, read_index


def split_indices(total: int, val_size: int, size: int | None, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices from one seeded permutation.

    The validation set is the permutation's first ``val_size`` items, the same for
    every training size; training takes the first ``size`` of the rest, so smaller
    subsets are nested inside larger ones.
    """
    if val_size < 1 or val_size >= total:
        raise ValueError(f"data.val_size must be in [1, {total - 1}] for a dataset of {total} samples, got {val_size}")
    available = total - val_size
    if size is None:
        size = available
    if size < 1:
        raise ValueError(f"data.size must be >= 1, got {size}")
    if size > available:
        raise ValueError(f"data.size={size} exceeds the {available} training samples available ({total} in the dataset minus data.val_size={val_size})")
    order = np.random.default_rng(split_seed).permutation(total)
    return order[val_size : val_size + size], order[:val_size]


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
        self.train_records: list[Record] = []
        self.val_records: list[Record] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_records:
            return
        records = read_index(self.root)
        train, val = split_indices(len(records), self.val_size, self.size, self.split_seed)
        self.train_records = [records[i] for i in train]
        self.val_records = [records[i] for i in val]

    def train_dataset(self) -> Fill50kDataset:
        return Fill50kDataset(self.train_records, self.resolution, self.prompt_dropout, self.make_condition)

    def val_dataset(self) -> Fill50kDataset:
        return Fill50kDataset(self.val_records, self.resolution, 0.0, self.make_condition)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset(),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(self.train_records) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset(), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
