"""Callbacks that measure during training: the untrained ControlNet's change to the base's prediction, the fidelity
curve (for the sudden-convergence plot) and the user's validation images. Run mechanics are in run_state.py."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import default_collate

from controlnet_lab.data.samples import load_rgb
from controlnet_lab.evaluation.held_out import generate, oracle_skip_reason
from controlnet_lab.evaluation.prompts import palette_of
from controlnet_lab.images import save_grid, to_uint8
from controlnet_lab.metrics.convergence import curve_convergence, stopping_reading
from controlnet_lab.metrics.fidelity import ConditionFidelity
from controlnet_lab.metrics.oracle import score_images
from controlnet_lab.run_state import preserved_rng
from controlnet_lab.sampling import Sampling

log = logging.getLogger(__name__)


class InitialOutputChange(L.Callback):
    """Before the first step, how much the untrained ControlNet changes the locked base's noise prediction on the first
    ``num_images`` validation samples (true prompts; noise and timesteps drawn from ``seed``): zero convs leave it
    unchanged, a Gaussian init does not (the damage to the locked model that the paper gives as the reason for zero
    convs, Sec. 4.2). Kept in the callback's state, so a resumed run reports the value its step 0 measured."""

    def __init__(self, num_images: int = 32, seed: int = 1234):
        self.num_images, self.seed = num_images, seed
        self.change: dict | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != 0:
            return
        with preserved_rng():
            dataset = trainer.datamodule.validation_dataset()
            batch = default_collate([dataset[i] for i in range(min(self.num_images, len(dataset)))])
            batch = {key: value.to(pl_module.device) if torch.is_tensor(value) else value for key, value in batch.items()}
            self.change = pl_module.output_change(batch, torch.Generator().manual_seed(self.seed))

    def state_dict(self) -> dict:
        return {"change": self.change}

    def load_state_dict(self, state_dict: dict) -> None:
        self.change = state_dict["change"]


class FidelityCurve(L.Callback):
    """At step 0 and every ``every_n_steps``, samples the first ``num_images`` validation conditions
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
        validation samples (the first ``num_images``, or all where the validation set is smaller), read once."""
        if self._held_out is None:
            dataset = trainer.datamodule.validation_dataset()
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
        return {
            "curve": curve,
            "curve_metric": self.metric,
            "curve_images": len(self._held_out[3]) if self._held_out is not None else self.num_images,  # as measured
            "curve_seconds": round(self.seconds, 2),
            "curve_share_of_training": None if (share := self.share_of_training()) is None else round(share, 4),
            **curve_convergence(curve, self.metric),
        }

    def state_dict(self) -> dict:
        return {"curve": self.curve}

    def load_state_dict(self, state_dict: dict) -> None:
        self.curve = list(state_dict["curve"])


class ConvergenceStop(L.Callback):
    """The stopping rule: ends training once the fidelity curve (the FidelityCurve callback's, on the validation
    conditions) has converged: the 95% interval of its slope over the last ``points`` points lies below
    ``max_slope_per_1k`` (the metric's gain per 1,000 steps), after at least ``min_steps``, the curve having risen at
    least ``min_rise`` above its first point (metrics.convergence.stopping_reading). ``trainer.max_steps`` caps a
    run that never converges. ``summary()`` (results.json's ``stopping``) says whether and where it converged, with
    the slope and interval that decided. ``enabled: false`` records the rule's reading at the end without stopping."""

    def __init__(self, enabled: bool = False, points: int = 16, max_slope_per_1k: float = 0.05, min_steps: int = 0,
                 metric: str | None = None, min_rise: float = 0.0):
        if points < 3:
            raise ValueError(f"eval.stopping.points must be >= 3 (a slope and its interval), got {points}")
        if max_slope_per_1k <= 0 or min_steps < 0:
            raise ValueError(f"eval.stopping.max_slope_per_1k must be > 0 and eval.stopping.min_steps >= 0, got {max_slope_per_1k} and {min_steps}")
        if min_rise < 0:
            raise ValueError(f"eval.stopping.min_rise must be >= 0 (the metric's rise above its first point), got {min_rise}")
        self.enabled, self.points, self.max_slope, self.min_steps, self.metric = enabled, points, max_slope_per_1k, min_steps, metric
        self.min_rise = min_rise
        self.checked_points = 0
        self.converged_at: int | None = None
        self.last: dict | None = None
        self.fidelity_curve: FidelityCurve | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fidelity_curve = next((c for c in trainer.callbacks if isinstance(c, FidelityCurve)), None)
        if self.enabled and self.fidelity_curve is None:  # before any step: a run without the curve cannot stop by it
            raise ValueError("eval.stopping.enabled=true reads the fidelity curve: keep callbacks.fidelity_curve")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        curve = self.fidelity_curve
        if curve is None or len(curve.curve) == self.checked_points or self.converged_at is not None:
            return
        self.checked_points = len(curve.curve)
        self.last = self.reading(curve)
        if self.last is not None and self.last["converged"]:
            self.converged_at = self.last["to_step"]
            if self.enabled:
                trainer.should_stop = trainer.strategy.reduce_boolean_decision(True, all=False)

    def reading(self, curve: FidelityCurve) -> dict | None:
        points = sorted(curve.curve, key=lambda point: point["step"])
        metric = self.metric or curve.metric
        if any(metric not in point for point in points):
            raise ValueError(f"eval.stopping.metric={metric!r} is not on the fidelity curve (it has {sorted(points[0])})")
        return stopping_reading([p["step"] for p in points], [p[metric] for p in points], self.points, self.max_slope, self.min_steps,
                                self.min_rise)

    def summary(self) -> dict:
        return {"stopping": {"enabled": self.enabled, "converged": self.converged_at is not None, "converged_at_step": self.converged_at,
                             "rule": {"points": self.points, "max_slope_per_1k": self.max_slope, "min_steps": self.min_steps,
                                      "min_rise": self.min_rise, "metric": self.metric}, "last_reading": self.last}}

    def state_dict(self) -> dict:
        return {"checked_points": self.checked_points, "converged_at": self.converged_at, "last": self.last}

    def load_state_dict(self, state_dict: dict) -> None:
        self.checked_points, self.converged_at, self.last = state_dict["checked_points"], state_dict["converged_at"], state_dict["last"]


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
