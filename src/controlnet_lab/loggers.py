"""The run's loggers made from their configs: W&B named, grouped and tagged from the Hydra run (tracking.py), a resumed
run continuing its own W&B run and CSV log (resume.py), and the final scores, table and grid sent to W&B."""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import DummyExperiment
from omegaconf import DictConfig

from controlnet_lab.evaluation.task import flat_metrics
from controlnet_lab.resume import continue_csv_log, csv_rows_before, remember_wandb_run_id, wandb_run_id
from controlnet_lab.tracking import flat, group_name, run_tags


def wandb_identity(config: dict) -> dict:
    """W&B group, name and tags: the experiment and its sweep's time, the job's overrides, and the settings W&B filters
    by (tracking.py), so a sweep's jobs line up as one group."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    name = hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}" if multirun else Path(hydra_cfg.runtime.output_dir).name
    return {"group": group_name(config["task_name"], hydra_cfg.sweep.dir if multirun else None), "name": name,
            "tags": run_tags(config)}


def instantiate_logger(logger_cfg: DictConfig, config: dict, output_dir: Path, resumed_step: int | None):
    """A logger from its config; a WandbLogger without group, name or tags gets them from the Hydra run and ``config``
    (the run's, resolved). A run resumed in its own directory continues its W&B run and its CSV log (resume.py)."""
    if logger_cfg._target_.endswith("WandbLogger"):
        identity = {k: v for k, v in wandb_identity(config).items() if logger_cfg.get(k) is None}
        run_id = wandb_run_id(output_dir) if resumed_step is not None else None
        resumed = {"id": run_id, "resume": "allow"} if run_id else {}
        logger = hydra.utils.instantiate(logger_cfg, **identity, **resumed)
        if not isinstance(logger.experiment, DummyExperiment):  # Lightning's stand-in on DDP processes other than rank 0
            remember_wandb_run_id(output_dir, logger.experiment.id)
        return logger
    if logger_cfg._target_.endswith("CSVLogger") and resumed_step is not None:
        version, rows = csv_rows_before(output_dir, resumed_step)
        logger = hydra.utils.instantiate(logger_cfg, version=version)
        continue_csv_log(logger, rows)
        return logger
    return hydra.utils.instantiate(logger_cfg)


def log_final_scores(loggers: list, metrics: dict, grid: Path, step: int) -> None:
    """The final scores to every logger; to W&B also a table per prompt setting, the evaluation grid, and the scores as
    the run's summary."""
    for logger in loggers:
        logger.log_metrics(flat_metrics(metrics, "eval"), step=step)
        if isinstance(logger, WandbLogger):
            log_wandb_summary(logger, metrics, grid)


def log_wandb_summary(logger: WandbLogger, metrics: dict, grid: Path) -> None:
    settings = {setting: flat(scores) for setting, scores in metrics["prompt_settings"].items()}  # base_alone.mask_iou, ...
    columns = ["prompt setting", *sorted({k for scores in settings.values() for k in scores})]
    rows = [[setting, *[scores.get(c) for c in columns[1:]]] for setting, scores in settings.items()]
    logger.log_table("eval/prompt_settings", columns=columns, data=rows)
    logger.log_image("eval/samples", images=[str(grid)], caption=["condition | target | base alone | " + " | ".join(metrics["prompt_settings"])])
    logger.experiment.summary.update(flat_metrics(metrics, "final"))
