"""Sample from trained ControlNets: `python src/sample.py ckpt=<run dir, .ckpt or export> condition=<image or folder> prompt="..."`.

`ckpt=[a,b] condition=[x.png,y.png] conditioning_scale=[1.0,0.5]` composes several
ControlNets; `prompt_settings=true` redoes the paper's Fig. 8 (no / insufficient /
conflicting / perfect prompt); `resolution_weighting=paper|code` turns on CFG resolution
weighting. Writes PNGs, grids and samples.json into outputs/sample/runs/<time>/.
"""
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig


os.environ.setdefault("CONTROLNET_LAB_ROOT", str(Path(__file__).resolve().parents[1]))  # conf/paths: root_dir


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from controlnet_lab.generation import sample  # torch loads after Hydra has parsed the command line

    report = sample(cfg)
    print(f"{len(report['images'])} images and {len(report['grids'])} grid(s) in {cfg.paths.output_dir}")


if __name__ == "__main__":
    main()
