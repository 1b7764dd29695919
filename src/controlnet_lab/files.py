"""Publishing a folder built under a staging name, safely when several processes (sweep jobs) build the same one."""
from __future__ import annotations

import os
import shutil
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
