"""Train a ControlNet on a locked base: `python src/train.py [overrides]`, `-m` for sweeps."""
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from controlnet_lab.task import task_wrapper
from controlnet_lab.run_record import optimized_value


os.environ.setdefault("CONTROLNET_LAB_ROOT", str(Path(__file__).resolve().parents[1]))  # conf/paths: root_dir


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@task_wrapper
def main(cfg: DictConfig) -> float | None:
    """Trains and evaluates; returns the metric named by ``optimized_metric`` (for a sweeper such as Optuna's)."""
    from controlnet_lab.training import train  # torch loads after Hydra has parsed the command line

    return optimized_value(train(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
