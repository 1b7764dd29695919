"""Wrapper for Hydra tasks (as in lightning-hydra-template): W&B always finishes, so multirun jobs never share a run; and the W&B mode for runs outside the logger."""
from __future__ import annotations

import functools
import os
import sys


def task_wrapper(task):
    @functools.wraps(task)
    def wrapped(cfg):
        try:
            return task(cfg)
        finally:
            if "wandb" in sys.modules:
                import wandb

                if wandb.run is not None:
                    wandb.finish()

    return wrapped


def wandb_mode() -> str | None:
    """The mode for a wandb.init outside the Lightning logger: WANDB_MODE if set, else offline unless WANDB_OFFLINE=false (as the logger config)."""
    if "WANDB_MODE" in os.environ:
        return None
    return "online" if os.environ.get("WANDB_OFFLINE") == "false" else "offline"
