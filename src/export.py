"""Export a trained ControlNet to diffusers' format: `python src/export.py ckpt=<run dir or .ckpt> out=<new folder>`.

Writes out/controlnet/ (save_pretrained, safetensors), out/base/ (the locked base it was
trained on) and out/export.json; `out` must be new or empty.
"""
import json
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from controlnet_lab.export import checkpoint_path, export


os.environ.setdefault("CONTROLNET_LAB_ROOT", str(Path(__file__).resolve().parents[1]))  # conf/paths: root_dir


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    info = export(checkpoint_path(cfg.ckpt), Path(cfg.out))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
