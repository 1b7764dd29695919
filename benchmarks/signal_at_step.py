"""A callback for benchmarks/reliability.py and the resume test: the run sends itself a signal at the end of one
training step's batch, to aim an interruption at a point a timed kill hits only by chance (an epoch's last batch).
Importable by the training process because reliability.py puts this folder on its PYTHONPATH."""
from __future__ import annotations

import os
import signal

import lightning as L


class SignalAtStep(L.Callback):
    """Sends ``signum`` to this process when global step ``step`` ends, in a run started afresh (not in a resumed one)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.ckpt_path is None:
            os.kill(os.getpid(), self.signum)
