"""Rebuilding an embedded base from its recipe, compared bit for bit with the copy shipped for that recipe
(``src/build_base.py``, ``make base``), and replacing the shipped copy with it when asked (``ship=true``).

Pretraining is seeded and runs in one process, so a rebuild on the same kind of CPU with the same thread count gives
the same bytes; another CPU (another instruction set in MKL and oneDNN's kernels) may round differently, which the
record names rather than hides.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, open_dict

from controlnet_lab.bases.fingerprint import base_fingerprint
from controlnet_lab.bases.pretraining import SHIPPED_BASES
from controlnet_lab.bases.sources import EmbeddedBaseSource
from controlnet_lab.files import write_json
from controlnet_lab.data.datamodule import build_datamodule
from controlnet_lab.locked_base import base_folder, base_source


def rebuild_and_compare(cfg: DictConfig) -> dict:
    """Pretrain ``cfg``'s embedded base from its recipe into ``<paths.cache_dir>/rebuilt`` (never from the shipped copy)
    and compare its weights' fingerprint with the shipped copy of the same recipe key; ``cfg.ship``: publish the rebuilt
    base as the shipped copy. Returns the record written to the run directory's ``build_base.json``."""
    with open_dict(cfg):
        cfg.model.base.shipped = False
    source = base_source(cfg)
    if not isinstance(source, EmbeddedBaseSource) or source.saved:
        raise ValueError(f"model={cfg.model.name} names a saved base ({cfg.model.base.get('pretrained_model_name_or_path')}), "
                         "not a recipe: only the embedded bases (model=tiny, model=tiny_sd) are built here")
    started = time.time()
    L.seed_everything(cfg.seed, workers=True)
    data = build_datamodule(cfg.data)
    rebuilt = base_folder(cfg, source, data, Path(cfg.paths.cache_dir) / "rebuilt")
    shipped = SHIPPED_BASES / rebuilt.name
    fingerprint = base_fingerprint(rebuilt)
    shipped_fingerprint = base_fingerprint(shipped) if (shipped / "model_index.json").is_file() else None
    record = {
        "recipe_key": rebuilt.name,
        "rebuilt": {"path": str(rebuilt), "fingerprint": fingerprint, "seconds": round(time.time() - started, 1),
                    "built_by": json.loads((rebuilt / "pretrain_config.json").read_text()).get("built_by")},
        "shipped": None if shipped_fingerprint is None else {"path": str(shipped), "fingerprint": shipped_fingerprint},
        "bit_for_bit_equal": None if shipped_fingerprint is None else fingerprint == shipped_fingerprint,
        "shipped_now": bool(cfg.ship),
    }
    if cfg.ship:
        shutil.rmtree(shipped, ignore_errors=True)
        shutil.copytree(rebuilt, shipped)
    write_json(Path(cfg.paths.output_dir) / "build_base.json", record)
    return record


def summary(record: dict) -> str:
    """One line on what the rebuild found."""
    if record["shipped"] is None:
        found = f"no shipped copy of recipe {record['recipe_key']}"
    elif record["bit_for_bit_equal"]:
        found = f"bit for bit equal to the shipped copy {record['shipped']['path']}"
    else:
        found = (f"differs from the shipped copy {record['shipped']['path']} (fingerprint {record['shipped']['fingerprint'][:12]} "
                 f"against {record['rebuilt']['fingerprint'][:12]}; another CPU type rounds differently)")
    shipped = f"; now shipped as {SHIPPED_BASES / record['recipe_key']}" if record["shipped_now"] else ""
    return f"rebuilt {record['rebuilt']['path']} from the recipe in {record['rebuilt']['seconds']} s: {found}{shipped}"
