"""Training from a Hugging Face dataset read as a stream (``data=hf data.streaming=true``): no pass over the whole
dataset before the first step (``datasets.load_dataset(..., streaming=True)``).

The held-out set is the first ``data.val_size`` rows of the split (or of ``data.val_split``), read once and kept in
memory as a table, so that evaluation, the fidelity curve and their cached encodings work as on any dataset. Training
reads the rest of the split through datasets' ``IterableDataset``: shuffled in a buffer of ``data.shuffle_buffer``
rows (seeded by ``data.seed`` and the epoch), divided between DDP processes (``split_dataset_by_node``) and between
DataLoader workers by shard. A row whose target or stored condition has a held-out row's bytes is dropped, as on any
dataset; ``data.size`` takes the first rows of the training stream, so smaller subsets nest in larger ones. Each
epoch's prompt-dropout draws come from (``data.seed``, epoch, process, worker) alone, and a run resumed in the middle
of an epoch reads that epoch's stream again and passes over the batches already trained, so it serves the rest of
the same batches. What needs the whole pool is refused by its key before any work (config_checks.py).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import datasets
import numpy as np
from datasets.distributed import split_dataset_by_node
from datasets.utils.file_utils import xopen
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from controlnet_lab.data.conditions import ConditionMaker
from controlnet_lab.data.dataset import chw
from controlnet_lab.data.manifest import content_key
from controlnet_lab.data.samples import (CONDITION, IMAGE, TEXT, DatasetFormatError, Samples, crop_geometry, decode_rgb, fit_condition,
                                         fit_square)

log = logging.getLogger(__name__)
UNDECODED = datasets.Image(decode=False)


def raw_bytes(image: dict, where: str) -> bytes:
    """An undecoded image cell's encoded bytes: stored in the row, or read from the file it names (local or remote)."""
    if image.get("bytes") is not None:
        return image["bytes"]
    if not image.get("path"):
        raise DatasetFormatError(f"{where}: no image")
    with xopen(image["path"], "rb") as handle:
        return handle.read()


def undecoded(stream: datasets.IterableDataset) -> datasets.IterableDataset:
    """The stream with its image columns as {bytes, path}: the bytes are what content keys hash and what is decoded."""
    for column in (IMAGE, CONDITION):
        if column in (stream.features or {}):
            stream = stream.cast_column(column, UNDECODED)
    return stream


def held_out_samples(stream: datasets.IterableDataset, count: int, origin: str, split: str) -> Samples:
    """The first ``count`` rows of ``stream`` as an in-memory table of the canonical columns (their bytes kept)."""
    rows = []
    for row in undecoded(stream).take(count):
        rows.append({TEXT: row[TEXT], **{c: {"bytes": raw_bytes(row[c], f"{origin}, split {split}, row {len(rows)}"), "path": None}
                                          for c in (IMAGE, CONDITION) if c in row}})
    if len(rows) < count:
        raise DatasetFormatError(f"data.val_size={count}: the stream of {origin}, split {split}, ended after {len(rows)} rows; "
                                 "lower data.val_size")
    features = datasets.Features({TEXT: datasets.Value("string"), **{c: datasets.Image() for c in (IMAGE, CONDITION) if c in rows[0]}})
    return Samples(datasets.Dataset.from_list(rows, features=features), origin)


class StreamedRows(IterableDataset):
    """Training items (as ControlDataset's: ``condition``, ``target``, ``prompt``, ``true_prompt``, ``index``, and
    ``source`` where conditions are stored) from a stream of canonical rows.

    ``held_out_keys``: the content keys of the held-out targets and stored conditions, whose rows are dropped.
    ``make_condition`` makes the condition from (stored condition, target, name), as for map-style data (a detector
    runs here, in the DataLoader worker). ``epoch`` and ``skip_batches`` are set by ``StreamLoader`` before each epoch.
    """

    def __init__(self, stream: datasets.IterableDataset, resolution: int, resize: dict, prompt_dropout: float, seed: int,
                 shuffle_buffer: int, make_condition: ConditionMaker, held_out_keys: tuple[set, set], batch_size: int,
                 rank: int = 0, world_size: int = 1, origin: str = ""):
        self.stream = undecoded(stream).shuffle(seed=seed, buffer_size=shuffle_buffer)
        if world_size > 1:
            self.stream = split_dataset_by_node(self.stream, rank=rank, world_size=world_size)
        self.resolution, self.resize, self.prompt_dropout, self.seed = resolution, resize, prompt_dropout, seed
        self.make_condition, self.held_out_keys, self.batch_size = make_condition, held_out_keys, batch_size
        self.rank, self.origin = rank, origin
        self.epoch = self.skip_batches = 0

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        self.stream.set_epoch(self.epoch)
        draws = np.random.default_rng((self.seed, self.epoch, self.rank, worker_id))
        # Each worker yields whole batches, taken by the loader in turn: of the first skip_batches, this worker made these.
        skip = len(range(worker_id, self.skip_batches, workers)) * self.batch_size
        position = 0
        for row in self.stream:
            where = f"{self.origin}, a streamed row"
            target_bytes = raw_bytes(row[IMAGE], where)
            condition_bytes = raw_bytes(row[CONDITION], where) if CONDITION in row else None
            if content_key(target_bytes) in self.held_out_keys[0] or (
                    condition_bytes is not None and content_key(condition_bytes) in self.held_out_keys[1]):
                continue  # the bytes of a held-out row
            dropped = bool(draws.random() < self.prompt_dropout)
            position += 1
            if position <= skip:
                continue
            yield self.item(target_bytes, condition_bytes, row[TEXT], dropped, position - 1)

    def item(self, target_bytes: bytes, condition_bytes: bytes | None, prompt: str, dropped: bool, index: int) -> dict:
        target = decode_rgb(target_bytes, None, f"{self.origin}, streamed row {index}")
        item, source = {}, None
        if condition_bytes is not None:
            condition = decode_rgb(condition_bytes, None, f"{self.origin}, streamed row {index}")
            source = fit_condition(condition, target.shape[:2], self.resolution, self.resize["condition"])
            item["source"] = chw(source.astype(np.float32) / 255.0)
        geometry = crop_geometry(*target.shape[:2], self.resolution)
        target = fit_square(target, self.resolution, self.resize["image"])
        condition = self.make_condition(source, target, f"streamed/{index}")
        item.update({"condition": chw(condition.astype(np.float32) / 255.0), "target": chw(target.astype(np.float32) / 127.5 - 1.0),
                     "prompt": "" if dropped else prompt, "true_prompt": prompt, "index": index, "geometry": geometry})
        return item


class StreamLoader(DataLoader):
    """A DataLoader over ``StreamedRows`` that tells it, before each epoch, which epoch this is (Lightning sets no epoch
    on an iterable dataset) and, for the epoch a run resumed in, how many batches were already trained. Its workers
    start anew each epoch, so they see both."""

    def __init__(self, rows: StreamedRows, resume_epoch: int, resume_batches: int, **kwargs):
        super().__init__(rows, batch_size=rows.batch_size, persistent_workers=False, **kwargs)
        self.next_epoch, self.resume_epoch, self.resume_batches = resume_epoch, resume_epoch, resume_batches

    def __iter__(self):
        self.dataset.epoch = self.next_epoch
        self.dataset.skip_batches = self.resume_batches if self.next_epoch == self.resume_epoch else 0
        self.next_epoch += 1
        return super().__iter__()
