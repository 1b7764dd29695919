"""Computing and caching what the locked base computes for a dataset (data/encoded.py serves it).

The cache file is keyed by the base's locked weights (a fingerprint of the saved VAE and
text encoder), the samples (the content of targets, conditions and prompts, in order), the resolution and
which parts are cached; a different base, dataset, subset or resolution gets its own
file. Files are written to a temporary name and renamed, so an interrupted run never
leaves a partial cache behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from controlnet_lab.data.encoded import LockedEncodings
from controlnet_lab.data.dataset import ControlDataset

log = logging.getLogger(__name__)


@torch.no_grad()
def compute_encodings(base, dataset: ControlDataset, images: bool, text: bool, batch_size: int = 64) -> LockedEncodings:
    """The base's image encodings of ``dataset``'s targets (when ``images`` and the base has an encoder worth caching)
    and text encodings of its prompts and of "" (when ``text``)."""
    encodings = LockedEncodings()
    if images and base.caches_images:
        # The targets are read directly, not through the dataset or a DataLoader: computing the cache must not draw
        # from the run's random state (prompt dropout, loader seeds), so a run that computes it and one that reads it train alike.
        device = base.unet.device
        parts = []
        for start in tqdm(range(0, len(dataset), batch_size), desc="caching image encodings", unit="batch"):
            targets = np.stack([dataset.target(i) for i in range(start, min(start + batch_size, len(dataset)))])
            targets = torch.from_numpy(targets).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            parts.append(base.image_encoding(targets.to(device)).float().cpu())
        encodings.images = torch.cat(parts)
    if text:
        prompts = sorted(set(dataset.prompts) | {""})
        hidden, pooled = [], []
        for start in tqdm(range(0, len(prompts), batch_size), desc="caching text encodings", unit="batch"):
            h, p = base.encode_prompt(prompts[start : start + batch_size])
            hidden.append(h.float().cpu())
            pooled.append(None if p is None else p.float().cpu())
        encodings.text_hidden = torch.cat(hidden)
        encodings.text_pooled = None if pooled[0] is None else torch.cat(pooled)
        encodings.prompt_rows = {prompt: row for row, prompt in enumerate(prompts)}
    return encodings


def encodings_key(base_fingerprint: str, dataset: ControlDataset, images: bool, text: bool) -> str:
    payload = json.dumps({"base": base_fingerprint, "samples": dataset.fingerprint(), "resolution": dataset.resolution,
                          "images": images, "text": text}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cached_encodings(base, base_fingerprint: str, dataset: ControlDataset, cache_dir: Path, images: bool = True,
                     text: bool = True) -> LockedEncodings:
    """``compute_encodings`` through the disk cache: read when present, computed and stored otherwise."""
    path = Path(cache_dir) / f"encodings-{encodings_key(base_fingerprint, dataset, images, text)}.safetensors"
    if path.is_file():
        cached = read_encodings(path, len(dataset) if images else None)
        if cached is not None:
            return cached
    encodings = compute_encodings(base, dataset, images, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    save_file({k: v.contiguous() for k, v in encodings.tensors().items()}, str(partial))
    path.with_suffix(".json").write_text(json.dumps(encodings.prompt_rows))
    os.replace(partial, path)  # the tensors last: their presence means the pair is complete
    return encodings


def read_encodings(path: Path, samples: int | None) -> LockedEncodings | None:
    """The cached encodings, or None (with a warning naming the file) when the file or its prompt index cannot be read
    or does not hold one encoding per sample: such a cache is computed again, never trained on."""
    try:
        tensors = load_file(str(path))
        prompts = json.loads(path.with_suffix(".json").read_text())
        if samples is not None and "images" in tensors and len(tensors["images"]) != samples:
            raise ValueError(f"{len(tensors['images'])} image encodings for {samples} samples")
    except Exception as err:  # safetensors raises its own error type for a file cut short
        log.warning(f"the cached encodings {path} are unreadable ({type(err).__name__}: {err}): computing them again")
        return None
    return LockedEncodings(tensors.get("images"), tensors.get("text_hidden"), tensors.get("text_pooled"), prompts)
