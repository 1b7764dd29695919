"""Publishing a folder built under a staging name, safely when several processes (sweep jobs) build the same one; and
files written whole or not at all."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def publish(staging: Path, folder: Path, marker: str) -> Path:
    """Rename the complete ``staging`` folder to ``folder``. If another process published ``folder`` first (it holds
    ``marker``), its copy is kept and this one discarded: both were built from the same cache key."""
    try:
        os.replace(staging, folder)
    except OSError:
        if not (folder / marker).is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def build_published(folder: Path, marker: str, build: Callable[[Path], object]):
    """``build(staging)`` writes into a staging folder beside ``folder``, which is published as ``folder`` when
    ``build`` returns (an interrupted or failed build leaves nothing behind); returns what ``build`` returned."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        result = build(staging)
        publish(staging, folder, marker)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def write_json(path: Path, value) -> None:
    """``value`` as JSON at ``path``, written to a temporary name and renamed: a killed write leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as partial:
        json.dump(value, partial)
    os.replace(partial.name, path)
