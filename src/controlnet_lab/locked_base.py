"""The run's locked base: its config source (``model.base``), its folder (saved, fetched, shipped or pretrained here),
the dtype it is kept in, and what results.json says of it."""
from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

MIXED_PRECISION_DTYPES = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}


def base_source(cfg: DictConfig):
    """The ``model.base`` config instantiated from its ``_target_`` (bases/sources.py)."""
    return hydra.utils.instantiate(OmegaConf.to_container(cfg.model.base, resolve=True), _convert_="all")


def base_folder(cfg: DictConfig, source, data, cache_dir: Path | None = None) -> Path:
    """The locked base's folder: saved, fetched, shipped, or pretrained here on the run's training pool (``data``, a
    data module) and cached in ``cache_dir``, by default the run's ``paths.cache_dir``.

    An embedded base is pretrained in this one process on one device of the run's accelerator: under DDP,
    Lightning would otherwise start the other processes for the pretraining, each of which would build and
    publish a base of its own (one such base was published without its text encoder's weights)."""
    accelerator = {"accelerator": cfg.trainer.accelerator, "devices": 1}
    return source.folder(data, cfg.data.resolution, Path(cache_dir or cfg.paths.cache_dir), accelerator)


def locked_dtype(setting: str, precision) -> str:
    """``model.base.dtype``; ``auto`` follows the trainer's mixed precision (bf16-mixed: the locked parts in bfloat16, as
    diffusers' script keeps them in its weight_dtype), float32 otherwise. The ControlNet always stays float32."""
    if setting == "auto":
        return MIXED_PRECISION_DTYPES.get(str(precision), "float32")
    return setting


def base_report(base_path: Path, fingerprint: str, unet_dtype) -> dict:
    """What results.json says of the locked base: its folder, fingerprint, the dtype its UNet was kept in during
    training and, for a base pretrained here, its pretraining report."""
    report = {"path": str(base_path), "fingerprint": fingerprint, "dtype": str(unet_dtype).removeprefix("torch.")}
    pretraining = base_path / "pretrain_config.json"
    if pretraining.is_file():
        recorded = json.loads(pretraining.read_text())
        report["pretraining"] = {k: v for k, v in recorded.items() if k not in ("model", "data_root")}
    return report
