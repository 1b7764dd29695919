"""Held-out means unseen: how close a training sample's source may lie to a held-out one.

The distance between two source (outline) images a and b, each read as its ink (the
brightest channel, in [0, 1]) at the training resolution, is the fraction of their ink
that differs:

    d(a, b) = sum |a - b| / (sum a + sum b)

0 for identical images, 1 for outlines that share no pixel. On the synthetic 32 px
outlines (1 px ring, radius 7.2 px), moving the centre by 0.1 / 0.25 / 0.5 / 1 / 2 px
gives 0.06 / 0.14 / 0.27 / 0.49 / 0.75; changing the radius by the same amounts gives
0.09 / 0.21 / 0.42 / 0.74 / 0.99 (several of these are tested). Two sources closer than
``max_distance`` (default 0.2: about a 0.4 px shift) are near-duplicates.

For folders the harness did not make, exact duplicates are also counted by a hash of
the source file's bytes, and reported (not dropped).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from controlnet_lab.data.fill50k import Record, load_rgb


def source_ink(records: Sequence[Record], resolution: int) -> torch.Tensor:
    """(N, resolution**2) float32: each source's brightest channel in [0, 1], as the training resolution sees it."""
    inks = [load_rgb(record.source, resolution).max(axis=-1) for record in tqdm(records, desc="reading sources for the held-out check", unit="img", leave=False)]
    return torch.from_numpy(np.stack(inks).reshape(len(records), -1).astype(np.float32) / 255.0)


def outline_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) matrix of d(a_i, b_j) (module docstring) between rows of ink."""
    totals = a.sum(1, keepdim=True) + b.sum(1)[None]
    return torch.cdist(a, b, p=1) / totals.clamp_min(1e-8)


def near_duplicates(held_out: torch.Tensor, candidates: torch.Tensor, max_distance: float,
                    chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(boolean mask over ``candidates``: True where the candidate lies within ``max_distance`` of any held-out
    source; each held-out source's distance to its nearest candidate outside that mask), in one pass."""
    near, nearest = [], torch.full((len(held_out),), float("inf"))
    for start in range(0, len(candidates), chunk):
        distance = outline_distance(held_out, candidates[start : start + chunk])
        near.append((distance < max_distance).any(0))
        kept = distance[:, ~near[-1]]
        if kept.numel():
            nearest = torch.minimum(nearest, kept.min(1).values)
    return (torch.cat(near).numpy() if near else np.zeros(0, bool)), nearest.numpy()


def file_hash(record: Record) -> str:
    return hashlib.sha256(record.source.read_bytes()).hexdigest()


def exact_duplicate_count(held_out: Sequence[Record], training: Sequence[Record]) -> int:
    """How many training samples have a source file byte-identical to a held-out sample's."""
    held_out_hashes = {file_hash(record) for record in held_out}
    return sum(file_hash(record) in held_out_hashes for record in training)
