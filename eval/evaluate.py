"""Evaluate a trained checkpoint again: `python eval/evaluate.py ckpt=<run dir or .ckpt> [eval.num_images=N eval.seed=S]`.

The run's own composed config (``<run>/.hydra/config.yaml``) supplies the data and
sampling settings; these overrides change only the evaluation. Writes ``eval.json``
beside the checkpoint. So far the oracle scores of the embedded default (mask IoU,
color accuracy); FID, CLIP score and re-detection fidelity are issue 4.
"""
import json
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from controlnet_lab.module import ControlNetModule
from controlnet_lab.training import build_datamodule, dataset_root, oracle_scores


def checkpoint_path(ckpt: str) -> Path:
    path = Path(ckpt)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={ckpt}: no checkpoint there (give a .ckpt file or a run directory holding checkpoints/last.ckpt)")
    return path


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
    metrics = oracle_scores(run_cfg, module, data)
    metrics.pop("samples")
    out = ckpt.parent / "eval.json"
    out.write_text(json.dumps({"checkpoint": str(ckpt), "eval": OmegaConf.to_container(cfg.eval), "metrics": metrics}, indent=2))
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
