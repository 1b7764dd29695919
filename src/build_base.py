"""Pretrain an embedded base from its recipe and compare it with the copy shipped with the project: `make base`.

The overrides are src/train.py's (`model=tiny_sd`, `data.resolution=64`, ...); `ship=true` replaces the shipped copy of
that recipe with the one rebuilt here. Writes build_base.json into outputs/build_base/runs/<time>/.
"""
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig


os.environ.setdefault("CONTROLNET_LAB_ROOT", str(Path(__file__).resolve().parents[1]))  # conf/paths: root_dir


@hydra.main(version_base="1.3", config_path="../conf", config_name="build_base")
def main(cfg: DictConfig) -> None:
    from controlnet_lab.base_rebuild import rebuild_and_compare, summary  # after Hydra has parsed the command line

    print(summary(rebuild_and_compare(cfg)))


if __name__ == "__main__":
    main()
