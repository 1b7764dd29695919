"""What ``hparams_search=optuna`` searches beyond its fixed parameters: what applies to the block being trained."""
from __future__ import annotations

import optuna
from omegaconf import DictConfig


def block_parameters(cfg: DictConfig, trial: optuna.Trial) -> None:
    """The Gaussian connection's init std, searched only where there is one (``block=gauss``), so that a search runs
    on any block, the default zero convolutions included."""
    if cfg.block.name == "gauss":
        trial.suggest_float("block.std", 1e-3, 0.2, log=True)
