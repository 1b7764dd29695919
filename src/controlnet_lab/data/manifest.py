"""The one pass over a dataset's image files, paid once: each file's content key, pixel size and a check that it
decodes, computed in parallel and kept in a manifest in the cache.

A dataset's first start reads every image file once, in ``data.num_proc`` processes (all
the machine's cores by default), with a progress bar and its rate: the sha256 of the
file's bytes (the content key the caches and the held-out split use, samples.py), its
size from the header, and PIL's ``verify``. The results are kept in
``<cache>/manifests/<origin>.json`` under each file's path with its size and
modification time, so a later start only stats the files; a file whose size or time
changed is read again. A manifest that cannot be read (cut short, another version) is
reported by path and rebuilt. Files whose bytes the dataset stores itself (a
``save_to_disk`` copy, a Hub dataset) are keyed by the dataset's own fingerprint instead
(``stored_keys``).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from controlnet_lab.files import write_json

log = logging.getLogger(__name__)
MANIFEST_VERSION = 1


class UnreadableImage(ValueError):
    """An image file that is missing or does not decode; the message names the file (the caller adds where it is named)."""


class FileFacts(NamedTuple):  # a tuple: one is made per file at every start
    key: str      # sha256 of the file's bytes, 20 hex digits
    width: int
    height: int


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


def inspect_file(path: str) -> FileFacts | str:
    """The facts of one image file, or why it is unreadable (a string: worker processes return, never raise)."""
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            image.verify()
    except FileNotFoundError:
        return f"image {path} does not exist"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"image {path} is unreadable ({err})"
    return FileFacts(content_key(data), width, height)


def default_num_proc(num_proc: int | None) -> int:
    if num_proc is not None and num_proc < 1:
        raise ValueError(f"data.num_proc must be >= 1 (or null: all the machine's cores), got {num_proc}")
    return num_proc or len(os.sched_getaffinity(0))


class Manifest:
    """The facts of one origin's files (``origin``: the folder or dataset they belong to), read once and kept."""

    def __init__(self, cache_dir: Path | str | None, origin: str, num_proc: int | None = None):
        self.cache_dir = cache_dir
        self.path = None if cache_dir is None else (
            Path(cache_dir) / "manifests" / f"{hashlib.sha256(origin.encode()).hexdigest()[:16]}.json")
        self.origin = origin
        self.num_proc = default_num_proc(num_proc)
        self.entries: dict[str, list] = self._read()

    def _read(self) -> dict[str, list]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            recorded = json.loads(self.path.read_text())
            if recorded.get("version") != MANIFEST_VERSION:
                raise ValueError(f"version {recorded.get('version')}, this code reads {MANIFEST_VERSION}")
            return recorded["files"]
        except (OSError, ValueError, KeyError, AttributeError) as err:
            log.warning(f"the manifest {self.path} is unreadable ({type(err).__name__}: {err}): reading the images again")
            return {}

    def facts(self, paths: list[str], where: Callable[[int], str]) -> list[FileFacts]:
        """The facts of each of ``paths`` (``where(i)`` names where path i is listed; asked only for an error): from the
        manifest where the file's size and modification time are those recorded, read (in parallel) otherwise."""
        found: list[FileFacts | None] = []
        stamps = []
        entries = self.entries
        for i, path in enumerate(paths):
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                raise UnreadableImage(f"{where(i)}: image {path} does not exist") from None
            size, time = stat.st_size, stat.st_mtime_ns
            entry = entries.get(path)
            found.append(FileFacts(entry[2], entry[3], entry[4]) if entry and entry[0] == size and entry[1] == time else None)
            stamps.append((size, time))
        todo = sorted({path for path, facts in zip(paths, found) if facts is None})
        if todo:
            computed = dict(zip(todo, self._inspect(todo)))
            for i, path in enumerate(paths):
                result = computed.get(path)
                if isinstance(result, str):
                    raise UnreadableImage(f"{where(i)}: {result}")
                if result is not None:
                    found[i] = result
                    self.entries[path] = [*stamps[i], result.key, result.width, result.height]
            self._write()
        return found

    def _inspect(self, paths: list[str]) -> list[FileFacts | str]:
        progress = tqdm(total=len(paths), desc=f"first pass over {len(paths)} images of {self.origin} (once; kept in a manifest)",
                        unit="img", disable=len(paths) < 256)
        results = []
        if self.num_proc == 1 or len(paths) < 256:
            for path in paths:
                results.append(inspect_file(path))
                progress.update()
        else:
            # Large chunks, fewer round trips to the workers (on 2 cores 250 files a chunk ran about 4% faster than 64).
            chunk = max(16, min(256, len(paths) // (self.num_proc * 4)))
            with multiprocessing.get_context("fork").Pool(self.num_proc) as pool:
                for result in pool.imap(inspect_file, paths, chunksize=chunk):
                    results.append(result)
                    progress.update()
        progress.close()
        return results

    def _write(self) -> None:
        """Written to a temporary name and renamed: a killed pass leaves the previous manifest (or none)."""
        if self.path is not None:
            write_json(self.path, {"version": MANIFEST_VERSION, "origin": self.origin, "files": self.entries})


def stored_keys(cache_dir: Path | str | None, fingerprint: str | None, column: str, compute) -> list[str]:
    """The content keys of a column whose bytes the dataset stores, kept under the dataset's own fingerprint
    (``datasets.Dataset._fingerprint``, which changes with its content); ``compute()`` makes them when absent."""
    if cache_dir is None or not fingerprint:
        return compute()
    path = Path(cache_dir) / "manifests" / f"stored-{fingerprint}-{hashlib.sha256(column.encode()).hexdigest()[:8]}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            log.warning(f"the manifest {path} is unreadable ({err}): hashing the images again")
    keys = compute()
    write_json(path, keys)
    return keys
