"""Wrapper for Hydra tasks (as in lightning-hydra-template): the composed config printed as a tree, a failure recorded
in the job's directory (failures.py), a stop by SIGTERM reported with how to resume (exit status 143), W&B always finishes (so multirun jobs never share a run); and the W&B mode for
runs outside the logger."""
from __future__ import annotations

import functools
import logging
import signal
import sys
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from controlnet_lab.failures import record_failure

log = logging.getLogger(__name__)


def print_config_tree(cfg: DictConfig) -> None:
    """The composed config as a rich tree, one branch per top-level key (``extras.print_config=false`` turns it off)."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key), style="bold")
        try:
            text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        except Exception:  # a value that cannot be resolved yet (e.g. ???) is reported by the checks that follow
            text = OmegaConf.to_yaml(value) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)


def task_wrapper(task):
    @functools.wraps(task)
    def wrapped(cfg):
        from lightning.pytorch.utilities.exceptions import SIGTERMException  # torch loads after Hydra has parsed the command line

        try:
            if cfg.get("extras", {}).get("print_config", False):
                print_config_tree(cfg)
            return task(cfg)
        except SIGTERMException:
            where = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "<run dir>"
            log.warning(f"stopped by SIGTERM: checkpoints/interrupted.ckpt holds the run after its last finished batch; "
                        f"resume with paths.run_dir={where} ckpt_path=last")
            raise SystemExit(128 + signal.SIGTERM) from None
        except Exception as error:
            if HydraConfig.initialized():
                runtime = HydraConfig.get()
                record_failure(Path(runtime.runtime.output_dir), error, list(runtime.overrides.task))
            raise
        finally:
            if "wandb" in sys.modules:
                import wandb

                if wandb.run is not None:
                    wandb.finish()

    return wrapped

