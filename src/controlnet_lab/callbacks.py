"""Callbacks that sample during training: the fidelity curve (for the sudden-convergence plot) and the user's validation images;
and the batch size Lightning's ThroughputMonitor counts."""
from __future__ import annotations

import logging
import os
import random
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.loops.progress import _BatchProgress, _OptimizationProgress, _SchedulerProgress
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
import numpy as np
import torch
from torch.utils.data import default_collate

from controlnet_lab.data.samples import load_rgb
from controlnet_lab.evaluation.held_out import generate, oracle_skip_reason
from controlnet_lab.evaluation.prompts import palette_of
from controlnet_lab.images import save_grid, to_uint8
from controlnet_lab.metrics.convergence import rise, sudden_step
from controlnet_lab.metrics.fidelity import ConditionFidelity
from controlnet_lab.metrics.oracle import score_images
from controlnet_lab.sampling import Sampling

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


class InitialOutputChange(L.Callback):
    """Before the first step, how much the untrained ControlNet changes the locked base's noise prediction on the first
    ``num_images`` held-out samples (true prompts; noise and timesteps drawn from ``seed``): zero convs leave it
    unchanged, a Gaussian init does not (the damage to the locked model that the paper gives as the reason for zero
    convs, Sec. 4.2). Kept in the callback's state, so a resumed run reports the value its step 0 measured."""

    def __init__(self, num_images: int = 32, seed: int = 1234):
        self.num_images, self.seed = num_images, seed
        self.change: dict | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != 0:
            return
        with preserved_rng():
            dataset = trainer.datamodule.val_dataset()
            batch = default_collate([dataset[i] for i in range(min(self.num_images, len(dataset)))])
            batch = {key: value.to(pl_module.device) if torch.is_tensor(value) else value for key, value in batch.items()}
            self.change = pl_module.output_change(batch, torch.Generator().manual_seed(self.seed))

    def state_dict(self) -> dict:
        return {"change": self.change}

    def load_state_dict(self, state_dict: dict) -> None:
        self.change = state_dict["change"]


class FidelityCurve(L.Callback):
    """At step 0 and every ``every_n_steps``, samples the first ``num_images`` held-out conditions
    (true prompts, fixed noise) and logs ``curve/<fidelity metric>`` and, on fill50k-format data,
    ``curve/mask_iou`` and ``curve/color_accuracy`` (what the locked base keeps) against the global
    step. The curve is kept in the callback's state, so a resumed run continues it.
    """

    def __init__(self, every_n_steps: int, num_images: int, condition: str, resolution: int, edge_tolerance: int = 1,
                 seed: int = 1234, sampling: dict | None = None, detector_weights: str | None = None,
                 canny_thresholds: tuple[int, int] = (100, 200), batch_size: int | None = None, detector_device: str = "cpu"):
        if every_n_steps < 1 or num_images < 1:
            raise ValueError(f"eval.every_n_steps and eval.curve_images must be >= 1, got {every_n_steps} and {num_images}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"eval.curve_batch_size must be >= 1 (or null: all curve images in one batch), got {batch_size}")
        self.every_n_steps, self.num_images, self.seed = every_n_steps, num_images, seed
        self.batch_size = batch_size or num_images
        self.sampling = Sampling.from_config(sampling or {})
        self.fidelity = ConditionFidelity(condition, resolution, edge_tolerance, detector_weights, tuple(canny_thresholds), detector_device)
        self.curve: list[dict] = []
        self.seconds = 0.0
        self.train_started: float | None = None
        self._held_out: tuple[torch.Tensor, np.ndarray, np.ndarray, list[str]] | None = None
        self._palette: list[str] = []

    @property
    def metric(self) -> str:
        return self.fidelity.metric

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Step 0, or a resumed run's first step when it is one of the curve's and not yet measured.
        step = trainer.global_step
        self.train_started = time.perf_counter()
        if step % self.every_n_steps == 0 and not any(point["step"] == step for point in self.curve):
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        share = self.share_of_training()
        if share is not None and share > 0.25:
            log.warning(f"the fidelity curve took {share:.0%} of the training time ({self.seconds:.0f} s): measure it less often "
                        f"(eval.every_n_steps={self.every_n_steps}) or on fewer conditions (eval.curve_images={self.num_images})")

    def share_of_training(self) -> float | None:
        """The curve's seconds over the seconds spent training between its points (None before training ran)."""
        if self.train_started is None:
            return None
        training = time.perf_counter() - self.train_started - self.seconds
        return self.seconds / training if training > 0 else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.measure(trainer, pl_module)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One point of the curve. Reading held-out samples draws from Python's ``random`` (the
        prompt-dropout draw), so every global RNG is restored afterwards: a run with the curve
        trains exactly as one without it."""
        with preserved_rng():
            self._measure(trainer, pl_module)

    def held_out(self, trainer: L.Trainer) -> tuple[torch.Tensor, np.ndarray, np.ndarray | None, list[str]]:
        """(conditions, the same as uint8 images, outlines where the oracle applies, true prompts) of the fixed
        held-out samples, read once."""
        if self._held_out is None:
            dataset = trainer.datamodule.val_dataset()
            items = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
            conditions = torch.stack([item["condition"] for item in items])
            outlines = None if oracle_skip_reason(items) else to_uint8(torch.stack([item["source"] for item in items]), 0.0, 1.0)
            self._held_out = (conditions, to_uint8(conditions, 0.0, 1.0), outlines, [item["true_prompt"] for item in items])
            self._palette = palette_of(trainer.datamodule.prompts()) if outlines is not None else []
        return self._held_out

    @torch.no_grad()
    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        started = time.perf_counter()
        conditions, condition_images, outlines, prompts = self.held_out(trainer)
        was_training = pl_module.controlnet.training
        pl_module.controlnet.eval()
        images = generate(pl_module.base, pl_module.controlnet, conditions, prompts,
                          batch_size=self.batch_size, seed=self.seed, sampling=self.sampling, desc="fidelity curve")
        pl_module.controlnet.train(was_training)
        point = {"step": trainer.global_step, self.metric: self.fidelity.score(images, condition_images)["value"]}
        if outlines is not None:
            scores = score_images(images, outlines, prompts, self._palette)
            point.update(mask_iou=scores["mask_iou"], color_accuracy=scores["color_accuracy"])
        self.curve.append(point)
        self.seconds += time.perf_counter() - started
        for logger in trainer.loggers:
            logger.log_metrics({f"curve/{k}": v for k, v in point.items() if k != "step"}, step=trainer.global_step)

    def summary(self) -> dict:
        """The curve, its fidelity metric's 10-90% rise, and the sudden-convergence step (None without a sudden rise)."""
        curve = sorted(self.curve, key=lambda point: point["step"])
        found = rise([point["step"] for point in curve], [point[self.metric] for point in curve])
        return {
            "curve": curve,
            "curve_metric": self.metric,
            "curve_images": self.num_images,
            "curve_seconds": round(self.seconds, 2),
            "curve_share_of_training": None if (share := self.share_of_training()) is None else round(share, 4),
            "rise": found,
            "sudden_convergence_step": sudden_step(found),
        }

    def state_dict(self) -> dict:
        return {"curve": self.curve}

    def load_state_dict(self, state_dict: dict) -> None:
        self.curve = list(state_dict["curve"])


class ValidationImages(L.Callback):
    """The user's own conditions and prompts sampled during training (diffusers' ``--validation_image`` /
    ``--validation_prompt``): at step 0, every ``every_n_steps`` and at the end, one image per condition with a
    fixed seed, saved as ``<output>/validation/step_NNNNNN.png`` (condition row, generated row) and sent to
    the loggers that take images (W&B). ``images`` are condition images, used as given (fitted to the resolution);
    ``prompts``: one for all, or one per image. Both are checked when the callback is made, before any training.
    """

    def __init__(self, images: list[str], prompts: list[str], every_n_steps: int, resolution: int, output_dir: str,
                 seed: int = 1234, sampling: dict | None = None, batch_size: int = 8):
        images, prompts = [str(i) for i in images or []], [str(p) for p in prompts or []]
        missing = [path for path in images if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"eval.validation.images: {missing[0]} does not exist")
        if images and len(prompts) not in (1, len(images)):
            raise ValueError(f"eval.validation.prompts has {len(prompts)} entries for {len(images)} eval.validation.images: give one for all or one per image")
        if prompts and not images:
            raise ValueError("eval.validation.prompts needs eval.validation.images (the conditions to sample them with)")
        if every_n_steps < 1:
            raise ValueError(f"eval.validation.every_n_steps must be >= 1, got {every_n_steps}")
        self.conditions = (torch.from_numpy(np.stack([load_rgb(path, resolution) for path in images]).astype(np.float32) / 255.0)
                           .permute(0, 3, 1, 2) if images else None)
        self.prompts = prompts * len(images) if len(prompts) == 1 else prompts
        if batch_size < 1:
            raise ValueError(f"eval.validation.batch_size must be >= 1, got {batch_size}")
        self.every_n_steps, self.seed, self.folder = every_n_steps, seed, Path(output_dir) / "validation"
        self.batch_size = batch_size
        self.sampling = Sampling.from_config(sampling or {})

    def on_train_start(self, trainer, pl_module) -> None:
        self.sample(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not (self.folder / f"step_{trainer.global_step:06d}.png").is_file():
            self.sample(trainer, pl_module)

    @torch.no_grad()
    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.conditions is None or not trainer.is_global_zero:
            return
        was_training = pl_module.controlnet.training
        pl_module.controlnet.eval()
        with preserved_rng():
            images = generate(pl_module.base, pl_module.controlnet, self.conditions, self.prompts, batch_size=self.batch_size,
                              seed=self.seed, sampling=self.sampling, desc="validation images")
        pl_module.controlnet.train(was_training)
        path = save_grid([to_uint8(self.conditions, 0.0, 1.0), images], self.folder / f"step_{trainer.global_step:06d}.png")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("validation/images", images=[str(path)], step=trainer.global_step, caption=[" | ".join(self.prompts)])
