"""The task behind eval/evaluate.py: a trained checkpoint scored again on its run's held-out split, with the run's own
composed config (``<run>/.hydra/config.yaml``) for the data and sampling, this evaluation's ``eval`` settings, and its
``sampling`` where given; ``compose`` samples further ControlNets with it (residuals summed; paper Sec. 3.4), each given
its own run's condition type of the same held-out samples. The record has the shape of training's results.json
(run_record.py); with the run's own sampling it is also written beside the checkpoint (what ``eval/tables.py
rescored=true`` reads) and its scores join the run's own W&B run."""
from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from controlnet_lab.config_checks import check_eval_prompt_settings, check_sampling_config
from controlnet_lab.data.datamodule import build_datamodule
from controlnet_lab.evaluation.held_out import ComposedNet
from controlnet_lab.evaluation.suite import condition_fidelity
from controlnet_lab.evaluation.task import flat_metrics, held_out_scores, save_eval_grid
from controlnet_lab.export import checkpoint_path
from controlnet_lab.module import ControlNetModule
from controlnet_lab.run_record import Recording, run_record
from controlnet_lab.wandb_runs import resumed_run


def rescore(cfg: DictConfig) -> dict:
    """Score ``cfg.ckpt`` (conf/eval.yaml) on its run's held-out split; writes eval.json and eval_samples.png into
    ``paths.output_dir`` and returns the record."""
    ckpt = checkpoint_path(cfg.ckpt)
    check_eval_prompt_settings(cfg.eval)
    sampling = {key: value for key, value in cfg.sampling.items() if value is not None}
    run_cfg = OmegaConf.merge(run_config(ckpt, "ckpt", cfg), {"model": {"sampling": sampling}})
    check_sampling_config(run_cfg.model.sampling, "sampling")
    composed_runs = [(checkpoint_path(path), f"compose[{i}]") for i, path in enumerate(cfg.compose)]
    composed_cfgs = [run_config(path, key, cfg) for path, key in composed_runs]
    with Recording() as recording:
        data = build_datamodule(run_data_config(run_cfg))
        module = ControlNetModule.for_inference(ckpt)
        composed = [composed_net(path, key, composed_cfg, module) for (path, key), composed_cfg in zip(composed_runs, composed_cfgs)]
        metrics = held_out_scores(run_cfg, module, data, composed=composed)
    out = Path(cfg.paths.output_dir)
    save_eval_grid(metrics.pop("samples"), out / "eval_samples.png")
    nets = [(ckpt, run_cfg), *((path, composed_cfg) for (path, _), composed_cfg in zip(composed_runs, composed_cfgs))]
    record = run_record("eval", run_cfg, metrics, checkpoint=str(ckpt),
        # the condition types of the ControlNets sampled together ("sketch+seg"), a method of eval/tables.py
        composition="+".join(net_cfg.data.condition for _, net_cfg in nets),
        controlnets=[{"checkpoint": str(path), "condition": net_cfg.data.condition, "block": net_cfg.block.name, "seed": net_cfg.seed}
                     for path, net_cfg in nets],
        eval=OmegaConf.to_container(run_cfg.eval, resolve=True))
    own_sampling = not sampling and not composed
    try:
        recording.write(record, out / "eval.json")
    finally:
        if own_sampling:  # the checkpoint's own re-scoring, what eval/tables.py rescored=true reads
            shutil.copyfile(out / "eval.json", ckpt.parent / "eval.json")
            log_to_run_wandb(ckpt.parent.parent, run_cfg, metrics)
    return record


def run_config(ckpt: Path, key: str, cfg: DictConfig) -> DictConfig:
    """The composed config of the run that wrote ``ckpt`` (given as ``key``), with this evaluation's settings."""
    path = ckpt.parent.parent / ".hydra" / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{key}={ckpt}: the run's config {path} is missing")
    return OmegaConf.merge(
        # Runs configured before these keys existed sampled without resolution weighting, trained without dropping
        # near-duplicates of held-out samples (the held-out set itself is the same), read fill50k-format data, and
        # ran their detectors where detector_device=auto would, and had no validation part (validation_size 0: scored
        # on the whole held-out set, as then).
        {"model": {"sampling": {"resolution_weighting": "off", "conditioning_scale": 1.0}},
         "data": {"held_out": {"exclude_near_duplicates": False, "max_distance": 0.2}, "detector_device": "auto",
                  "_target_": "controlnet_lab.data.datamodule.Fill50kDataModule"}},
        OmegaConf.load(path), {"eval": cfg.eval, "paths": {"cache_dir": cfg.paths.cache_dir}},
    )


def composed_net(ckpt: Path, key: str, net_cfg: DictConfig, evaluated: ControlNetModule) -> ComposedNet:
    """A ControlNet to compose with the evaluated one: trained on the same locked base, given its own run's condition
    type of its own held-out split (evaluate_held_out checks that those are the same samples)."""
    module = ControlNetModule.for_inference(ckpt)
    if module.hparams.get("base_fingerprint") != evaluated.hparams.get("base_fingerprint"):
        raise ValueError(f"{key}={ckpt}: trained on another locked base ({module.hparams.base_path}) than ckpt "
                         f"({evaluated.hparams.base_path}); ControlNets compose only on the base they were trained on")
    data = build_datamodule(run_data_config(net_cfg))
    return ComposedNet(module.controlnet, data.test_dataset(), condition_fidelity(net_cfg))


def run_data_config(run_cfg: DictConfig) -> DictConfig:
    """The run's data settings as this version's data modules take them (older runs' configs lack a few keys)."""
    data = OmegaConf.to_container(run_cfg.data, resolve=True)
    data.setdefault("cache_dir", run_cfg.paths.cache_dir)
    return OmegaConf.create(data)


def log_to_run_wandb(run_dir: Path, run_cfg: DictConfig, metrics: dict) -> None:
    """Add the scores to the run's own W&B run, where it had one (wandb_runs.py)."""
    run = resumed_run(run_dir, "eval", OmegaConf.select(run_cfg, "logger.wandb.project"))
    if run is not None:
        run.summary.update(flat_metrics(metrics, "reeval"))
        run.finish()
