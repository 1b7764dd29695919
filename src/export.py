"""Export a trained ControlNet to diffusers' format: `python src/export.py ckpt=<run dir or .ckpt> out=<new folder>`.

Writes out/controlnet/ (save_pretrained, safetensors), out/base/ (the locked base it was
trained on), out/README.md (the model card) and out/export.json; `out` must be new or empty. `wandb=true` also logs the
export as a W&B model artifact to the training run's W&B run (controlnet_lab/wandb_runs.py).
"""
import json
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig


os.environ.setdefault("CONTROLNET_LAB_ROOT", str(Path(__file__).resolve().parents[1]))  # conf/paths: root_dir


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from controlnet_lab.export import checkpoint_path, export  # torch loads after Hydra has parsed the command line
    from controlnet_lab.wandb_runs import log_export

    ckpt = checkpoint_path(cfg.ckpt)
    info = export(ckpt, Path(cfg.out))
    if cfg.wandb:
        info["wandb_artifact"] = log_export(Path(cfg.out), info, ckpt.resolve().parent.parent)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
