"""Samples with what the locked base computes for them, read from a cache instead of recomputed each step.

A locked VAE and text encoder give the same output for the same input every time, so
their outputs are computed once per dataset, resolution and base (locked_encodings.py)
and served with the samples: ``image_encoding`` (the VAE posterior's parameters, from
which each step still draws its own latent) by sample, ``text_hidden`` /
``text_pooled`` by prompt, the empty prompt of prompt dropout included.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset


@dataclass
class LockedEncodings:
    images: torch.Tensor | None = None          # (N, ...) in the order of the dataset's samples
    text_hidden: torch.Tensor | None = None     # (P, tokens, width), one row per prompt
    text_pooled: torch.Tensor | None = None     # (P, width) where the base uses a pooled embedding
    prompt_rows: dict[str, int] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: value for name in ("images", "text_hidden", "text_pooled") if (value := getattr(self, name)) is not None}


class EncodedDataset(Dataset):
    """A dataset whose items also carry their cached encodings (the dataset's items have ``index`` and ``prompt``)."""

    def __init__(self, dataset: Dataset, encodings: LockedEncodings):
        self.dataset = dataset
        self.encodings = encodings

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> dict:
        item = self.dataset[key]
        encodings = self.encodings
        if encodings.images is not None:
            item["image_encoding"] = encodings.images[item["index"]]
        if encodings.text_hidden is not None:
            row = encodings.prompt_rows[item["prompt"]]
            item["text_hidden"] = encodings.text_hidden[row]
            if encodings.text_pooled is not None:
                item["text_pooled"] = encodings.text_pooled[row]
        return item
