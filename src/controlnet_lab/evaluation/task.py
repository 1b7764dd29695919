"""The final evaluation of a trained ControlNet, as training and eval/evaluate.py run it: the held-out and seen
scores with the run's settings, the sample grid, and the scores as loggers take them."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from controlnet_lab.data.datamodule import ControlDataModule
from controlnet_lab.evaluation.held_out import ComposedNet, MetricSuite, evaluate_held_out, evaluate_seen
from controlnet_lab.evaluation.prompts import PROMPT_SETTINGS
from controlnet_lab.evaluation.suite import dataset_palette, metric_suite
from controlnet_lab.images import save_grid
from controlnet_lab.module import ControlNetModule
from controlnet_lab.sampling import Sampling
from controlnet_lab.tracking import flat


def held_out_scores(cfg: DictConfig, module: ControlNetModule, data: ControlDataModule, suite: MetricSuite | None = None,
                    composed: list[ComposedNet] | None = None) -> dict:
    """The final evaluation on the test part of the held-out split (never the validation part, which steered the run), with the run's sampling and eval settings and every enabled metric
    (and the ``composed`` ControlNets sampled with the run's, eval/evaluate.py's ``compose``)."""
    return evaluate_held_out(module.base, module.controlnet, data.test_dataset(), dataset_palette(data), count=cfg.eval.num_images,
                             batch_size=cfg.eval.batch_size, seed=cfg.eval.seed, sampling=Sampling.from_config(cfg.model.sampling),
                             suite=suite or metric_suite(cfg, data), prompt_settings=prompt_settings(cfg), composed=composed,
                             references=cfg.eval.get("reference_points", True))


def seen_scores(cfg: DictConfig, module: ControlNetModule, data: ControlDataModule, held_out: dict, suite: MetricSuite) -> dict:
    """The perfect prompt's scores on ``eval.train_images`` training conditions, and each one's gap to the held-out score
    (seen minus unseen)."""
    seen = evaluate_seen(module.base, module.controlnet, data.dataset("train"), dataset_palette(data), count=cfg.eval.train_images,
                         batch_size=cfg.eval.batch_size, seed=cfg.eval.seed, sampling=Sampling.from_config(cfg.model.sampling), suite=suite)
    gap = {key: seen[key] - held_out[key] for key in seen if key != "images" and held_out.get(key) is not None}
    return {"seen": seen, "seen_minus_held_out": gap}


def prompt_settings(cfg: DictConfig) -> list[str] | None:
    chosen = cfg.eval.get("prompt_settings")
    return None if chosen is None else list(chosen)


def save_eval_grid(samples: dict, path: Path, columns: int = 16) -> Path:
    """Rows: condition, target, base alone (perfect prompt), then base + ControlNet under each prompt setting evaluated."""
    rows = ["conditions", "targets", "base", *[s for s in PROMPT_SETTINGS if s in samples]]
    return save_grid([samples[row][:columns] for row in rows], path)


def flat_metrics(metrics: dict, prefix: str) -> dict:
    """Nested metrics as flat ``prefix/a/b`` keys, numbers only (what loggers accept)."""
    return {key: value for key, value in flat(metrics, "/", f"{prefix}/").items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}

