"""The training task behind src/train.py: data, locked base, ControlNet, fit, held-out evaluation, results.json."""
from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import DummyExperiment
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf

from controlnet_lab.bases import base_fingerprint, check_same_base
from controlnet_lab.blocks import connection_init_stds
from controlnet_lab.callbacks import FidelityCurve, InitialOutputChange
from controlnet_lab.config_checks import check_train_config, compile_options
from controlnet_lab.data.datamodule import ControlDataModule, build_datamodule
from controlnet_lab.evaluation.held_out import timed
from controlnet_lab.evaluation.suite import fidelity_skip_reason, metric_suite, run_device
from controlnet_lab.evaluation.task import check_no_metric_failed, flat_metrics, held_out_scores, save_eval_grid, seen_scores
from controlnet_lab.locked_encodings import cached_encodings
from controlnet_lab.module import ControlNetModule
from controlnet_lab.provenance import OtherLoad, commit, machine
from controlnet_lab.resume import continue_csv_log, csv_rows_before, remember_wandb_run_id, resume_checkpoint, wandb_run_id
from controlnet_lab.storage import check_room
from controlnet_lab.tracking import flat, group_name, run_tags

log = logging.getLogger(__name__)


def base_source(cfg: DictConfig):
    """The ``model.base`` config instantiated from its ``_target_`` (bases/sources.py)."""
    return hydra.utils.instantiate(OmegaConf.to_container(cfg.model.base, resolve=True), _convert_="all")


def base_folder(cfg: DictConfig, source, data: ControlDataModule, cache_dir: Path | None = None) -> Path:
    """The locked base's folder: saved, fetched, shipped, or pretrained here on the run's training pool (and cached in
    ``cache_dir``, by default the run's ``paths.cache_dir``).

    An embedded base is pretrained in this one process on one device of the run's accelerator: under DDP,
    Lightning would otherwise start the other processes for the pretraining, each of which would build and
    publish a base of its own (one such base was published without its text encoder's weights)."""
    accelerator = {"accelerator": cfg.trainer.accelerator, "devices": 1}
    return source.folder(data, cfg.data.resolution, Path(cache_dir or cfg.paths.cache_dir), accelerator)


MIXED_PRECISION_DTYPES = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}


def locked_dtype(setting: str, precision) -> str:
    """``model.base.dtype``; ``auto`` follows the trainer's mixed precision (bf16-mixed: the locked parts in bfloat16, as
    diffusers' script keeps them in its weight_dtype), float32 otherwise. The ControlNet always stays float32."""
    if setting == "auto":
        return MIXED_PRECISION_DTYPES.get(str(precision), "float32")
    return setting


def ema_settings(ema: DictConfig) -> dict | None:
    """``model.ema`` as EMAModel's keyword arguments, or None when it is off."""
    if not ema.enabled:
        return None
    return {k: v for k, v in OmegaConf.to_container(ema, resolve=True).items() if k != "enabled"}


def base_report(base_path: Path, fingerprint: str, module: ControlNetModule) -> dict:
    """What results.json says of the locked base: its folder, fingerprint, the dtype its UNet was kept in during
    training and, for a base pretrained here, its pretraining report."""
    report = {"path": str(base_path), "fingerprint": fingerprint, "dtype": str(module.locked_unet.dtype).removeprefix("torch.")}
    pretraining = base_path / "pretrain_config.json"
    if pretraining.is_file():
        recorded = json.loads(pretraining.read_text())
        report["pretraining"] = {k: v for k, v in recorded.items() if k not in ("model", "data_root")}
    return report


def attach_locked_encodings(cfg: DictConfig, module: ControlNetModule, data: ControlDataModule, fingerprint: str) -> None:
    """Serve the training and held-out batches with cached VAE and text encodings (``model.base.cache_encodings``)."""
    if not cfg.model.base.cache_encodings:
        return
    settings = {"batch_size": cfg.model.base.encode_batch_size, "dtype": cfg.model.base.cache_dtype, "workers": cfg.data.num_workers}
    cache = Path(cfg.paths.cache_dir)
    base = module.base.to(run_device(cfg))
    if data.streaming:
        log.info("data.streaming=true: the training rows are encoded as they stream by (only the held-out set's encodings are cached)")
    else:
        data.train_encodings = cached_encodings(base, fingerprint, data.train_dataset(), cache, **settings)
    data.val_encodings = cached_encodings(base, fingerprint, data.val_dataset(), cache, **settings)
    base.to("cpu")


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


def results_record(cfg: DictConfig, metrics: dict, extra: dict) -> dict:
    """What tables are built from: the chosen groups, the key values, and the metrics."""
    return {
        "block": cfg.block.name,
        "block_std": cfg.block.get("std"),  # gauss only: "standard", "standard_x<factor>" or one number
        "model": cfg.model.name,
        "data": {
            "name": cfg.data.name,
            "size": cfg.data.size,
            "prompt_dropout": cfg.data.prompt_dropout,
            "condition": cfg.data.condition,
            "resolution": cfg.data.resolution,
        },
        "seed": cfg.seed,
        "sampling": OmegaConf.to_container(cfg.model.sampling, resolve=True),
        "metrics": metrics,
        **extra,
    }


def train(cfg: DictConfig) -> dict:
    code = commit()  # the code this run starts with (the tree may change while it runs)
    with OtherLoad() as load:
        record = train_and_evaluate(cfg)
    if record:  # what the tables' reader needs to trust the numbers: which code, which machine, what else ran
        record["provenance"] = {**code, "machine": machine(), "other_load": load.result}
        (Path(cfg.paths.output_dir) / "results.json").write_text(json.dumps(record, indent=2))
        check_no_metric_failed(record["metrics"], Path(cfg.paths.output_dir) / "results.json")
    return record


def train_and_evaluate(cfg: DictConfig) -> dict:
    started = time.time()
    check_train_config(cfg)
    source = base_source(cfg)
    source.check()
    output_dir = Path(cfg.paths.output_dir)
    resumed = resume_checkpoint(cfg.ckpt_path, output_dir)
    callbacks = training_callbacks(cfg)
    L.seed_everything(cfg.seed, workers=True)

    phases = {}
    with timed(phases, "data_setup"):
        data = build_datamodule(cfg.data)
    suite = metric_suite(cfg, data)
    base_path = base_folder(cfg, source, data)
    fingerprint = base_fingerprint(base_path)
    if resumed:
        check_same_base(resumed.path, resumed.base_fingerprint, base_path, fingerprint)
    resumed_step = resumed.global_step if resumed else None

    L.seed_everything(cfg.seed, workers=True)
    module: ControlNetModule = hydra.utils.instantiate(  # conf/train.yaml's module node, with the run-time pieces
        cfg.module, base_path=str(base_path), sample_dir=str(output_dir / "samples"),
        base_dtype=locked_dtype(cfg.model.base.dtype, cfg.trainer.get("precision")), ema=ema_settings(cfg.model.ema),
        base_fingerprint=fingerprint, compile=compile_options(cfg.model.compile))
    trainable = module.trainable_parameter_count()
    check_room(output_dir / "checkpoints", trainable, module.ema is not None, checkpoints_kept(cfg))
    with timed(phases, "locked_encodings"):
        attach_locked_encodings(cfg, module, data, fingerprint)
    config = OmegaConf.to_container(cfg, resolve=True)
    loggers = [instantiate_logger(c, config, output_dir, resumed_step) for c in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    for logger in loggers:  # flat (block.name, data.prompt_dropout, ...): what W&B's panels and sweeps group by
        logger.log_hyperparams({**flat(config), "trainable_params": trainable})

    trainer.fit(module, datamodule=data, ckpt_path=resumed.path if resumed else None, weights_only=True)
    train_seconds = time.time() - started
    trained = final_module(trainer, module, output_dir)
    if not trainer.is_global_zero:  # the other DDP processes end with training; rank 0 evaluates and writes the results
        return {}

    evaluation = held_out_scores(cfg, trained, data, suite)
    if cfg.eval.get("train_images"):
        evaluation.update(seen_scores(cfg, trained, data, evaluation, suite))
    samples = evaluation.pop("samples")
    grid = save_eval_grid(samples, output_dir / "eval_samples.png")
    if "fidelity_curve" in (cfg.get("callbacks") or {}) and fidelity_skip_reason(cfg.data.condition):
        evaluation["skipped"]["curve"] = fidelity_skip_reason(cfg.data.condition)
    metrics = {**evaluation, "trainable_params": trainable, "nonfinite_steps_skipped": module.nonfinite_skips,
               "block_init_std": connection_init_stds(module.controlnet, cfg.block.name, cfg.block.get("std"))}
    curves = [c for c in callbacks if isinstance(c, FidelityCurve)]
    if curves:
        metrics.update(curves[0].summary())
    changes = [c for c in callbacks if isinstance(c, InitialOutputChange)]
    if changes:
        metrics["initial_output_change"] = changes[0].change
    for logger in loggers:
        logger.log_metrics(flat_metrics(metrics, "eval"), step=trainer.global_step)
        if isinstance(logger, WandbLogger):
            log_wandb_summary(logger, metrics, grid)

    record = results_record(cfg, metrics, {
        "global_step": trainer.global_step,
        "resumed_from": {"checkpoint": str(resumed.path), "global_step": resumed_step, "passed_over": resumed.passed_over} if resumed else None,
        "base_path": str(base_path),
        "base": base_report(base_path, fingerprint, module),
        "data_root": data.origin,
        "split": data.split_report,
        "wall_time_s": {"total": round(time.time() - started, 1), "until_trained": round(train_seconds, 1),
                        **{phase: round(seconds, 2) for phase, seconds in phases.items()}},
        "evaluation_share": evaluation_share(metrics, time.time() - started),
        "peak_rss_mb": peak_rss_mb(),
    })
    return record


def evaluation_share(metrics: dict, total_seconds: float) -> dict:
    """What measuring cost: the fidelity curve's seconds over the training loop's (FidelityCurve), the final
    evaluation's over the whole run's."""
    final = sum((metrics.get("seconds") or {}).values())
    return {"curve_of_training": metrics.get("curve_share_of_training"),
            "final_evaluation_of_run": round(final / total_seconds, 4) if total_seconds else None}


def checkpoints_kept(cfg: DictConfig) -> int:
    """How many checkpoints the run keeps at once: the step checkpoints (``save_top_k``; -1 keeps all) and last.ckpt."""
    checkpoint = (cfg.get("callbacks") or {}).get("checkpoint")
    if checkpoint is None:
        return 0
    top_k = checkpoint.get("save_top_k", 1)
    if top_k < 0:
        top_k = cfg.trainer.max_steps // checkpoint.every_n_train_steps
    return top_k + int(bool(checkpoint.get("save_last")))


def final_module(trainer: L.Trainer, module: ControlNetModule, output_dir: Path) -> ControlNetModule:
    """The trained module the final evaluation scores, with the EMA weights when the run kept them. Under FSDP the
    ControlNet is sharded across the processes: all of them join in writing the full checkpoint
    ``checkpoints/final.ckpt``, and rank 0 reads it back whole."""
    if isinstance(trainer.strategy, FSDPStrategy):
        path = output_dir / "checkpoints" / "final.ckpt"
        trainer.save_checkpoint(path)
        return ControlNetModule.for_inference(path) if trainer.is_global_zero else module
    module.use_ema_weights()
    return module


def optimized_value(record: dict, name: str | None) -> float | None:
    """``record["metrics"][name]`` (a dotted path, e.g. ``prompt_settings.none.edge_f1``), what a sweeper optimises."""
    if not name:
        return None
    value = record["metrics"]
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            skipped = record["metrics"].get("skipped", {})
            why = f" (skipped: {skipped[name]})" if name in skipped else ""
            raise KeyError(f"optimized_metric={name}: results.json has no metrics.{name}{why}; numbers there: "
                           f"{', '.join(k for k, v in record['metrics'].items() if isinstance(v, (int, float)))}")
        value = value[part]
    return float(value)


def log_wandb_summary(logger: WandbLogger, metrics: dict, grid: Path) -> None:
    """A table of the final scores per prompt setting, the evaluation grid, and the final metrics as the run's summary."""
    columns = ["prompt setting", *sorted({k for scores in metrics["prompt_settings"].values() for k in scores})]
    rows = [[setting, *[scores.get(c) for c in columns[1:]]] for setting, scores in metrics["prompt_settings"].items()]
    logger.log_table("eval/prompt_settings", columns=columns, data=rows)
    logger.log_image("eval/samples", images=[str(grid)], caption=["condition | target | base alone | " + " | ".join(metrics["prompt_settings"])])
    logger.experiment.summary.update(flat_metrics(metrics, "final"))


def training_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The configured callbacks, made before any data or training work (their inputs are checked as they are made);
    the fidelity curve only where the condition has a re-detection fidelity (``metrics.skipped.curve`` otherwise)."""
    configured = dict(cfg.get("callbacks") or {})
    if fidelity_skip_reason(cfg.data.condition):
        configured.pop("fidelity_curve", None)
    return [hydra.utils.instantiate(c) for c in configured.values()]


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
