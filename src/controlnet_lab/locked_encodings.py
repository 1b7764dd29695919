"""Computing and caching what the locked base computes for a dataset (data/encoded.py stores and serves it).

Two kinds of store live in ``<cache>/encodings/``:

- ``images-<key>``: the VAE posterior of every sample's target, keyed by the VAE's own
  weights and dtype (``module_fingerprint``), the samples (the content of targets,
  conditions and prompts, in order) and the resolution. Keyed by the VAE alone, not the
  whole base, so that the embedded ``tiny_sd`` base's pretraining, which encodes the same
  training pool with the same (by then frozen) VAE, and the ControlNet's run share one pass.
- ``text-<key>``: the text encodings of every distinct prompt and of "", keyed by the
  base's fingerprint and the prompts.

Each is computed batch by batch (``model.base.encode_batch_size``) and written shard by
shard into a staging folder that is renamed when complete, so computing holds one shard
in memory and an interrupted pass leaves nothing behind; stored in the dtype the locked
part computes in (``model.base.cache_dtype: auto``), so reading a row and casting it to
float32 gives what the module would compute itself, up to the rounding a row's place in
its batch brings on some CPUs (AVX-512). A store that is cut
short, from another version, or does not hold one row per sample is reported by path,
removed and computed again, never trained on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from controlnet_lab.data.dataset import ControlDataset
from controlnet_lab.data.encoded import INDEX, EncodingStore, LockedEncodings, StoreError, StoreWriter
from controlnet_lab.files import build_published

log = logging.getLogger(__name__)
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def encodings_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "encodings"


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes, bytes): the same weights in the same dtype, wherever
    they were loaded from or whether they were ever saved."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def cache_dtype(setting: str, computed: torch.dtype) -> torch.dtype:
    """``model.base.cache_dtype``: ``auto`` stores what the locked part computes in; a named dtype converts to it."""
    if setting == "auto":
        return computed
    if setting not in CACHE_DTYPES:
        raise ValueError(f"model.base.cache_dtype={setting!r}: choose auto or one of {', '.join(CACHE_DTYPES)}")
    return CACHE_DTYPES[setting]


def key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class TargetImages(Dataset):
    """A dataset's targets in [-1, 1], channels first, read directly rather than through its items: computing the
    cache must not draw from the run's random state (prompt dropout), so a run that computes it and one that reads
    it train alike."""

    def __init__(self, dataset: ControlDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.dataset.target(index)).permute(2, 0, 1).float() / 127.5 - 1.0


def stored(folder: Path, write: Callable[[Path], None], rows: int) -> EncodingStore:
    """The store at ``folder``, written first by ``write(staging)`` unless a whole one with ``rows`` rows is there."""
    if folder.exists():
        try:
            store = EncodingStore(folder)
            if store.rows != rows:
                raise StoreError(f"{store.rows} rows stored for {rows}")
            return store
        except StoreError as err:
            log.warning(f"the cached encodings {folder} are unusable ({err}): computing them again")
            shutil.rmtree(folder, ignore_errors=True)
    build_published(folder, INDEX, write)
    return EncodingStore(folder)


@torch.no_grad()
def image_encodings(base, dataset: ControlDataset, cache_dir: Path, batch_size: int = 64, dtype: str = "auto",
                    workers: int = 0) -> EncodingStore:
    """The VAE posterior of every target of ``dataset``, computed once per VAE, samples and resolution (``workers``
    processes decode the images while the VAE encodes)."""
    vae = base.vae
    stored_dtype = cache_dtype(dtype, vae.dtype)
    folder = encodings_dir(cache_dir) / "images-{}".format(key({
        "vae": module_fingerprint(vae), "samples": dataset.fingerprint(), "resolution": dataset.resolution,
        "dtype": str(stored_dtype)}))

    def write(staging: Path) -> None:
        writer = StoreWriter(staging, stored_dtype)
        loader = DataLoader(TargetImages(dataset), batch_size=batch_size, num_workers=workers, generator=torch.Generator())
        for targets in tqdm(loader, desc=f"encoding {len(dataset)} images with the locked VAE (once; cached)", unit="batch"):
            writer.add(images=base.image_encoding(targets.to(vae.device)))
        writer.finish()

    return stored(folder, write, len(dataset))


@torch.no_grad()
def text_encodings(base, base_fingerprint: str, prompts: list[str], cache_dir: Path, batch_size: int = 64,
                   dtype: str = "auto") -> EncodingStore:
    """The text encodings of each of ``prompts`` (distinct), in that order, once per base and prompt list."""
    stored_dtype = cache_dtype(dtype, base.text_encoder.dtype)
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    folder = encodings_dir(cache_dir) / f"text-{key({'base': base_fingerprint, 'prompts': digest, 'dtype': str(stored_dtype)})}"

    def write(staging: Path) -> None:
        writer = StoreWriter(staging, stored_dtype)
        for start in tqdm(range(0, len(prompts), batch_size), desc=f"encoding {len(prompts)} prompts (once; cached)", unit="batch"):
            hidden, pooled = base.encode_prompt(prompts[start : start + batch_size])
            writer.add(text_hidden=hidden, **({} if pooled is None else {"text_pooled": pooled}))
        writer.finish(prompts=prompts)

    return stored(folder, write, len(prompts))


def cached_encodings(base, base_fingerprint: str, dataset: ControlDataset, cache_dir: Path, images: bool = True,
                     text: bool = True, batch_size: int = 64, dtype: str = "auto", workers: int = 0) -> LockedEncodings:
    """The base's image encodings of ``dataset``'s targets (when ``images`` and the base has an encoder worth caching)
    and text encodings of its prompts and of "" (when ``text``), from the disk cache, computed first if absent."""
    encodings = LockedEncodings()
    if images and base.caches_images:
        encodings.images = image_encodings(base, dataset, cache_dir, batch_size, dtype, workers).column("images")
    if text:
        store = text_encodings(base, base_fingerprint, sorted(set(dataset.prompts) | {""}), cache_dir, batch_size, dtype)
        encodings.text_hidden, encodings.text_pooled = store.column("text_hidden"), store.column("text_pooled")
        encodings.prompt_rows = {prompt: row for row, prompt in enumerate(store.extra["prompts"])}
    return encodings


def attach_locked_encodings(base, data, base_fingerprint: str, cache_dir: Path, device: str, **settings) -> None:
    """Serve a data module's training and held-out batches with the locked ``base``'s cached VAE and text encodings
    (``model.base.cache_encodings``), computed on ``device``; ``settings``: cached_encodings' batch size, dtype and
    workers. Streamed training rows are encoded as they stream by; only the held-out set's are cached then."""
    base.to(device)
    if data.streaming:
        log.info("data.streaming=true: the training rows are encoded as they stream by (only the held-out set's encodings are cached)")
    else:
        data.train_encodings = cached_encodings(base, base_fingerprint, data.train_dataset(), cache_dir, **settings)
    data.val_encodings = cached_encodings(base, base_fingerprint, data.val_dataset(), cache_dir, **settings)
    base.to("cpu")
