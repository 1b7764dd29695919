"""Evaluate a trained checkpoint again: `python eval/evaluate.py ckpt=<run dir or .ckpt> [eval.num_images=N eval.seed=S]`.

The run's own composed config (``<run>/.hydra/config.yaml``) supplies the data and
sampling settings; these overrides change only the evaluation. Writes ``eval.json``
beside the checkpoint, with every metric ``eval`` enables (conf/eval/default.yaml): oracle
scores and re-detection fidelity under the four prompt settings, FID (domain features;
Inception and CLIP score when enabled); and adds them to the run's own W&B run.
"""
import json
import os
from pathlib import Path

import hydra
import wandb
from omegaconf import DictConfig, OmegaConf

from controlnet_lab.export import checkpoint_path
from controlnet_lab.module import ControlNetModule
from controlnet_lab.task import wandb_mode
from controlnet_lab.training import build_datamodule, dataset_root, flat_metrics, held_out_scores


os.environ.setdefault("CONTROLNET_LAB_ROOT", str(Path(__file__).resolve().parents[1]))  # conf/paths: root_dir


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    ckpt = checkpoint_path(cfg.ckpt)
    run_config = ckpt.parent.parent / ".hydra" / "config.yaml"
    if not run_config.is_file():
        raise FileNotFoundError(f"ckpt={cfg.ckpt}: the run's config {run_config} is missing")
    run_cfg = OmegaConf.merge(OmegaConf.load(run_config), {"eval": cfg.eval, "paths": {"cache_dir": cfg.paths.cache_dir}})
    data = build_datamodule(run_cfg, dataset_root(run_cfg))
    module = ControlNetModule.load_from_checkpoint(ckpt, map_location="cpu")
    metrics = held_out_scores(run_cfg, module, data)
    metrics.pop("samples")
    out = ckpt.parent / "eval.json"
    out.write_text(json.dumps({"checkpoint": str(ckpt), "eval": OmegaConf.to_container(cfg.eval, resolve=True), "metrics": metrics}, indent=2))
    log_to_run_wandb(ckpt.parent.parent, run_cfg, metrics)
    print(json.dumps(metrics, indent=2))


def log_to_run_wandb(run_dir: Path, run_cfg: DictConfig, metrics: dict) -> None:
    """Resume the run's W&B run by its id (offline unless WANDB_OFFLINE=false, as in training) and add the scores."""
    runs = sorted((run_dir / "wandb").glob("*run-*"))
    if not runs:
        return
    project = OmegaConf.select(run_cfg, "logger.wandb.project", default="controlnet-lab")
    run = wandb.init(project=project, id=runs[-1].name.rsplit("-", 1)[-1], resume="allow", dir=str(run_dir), mode=wandb_mode(), job_type="eval")
    run.summary.update(flat_metrics(metrics, "reeval"))
    run.finish()


if __name__ == "__main__":
    main()
