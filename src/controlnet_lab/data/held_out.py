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

On any dataset, a training sample whose target or stored condition has the same bytes
as a held-out sample's (the content keys of samples.py) is dropped from training and
counted; the distance above needs stored conditions and applies where
``data.held_out.exclude_near_duplicates`` is on.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from controlnet_lab.data.samples import Samples


def source_ink(samples: Samples, rows, resolution: int) -> torch.Tensor:
    """(len(rows), resolution**2) float32: each stored condition's brightest channel in [0, 1], as the training resolution sees it."""
    inks = [samples.condition(int(row), resolution).max(axis=-1) for row in tqdm(rows, desc="reading conditions for the held-out check", unit="img", leave=False)]
    return torch.from_numpy(np.stack(inks).reshape(len(inks), -1).astype(np.float32) / 255.0)


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


def exact_duplicates(held_out: Samples, held_out_rows, candidates: Samples, candidate_rows) -> np.ndarray:
    """Boolean mask over ``candidate_rows``: True where the target or the stored condition has a held-out row's bytes."""
    def keys(samples: Samples, rows) -> list[set[str]]:
        columns = [samples.targets] + ([samples.conditions] if samples.conditions else [])
        return [{column.keys[int(row)] for row in rows} for column in columns]

    seen = keys(held_out, held_out_rows)
    columns = [candidates.targets] + ([candidates.conditions] if candidates.conditions else [])
    return np.array([any(column.keys[int(row)] in known for column, known in zip(columns, seen)) for row in candidate_rows], bool)
