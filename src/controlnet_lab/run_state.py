"""Run mechanics, apart from what the run measures: the global random state kept in every checkpoint and put back on
resume (ResumeState), the checkpoint written on SIGTERM or submitit's preemption signal (PreemptionCheckpoint), random
state left untouched by sampling during training (preserved_rng), and the batch size Lightning's ThroughputMonitor
counts."""
from __future__ import annotations

import logging
import os
import random
import signal
from contextlib import contextmanager

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.loops.progress import _BatchProgress, _OptimizationProgress, _SchedulerProgress
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)
# The signal submitit sends before a job's time limit and on preemption (its SUBMITIT_PREEMPT_SIGNAL, USR2 by default).
SUBMITIT_SIGNAL = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def batch_size(batch: dict) -> int:
    """The number of samples in a training batch (for Lightning's ThroughputMonitor)."""
    return len(batch["prompt"])


def random_state() -> dict:
    """Every global random state (Python, NumPy, torch, CUDA), as tensors and plain values a checkpoint can hold."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), position, has_gauss, gauss],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_random_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserved_rng():
    """Every global RNG as it was: sampling inside leaves training's random draws unchanged."""
    state = random_state()
    try:
        yield
    finally:
        set_random_state(state)


class ResumeState(L.Callback):
    """What a resumed run needs beyond Lightning's own checkpoint. The global random state (Python, NumPy, torch and
    CUDA) goes into every checkpoint and is put back when a run resumes from one: the noise and timesteps drawn after
    the checkpoint are then those of the uninterrupted run (the data order and prompt dropout do not use it:
    data/order.py). And the loggers are flushed with every checkpoint (the CSV logger otherwise writes every 100 steps),
    so a run killed after a checkpoint leaves every row logged up to it."""

    def __init__(self):
        self.resumed: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            logger.save()

    def state_dict(self) -> dict:
        return random_state()

    def load_state_dict(self, state_dict: dict) -> None:
        self.resumed = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        if self.resumed is None:
            return
        state, self.resumed = self.resumed, None
        set_random_state(state)


# The epoch loop's progress counters in a checkpoint (loops.fit_loop), with their Lightning classes.
EPOCH_LOOP_PROGRESS = {"epoch_loop.batch_progress": _BatchProgress, "epoch_loop.scheduler_progress": _SchedulerProgress,
                       "epoch_loop.automatic_optimization.optim_progress": _OptimizationProgress}


def restarted_for_next_epoch(progress, state: dict) -> dict:
    """A loop progress ``state`` with its current-epoch counters reset, as Lightning resets them when an epoch starts."""
    progress.load_state_dict(state)
    progress.reset_on_run()
    return progress.state_dict()


class PreemptionCheckpoint(OnExceptionCheckpoint):
    """Lightning's on-exception checkpoint, written on SIGTERM only (what SLURM and other schedulers send before they
    stop a job; Lightning stops after the batch in progress and raises ``SIGTERMException``). A crash or a non-finite
    loss leaves the last periodic checkpoint as the newest, the last good one. ``ckpt_path=last`` resumes from the
    newer of this and last.ckpt.

    In a submitit job (hydra/launcher=slurm or local), submitit's own signal (USR2 before the time limit) would requeue
    and exit at once, in the middle of a step and without a checkpoint. Here it stops training as SIGTERM does, and
    submitit's handler runs after the checkpoint is written: the job is requeued with ``ckpt_path=last``
    (hydra_plugins/controlnet_lab_launchers) and continues from that checkpoint."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.submitit_handler = None
        self.requeue_requested = False
        self.writing = False
        self.validated_at: int | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.validated_at = trainer.global_step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if not self.writing:
            return
        loops = checkpoint["loops"]["fit_loop"]
        # This checkpoint is written once its batch has completed. Resuming from such a checkpoint, Lightning redoes the
        # end of that batch when it was one that validated (skipping the validation), and so counts its logging step
        # (_batches_that_stepped) once more; stored one less, every later row is logged at its own step.
        if self.validated_at == checkpoint["global_step"]:
            loops["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
        # SIGTERM during an epoch's last batch stops the run after the end of that epoch (Lightning defers it there), but
        # the epoch loop's counters still hold the finished epoch: resumed, Lightning would end the next epoch after one
        # batch. Stored as the next epoch's start, which is what this checkpoint is.
        epoch = loops["epoch_progress"]["current"]
        if epoch["completed"] == epoch["ready"] > 0:
            for key, progress in EPOCH_LOOP_PROGRESS.items():
                loops[key] = restarted_for_next_epoch(progress(), loops[key])

    def on_train_start(self, trainer, pl_module) -> None:
        handler = signal.getsignal(SUBMITIT_SIGNAL)
        if type(getattr(handler, "__self__", None)).__module__.startswith("submitit."):
            self.submitit_handler = handler
            signal.signal(SUBMITIT_SIGNAL, self.stop_then_requeue)

    def stop_then_requeue(self, signum, frame) -> None:
        log.warning(f"{signal.Signals(signum).name} from submitit: stopping after the batch in progress, then requeueing")
        self.requeue_requested = True
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's own stop (its handler runs when this one returns)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.writing = True
            try:
                super().on_exception(trainer, pl_module, exception)
            finally:
                self.writing = False
            if self.requeue_requested:
                self.hand_back()(SUBMITIT_SIGNAL, None)  # submitit requeues the job and exits

    def teardown(self, trainer, pl_module, stage: str) -> None:
        handler = self.hand_back()
        if handler is not None and self.requeue_requested:  # the signal came as training ended: the evaluation runs requeued
            handler(SUBMITIT_SIGNAL, None)

    def hand_back(self):
        """Submitit's handler, put back in place."""
        handler, self.submitit_handler = self.submitit_handler, None
        if handler is not None:
            signal.signal(SUBMITIT_SIGNAL, handler)
        return handler
