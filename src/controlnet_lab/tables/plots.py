"""A sweep's plots: fidelity curves with each job's rise shaded, mask IoU per prompt setting with intervals, and
the sheet of sample grids."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from controlnet_lab.evaluation.prompts import PROMPT_SETTINGS  # noqa: E402
from controlnet_lab.tables.statistics import curve_metrics, summary_methods  # noqa: E402
from controlnet_lab.tables.sweeps import method_columns, method_labels  # noqa: E402


def plot_curves(frame: pd.DataFrame, path: Path, quantity: str | None = None) -> Path:
    """Condition fidelity against the training step, one line per job; each job's 10%-to-90% rise shaded between
    dashed lines at its 10% and 90% levels, the sudden-convergence step dotted (convergence.py). With ``quantity``,
    another value the curves recorded (``color_accuracy``: what the base keeps), without those marks."""
    methods = method_columns(frame)
    figure, axis = plt.subplots(figsize=(7, 3.8))
    colors = {}
    for (_, row), label in zip(frame.iterrows(), method_labels(frame, methods)):
        curve = row["metrics.curve"]
        if not isinstance(curve, list) or not curve:
            continue
        metric = quantity or row["metrics.curve_metric"]
        if metric not in curve[0]:
            continue  # a curve that did not record it (a sweep joined from before the curves recorded color accuracy)
        color = colors.setdefault(label, f"C{len(colors)}")
        steps = [point["step"] for point in curve]
        axis.plot(steps, [point[metric] for point in curve], color=color, alpha=0.8, label=label if label not in axis.get_legend_handles_labels()[1] else None)
        if quantity:
            continue
        start, end = row.get("metrics.rise.start_step"), row.get("metrics.rise.end_step")
        if start is not None and not pd.isna(start):
            initial, final = row["metrics.rise.initial"], row["metrics.rise.final"]
            axis.axvspan(start, end, color=color, alpha=0.12)
            for fraction in (0.1, 0.9):
                axis.hlines(initial + fraction * (final - initial), steps[0], steps[-1], color=color, linestyle="--", linewidth=0.8, alpha=0.6)
        jump = row.get("metrics.sudden_convergence_step")
        if jump is not None and not pd.isna(jump):
            axis.axvline(jump, color=color, linestyle=":", alpha=0.8)
    axis.set_xlabel("training step")
    own = " / ".join(curve_metrics(frame)) + (" (each job's own condition)" if curve_metrics(frame).size > 1 else "")
    axis.set_ylabel(f"{quantity or own} ({int(frame['metrics.curve_images'].dropna().iloc[0])} held-out conditions)")
    axis.set_title(f"{quantity} during training" if quantity else
                   "condition fidelity during training (shaded: 10-90% rise; dotted: sudden-convergence step)", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_mask_iou(summary: pd.DataFrame, path: Path, level: float = 0.95) -> Path:
    """Grouped bars: mask IoU per prompt setting evaluated, for each method, error bars the interval of the mean over
    seeds; the legend below the axes, where it hides no bar."""
    methods = summary_methods(summary)
    settings = [s for s in PROMPT_SETTINGS if f"metrics.prompt_settings.{s}.mask_iou:mean" in summary]
    figure, axis = plt.subplots(figsize=(7, 3.5 + 0.2 * len(summary)))
    width = 0.8 / len(summary)
    x = np.arange(len(settings))
    for i, ((_, row), label) in enumerate(zip(summary.iterrows(), method_labels(summary, methods))):
        means = [row[f"metrics.prompt_settings.{s}.mask_iou:mean"] for s in settings]
        errors = [[m - row[f"metrics.prompt_settings.{s}.mask_iou:low"] for m, s in zip(means, settings)],
                  [row[f"metrics.prompt_settings.{s}.mask_iou:high"] - m for m, s in zip(means, settings)]]
        axis.bar(x + i * width, means, width, yerr=np.nan_to_num(errors), capsize=2, label=label)
    axis.set_xticks(x + 0.4 - width / 2, [f"{s}\nprompt".replace("_", " ") for s in settings], fontsize=8)
    axis.set_ylabel(f"mask IoU (mean, {level:.0%} interval; {int(summary['seeds'].min())}+ seeds)", fontsize=8)
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1 if len(summary) > 3 else len(summary), frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def sample_sheet(frame: pd.DataFrame, path: Path) -> Path | None:
    """Each method's evaluation grid (its lowest seed): condition, target, base alone, then each prompt setting (None
    where no job left a grid)."""
    methods = method_columns(frame)
    firsts = frame.sort_values("seed").groupby(methods, sort=False, dropna=False).head(1)
    grids = [(row, label, Path(row["job_dir"]) / "eval_samples.png") for (_, row), label in zip(firsts.iterrows(), method_labels(firsts, methods))]
    grids = [(row, label, grid) for row, label, grid in grids if grid.is_file()]
    if not grids:
        return None
    evaluated = frame["metrics.settings_evaluated"].iloc[0] if "metrics.settings_evaluated" in frame else PROMPT_SETTINGS
    row_names = ["condition", "target", "base alone", *[f"{s} prompt" for s in evaluated]]
    figure, axes = plt.subplots(len(grids), 1, figsize=(12, 4.2 * len(grids)), squeeze=False)
    for axis, (row, label, grid) in zip(axes[:, 0], grids):
        image = Image.open(grid)
        axis.imshow(image, interpolation="nearest")
        axis.set_title(f"{label} (seed {row['seed']})", fontsize=10)
        axis.set_xticks([])
        step = image.height / len(row_names)
        axis.set_yticks([step * (i + 0.5) for i in range(len(row_names))], row_names, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
