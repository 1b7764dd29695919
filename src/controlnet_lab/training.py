"""The training task behind src/train.py: data, locked base, ControlNet, fit, held-out evaluation, results.json."""
from __future__ import annotations

import time
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf

from controlnet_lab.bases import base_fingerprint, check_same_base
from controlnet_lab.blocks import connection_init_stds
from controlnet_lab.callbacks import ConvergenceStop, FidelityCurve, InitialOutputChange
from controlnet_lab.config_checks import ConfigError, check_train_config, compile_options, ema_settings
from controlnet_lab.data.datamodule import build_datamodule
from controlnet_lab.evaluation.held_out import timed
from controlnet_lab.evaluation.suite import fidelity_skip_reason, metric_suite, run_device
from controlnet_lab.evaluation.task import held_out_scores, save_eval_grid, seen_scores
from controlnet_lab.locked_base import base_folder, base_report, base_source, locked_dtype
from controlnet_lab.locked_encodings import attach_locked_encodings
from controlnet_lab.loggers import instantiate_logger, log_final_scores
from controlnet_lab.module import ControlNetModule
from controlnet_lab.resume import resume_checkpoint
from controlnet_lab.run_record import Recording, evaluation_share, peak_rss_mb, run_record
from controlnet_lab.storage import check_room, checkpoints_kept
from controlnet_lab.tracking import flat


def train(cfg: DictConfig) -> dict:
    """Train and evaluate; rank 0 writes results.json (run_record.py) and returns it, the other DDP processes {}."""
    with Recording() as recording:
        record = train_and_evaluate(cfg)
    if record:
        recording.write(record, Path(cfg.paths.output_dir) / "results.json")
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
    check_room(output_dir / "checkpoints", trainable, module.ema is not None, checkpoints_kept(cfg.get("callbacks"), cfg.trainer.max_steps))
    with timed(phases, "locked_encodings"):
        if cfg.model.base.cache_encodings:
            attach_locked_encodings(module.base, data, fingerprint, Path(cfg.paths.cache_dir), run_device(cfg),
                                    batch_size=cfg.model.base.encode_batch_size, dtype=cfg.model.base.cache_dtype, workers=cfg.data.num_workers)
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
    grid = save_eval_grid(evaluation.pop("samples"), output_dir / "eval_samples.png")
    if "fidelity_curve" in (cfg.get("callbacks") or {}) and fidelity_skip_reason(cfg.data.condition):
        evaluation["skipped"]["curve"] = fidelity_skip_reason(cfg.data.condition)
    metrics = {**evaluation, "trainable_params": trainable, "nonfinite_steps_skipped": module.nonfinite_skips,
               "block_init_std": connection_init_stds(module.controlnet, cfg.block.name, cfg.block.get("std"))}
    for callback in callbacks:
        if isinstance(callback, (FidelityCurve, ConvergenceStop)):
            metrics.update(callback.summary())
        if isinstance(callback, InitialOutputChange):
            metrics["initial_output_change"] = callback.change
    log_final_scores(loggers, metrics, grid, trainer.global_step)

    return run_record("train", cfg, metrics,
        global_step=trainer.global_step,
        resumed_from={"checkpoint": str(resumed.path), "global_step": resumed_step, "passed_over": resumed.passed_over} if resumed else None,
        base_path=str(base_path),
        base=base_report(base_path, fingerprint, module.base.denoiser.dtype),
        data_root=data.origin,
        split=data.split_report,
        wall_time_s={"until_trained": round(train_seconds, 1), **{phase: round(seconds, 2) for phase, seconds in phases.items()}},
        evaluation_share=evaluation_share(metrics, time.time() - started),
        peak_rss_mb=peak_rss_mb(),
    )


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


def training_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The configured callbacks, made before any data or training work (their inputs are checked as they are made);
    the fidelity curve only where the condition has a re-detection fidelity (``metrics.skipped.curve`` otherwise)."""
    configured = dict(cfg.get("callbacks") or {})
    if fidelity_skip_reason(cfg.data.condition):
        configured.pop("fidelity_curve", None)
    if cfg.eval.get("stopping", {}).get("enabled") and "fidelity_curve" not in configured:
        raise ConfigError("eval.stopping.enabled=true stops on the fidelity curve, which this run does not measure "
                          f"({fidelity_skip_reason(cfg.data.condition) or 'callbacks.fidelity_curve removed'})")
    return [hydra.utils.instantiate(c) for c in configured.values()]
