"""The training task behind src/train.py: data, locked base, ControlNet, fit, oracle evaluation, results.json."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import resource
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from controlnet_lab.base import pretrained_base
from controlnet_lab.config_checks import check_train_config
from controlnet_lab.data.conditions import condition_maker
from controlnet_lab.data.datamodule import Fill50kDataModule
from controlnet_lab.data.synthetic import SyntheticFill50kSpec, write_fill50k
from controlnet_lab.evaluation import PROMPT_SETTINGS, evaluate_oracle, palette_of
from controlnet_lab.images import save_grid
from controlnet_lab.module import ControlNetModule


def dataset_root(cfg: DictConfig) -> Path:
    """The fill50k-format folder to read: ``data.root``, or the synthetic one generated into the cache."""
    if cfg.data.generator is None:
        return Path(cfg.data.root)
    generator = OmegaConf.to_container(cfg.data.generator, resolve=True)
    spec = SyntheticFill50kSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in generator.items()})
    spec.validate()
    key = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode()).hexdigest()[:16]
    return write_fill50k(spec, Path(cfg.paths.cache_dir) / "data" / f"synthetic-{key}")


def build_datamodule(cfg: DictConfig, root: Path) -> Fill50kDataModule:
    """The run's DataModule, set up: every record is read and checked now, before any training."""
    data = Fill50kDataModule(
        root, cfg.data.resolution, cfg.data.batch_size, cfg.data.val_size, cfg.data.size,
        cfg.data.prompt_dropout, cfg.data.split_seed, cfg.data.num_workers,
        condition_maker(cfg.data.condition, cfg.data.resolution, cfg.data.detector_weights, tuple(cfg.data.canny_thresholds)),
    )
    data.setup()
    return data


def oracle_scores(cfg: DictConfig, module: ControlNetModule, data: Fill50kDataModule) -> dict:
    """The final oracle evaluation on the held-out split, with the run's sampling and eval settings."""
    return evaluate_oracle(
        module.pipeline, module.controlnet, data.val_dataset(), palette_of([r.prompt for r in data.train_records + data.val_records]),
        count=cfg.eval.num_images, batch_size=cfg.eval.batch_size, seed=cfg.eval.seed,
        num_inference_steps=cfg.model.sampling.num_inference_steps, guidance_scale=cfg.model.sampling.guidance_scale,
    )


def base_folder(cfg: DictConfig, root: Path) -> Path:
    if cfg.model.base.pretrained_path:
        return Path(cfg.model.base.pretrained_path)
    accelerator = {"accelerator": cfg.trainer.accelerator, "devices": cfg.trainer.devices}
    return pretrained_base(cfg.model.base, root, cfg.data.resolution, Path(cfg.paths.cache_dir) / "base", accelerator)


def wandb_identity() -> dict:
    """W&B group and name: the sweep's directory and the job's overrides, so multirun jobs line up as one group."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return {"group": Path(hydra_cfg.sweep.dir).name, "name": hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}"}
    return {"group": "single-runs", "name": Path(hydra_cfg.runtime.output_dir).name}


def instantiate_logger(logger_cfg: DictConfig):
    """A logger from its config; a WandbLogger without group or name gets them from the Hydra run."""
    if logger_cfg._target_.endswith("WandbLogger"):
        identity = {k: v for k, v in wandb_identity().items() if logger_cfg.get(k) is None}
        return hydra.utils.instantiate(logger_cfg, **identity)
    return hydra.utils.instantiate(logger_cfg)


def results_record(cfg: DictConfig, metrics: dict, extra: dict) -> dict:
    """What tables are built from: the chosen groups, the key values, and the metrics."""
    return {
        "block": cfg.block.name,
        "model": cfg.model.name,
        "data": {
            "name": cfg.data.name,
            "size": cfg.data.size,
            "prompt_dropout": cfg.data.prompt_dropout,
            "condition": cfg.data.condition,
            "resolution": cfg.data.resolution,
        },
        "seed": cfg.seed,
        "metrics": metrics,
        **extra,
    }


def train(cfg: DictConfig) -> dict:
    started = time.time()
    check_train_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)

    root = dataset_root(cfg)
    data = build_datamodule(cfg, root)
    base_path = base_folder(cfg, root)

    L.seed_everything(cfg.seed, workers=True)
    module = ControlNetModule(
        base_path=str(base_path),
        block=cfg.block.name,
        block_std=cfg.block.get("std"),
        hint_channels=tuple(cfg.model.controlnet.hint_channels),
        lr=cfg.model.controlnet.lr,
        noise_offset=cfg.model.base.noise_offset,
        num_inference_steps=cfg.model.sampling.num_inference_steps,
        guidance_scale=cfg.model.sampling.guidance_scale,
        sample_dir=str(output_dir / "samples"),
    )
    loggers = [instantiate_logger(c) for c in (cfg.get("logger") or {}).values()]
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    trainable = module.trainable_parameter_count()
    for logger in loggers:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True), "trainable_params": trainable})

    trainer.fit(module, datamodule=data, ckpt_path=cfg.ckpt_path)
    train_seconds = time.time() - started

    evaluation = oracle_scores(cfg, module, data)
    samples = evaluation.pop("samples")
    save_eval_grid(samples, output_dir / "eval_samples.png")
    metrics = {**evaluation, "trainable_params": trainable}
    for logger in loggers:
        logger.log_metrics(flat_metrics(metrics, "eval"), step=trainer.global_step)

    record = results_record(cfg, metrics, {
        "global_step": trainer.global_step,
        "base_path": str(base_path),
        "data_root": str(root),
        "wall_time_s": {"total": round(time.time() - started, 1), "until_trained": round(train_seconds, 1)},
        "peak_rss_mb": peak_rss_mb(),
    })
    (output_dir / "results.json").write_text(json.dumps(record, indent=2))
    return record


def save_eval_grid(samples: dict, path: Path, columns: int = 16) -> Path:
    """Rows: condition, target, base alone (perfect prompt), then base + ControlNet under each prompt setting."""
    rows = ["conditions", "targets", "base", *PROMPT_SETTINGS]
    return save_grid([samples[row][:columns] for row in rows], path)


def flat_metrics(metrics: dict, prefix: str) -> dict:
    """Nested metrics as flat ``prefix/a/b`` keys, numbers only (what loggers accept)."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flat_metrics(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}/{key}"] = value
    return flat


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
