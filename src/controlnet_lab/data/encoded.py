"""Samples with what the locked base computes for them, read from a cache instead of recomputed each step.

A locked VAE and text encoder give the same output for the same input every time, so
their outputs are computed once per dataset, resolution and base (locked_encodings.py)
and served with the samples: ``image_encoding`` (the VAE posterior's parameters, from
which each step still draws its own latent) by sample, ``text_hidden`` /
``text_pooled`` by prompt, the empty prompt of prompt dropout included.

On disk the encodings are a folder of safetensors shards and an ``index.json``
(``EncodingStore``); a row is read through the shard's memory map when asked for, so
a process holds no more of the cache than the rows it serves, and the DDP processes of
one machine share the pages the system caches instead of each loading a copy.
"""
from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

STORE_VERSION = 1
INDEX = "index.json"
SHARD_BYTES = 32 << 20  # what a writer holds before it writes a shard (twice that while it joins the batches)
OPEN_SHARDS = 64        # memory-mapped shards a process keeps open


class StoreError(ValueError):
    """A stored encoding folder that cannot be trusted (cut short, from another version, files changed)."""


class StoredRows:
    """One named tensor of an ``EncodingStore``, indexed by row like the tensor itself, read lazily as float32.

    Each process opens the shards on first use (``safe_open`` memory-maps them), so the object can be handed to
    DataLoader workers and DDP processes: none of them copies the file into its own memory."""

    def __init__(self, folder: Path, name: str, shards: list[dict]):
        self.folder, self.name = Path(folder), name
        self.files = [shard["file"] for shard in shards]
        self.ends = []
        for shard in shards:
            self.ends.append((self.ends[-1] if self.ends else 0) + shard["rows"])
        self._handles: OrderedDict[int, object] = OrderedDict()  # the shards open now, least recently used first
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": OrderedDict(), "_pid": None}

    def _slice(self, shard: int):
        if self._pid != os.getpid():  # a forked worker must not share its parent's handles
            self._handles, self._pid = OrderedDict(), os.getpid()
        if shard in self._handles:
            self._handles.move_to_end(shard)
        else:
            if len(self._handles) >= OPEN_SHARDS:  # a cache of millions of rows has thousands of shards: bound the open files
                self._handles.popitem(last=False)
            self._handles[shard] = safe_open(str(self.folder / self.files[shard]), framework="pt")
        return self._handles[shard].get_slice(self.name)

    def __getitem__(self, index) -> torch.Tensor:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)} in {self.folder}")
        shard = bisect.bisect_right(self.ends, index)
        row = index - (self.ends[shard - 1] if shard else 0)
        return self._slice(shard)[row : row + 1][0].float()


class EncodingStore:
    """A folder of shards written by ``StoreWriter``: ``index.json`` lists the shards (file, rows, bytes), the tensors'
    names, the version and whatever the writer recorded (``extra``)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index = read_index(self.folder)

    @property
    def rows(self) -> int:
        return self.index["rows"]

    @property
    def extra(self) -> dict:
        return self.index.get("extra", {})

    def column(self, name: str) -> StoredRows | None:
        return StoredRows(self.folder, name, self.index["shards"]) if name in self.index["names"] else None


def read_index(folder: Path) -> dict:
    """The store's index, checked against the files: a missing index, another version, a missing shard or one whose
    size differs from the index's (cut short, rewritten) is a ``StoreError`` naming the file."""
    path = folder / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if index.get("version") != STORE_VERSION:
        raise StoreError(f"{path}: written by store version {index.get('version')}, this code reads {STORE_VERSION}")
    for shard in index["shards"]:
        file = folder / shard["file"]
        size = file.stat().st_size if file.is_file() else None
        if size != shard["bytes"]:
            raise StoreError(f"{file}: {'missing' if size is None else f'{size} bytes'}, the index says {shard['bytes']}")
    return index


class StoreWriter:
    """Writes rows batch by batch into shards of about ``shard_bytes`` each, so that writing a cache of any size holds
    one shard in memory; ``finish`` writes the index last, so a folder without one is incomplete."""

    def __init__(self, folder: Path, dtype: torch.dtype, shard_bytes: int = SHARD_BYTES):
        self.folder, self.dtype, self.shard_bytes = Path(folder), dtype, shard_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.pending_rows = self.pending_bytes = 0
        self.shards: list[dict] = []
        self.names: list[str] = []

    def add(self, **columns: torch.Tensor) -> None:
        """One batch of rows of each named tensor (the same number of rows each)."""
        for name, value in columns.items():
            value = value.detach().to("cpu", self.dtype)
            self.pending.setdefault(name, []).append(value)
            self.pending_bytes += value.numel() * value.element_size()
        self.pending_rows += len(next(iter(columns.values())))
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending_rows:
            return
        file = f"shard-{len(self.shards):05d}.safetensors"
        save_file({name: torch.cat(parts).contiguous() for name, parts in self.pending.items()}, str(self.folder / file))
        self.shards.append({"file": file, "rows": self.pending_rows, "bytes": (self.folder / file).stat().st_size})
        self.names = sorted(self.pending)
        self.pending, self.pending_rows, self.pending_bytes = {}, 0, 0

    def finish(self, **extra) -> None:
        self.flush()
        index = {"version": STORE_VERSION, "rows": sum(s["rows"] for s in self.shards), "names": self.names,
                 "dtype": str(self.dtype).removeprefix("torch."), "shards": self.shards, "extra": extra}
        (self.folder / INDEX).write_text(json.dumps(index))


@dataclass
class LockedEncodings:
    images: StoredRows | torch.Tensor | None = None       # one row per sample, in the order of the dataset's samples
    text_hidden: StoredRows | torch.Tensor | None = None  # (P, tokens, width), one row per prompt
    text_pooled: StoredRows | torch.Tensor | None = None  # (P, width) where the base uses a pooled embedding
    prompt_rows: dict[str, int] = field(default_factory=dict)


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
