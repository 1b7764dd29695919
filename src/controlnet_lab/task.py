"""Wrapper for Hydra tasks (as in lightning-hydra-template): W&B always finishes, so multirun jobs never share a run."""
from __future__ import annotations

import functools
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
