"""The statistics of a sweep's table: per method mean, spread and interval over seeds, and the paired or Welch
differences between methods (intervals.py)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from controlnet_lab.evaluation.prompts import PROMPT_SETTINGS
from controlnet_lab.intervals import difference, half_width
from controlnet_lab.tables.sweeps import SweepError, method_columns, method_labels

# (column of the flattened results, label in the tables)
METRICS = (
    *[(f"metrics.prompt_settings.{s}.mask_iou", f"mask IoU ({s} prompt)") for s in PROMPT_SETTINGS],
    *[(f"metrics.prompt_settings.{s}.centre_error_px", f"circle-centre error px ({s} prompt)") for s in ("none", "perfect")],
    ("metrics.prompt_settings.perfect.color_accuracy", "color acc. (perfect)"),
    ("metrics.prompt_settings.conflicting.color_accuracy", "color acc. (conflicting: prompt's colors)"),
    ("metrics.edge_f1", "edge F1 (perfect; re-detection, 1 px)"),
    *[(f"metrics.prompt_settings.{s}.edge_f1", f"edge F1 ({s} prompt)") for s in PROMPT_SETTINGS if s != "perfect"],
    ("metrics.seg_miou", "seg mIoU (perfect; re-segmented)"),
    ("metrics.fid_domain", "FID (domain features)"),
    ("metrics.fid", "FID (Inception)"),
    ("metrics.clip_score", "CLIP score"),
    ("metrics.seen_minus_held_out.mask_iou", "mask IoU, training minus held-out conditions (perfect)"),
    ("metrics.seen_minus_held_out.edge_f1", "edge F1, training minus held-out conditions (perfect)"),
    ("metrics.initial_output_change.relative", "base output change at step 0 (relative)"),
    ("metrics.sudden_convergence_step", "sudden-convergence step"),
    ("metrics.rise.rise_share", "10-90% rise / steps to reach 90%"),
    ("metrics.rise.half_step", "step reaching half of the rise"),
    ("metrics.rise.end_step", "step reaching 90% of the rise"),
    ("metrics.base_mask_iou", "base alone mask IoU"),
    # the floors of the perfect prompt's scores on any data (eval.reference_points)
    *[(f"metrics.prompt_settings.perfect.{ref}.{m}", f"{label} ({name}, perfect)") for ref, name in
      (("base_alone", "base alone"), ("shuffled_condition", "another sample's condition")) for m, label in (("mask_iou", "mask IoU"), ("edge_f1", "edge F1"))],
    ("metrics.trainable_params", "trainable params"),
)


def numeric_metrics(frame: pd.DataFrame, keys: list[str], metrics=METRICS) -> tuple[pd.DataFrame, list[str]]:
    """The ``keys`` columns and the metrics the sweep recorded, as numbers (NaN where a job has none), and those metrics."""
    present = [column for column, _ in metrics if column in frame]
    numeric = frame[keys + present].copy()
    numeric[present] = numeric[present].apply(pd.to_numeric, errors="coerce")
    return numeric, present


def average_evaluation_seeds(frame: pd.DataFrame, metrics=METRICS) -> pd.DataFrame:
    """One row per method and training seed, its metrics the mean over the evaluation seeds (``eval.seed``) of the same
    checkpoint: the intervals and pairs are then over trained models, the unit that varies between training runs, not
    over noise draws of one model, which are not independent samples of it."""
    if "eval.seed" not in frame:
        return frame
    keys = method_columns(frame) + ["seed"]
    numeric, present = numeric_metrics(frame, keys, metrics)
    rows = frame.groupby(keys, sort=False, dropna=False).first()
    rows[present] = numeric.groupby(keys, sort=False, dropna=False)[present].mean()
    return rows.reset_index().drop(columns="eval.seed")


def summarize(frame: pd.DataFrame, level: float = 0.95, metrics=METRICS) -> pd.DataFrame:
    """Per method: mean, standard deviation (ddof=1) and the t-interval at ``level`` of the mean over seeds of every
    metric, and the seed count."""
    methods = method_columns(frame)
    numeric, present = numeric_metrics(frame, methods, metrics)
    grouped = numeric.groupby(methods, sort=False, dropna=False)
    stats = grouped[present].agg(["mean", "std", "count"])
    for column in present:
        mean, std, count = (stats[(column, stat)] for stat in ("mean", "std", "count"))
        half = half_width(std, count, level)
        stats[(column, "low")], stats[(column, "high")] = mean - half, mean + half
    summary = stats[[(column, stat) for column in present for stat in ("mean", "std", "low", "high")]]
    summary.columns = [f"{column}:{stat}" for column, stat in summary.columns]
    summary["seeds"] = grouped.size()
    summary["eval_images"] = frame.groupby(methods, sort=False, dropna=False)["metrics.eval_images"].first()
    return summary.reset_index()


def summary_methods(summary: pd.DataFrame) -> list[str]:
    """The method columns of a ``summarize`` result (the rest are statistics)."""
    return [c for c in summary.columns if ":" not in c and c not in ("seeds", "eval_images")]


def differences(frame: pd.DataFrame, level: float = 0.95, comparisons: str = "reference", correction: str = "none",
                metrics=METRICS, margins: dict[str, float] | None = None) -> pd.DataFrame:
    """Per pair of methods and metric: the difference of the means (later method minus earlier, in launch order), its
    interval (paired by seed where the seeds match), the effect this design detects with 80% power, and the verdict.

    ``comparisons``: "reference" compares every method with the sweep's first, "all_pairs" every pair. ``correction``:
    "bonferroni" widens every interval to level 1 - (1 - level) / (number of comparisons), so that the chance of any
    false call stays at 1 - level; "none" leaves them at ``level``. ``margins``: {metric column: equivalence margin},
    fixed before the runs; those metrics' rows also say where the interval lies against it (``against_margin``).
    """
    if comparisons not in ("reference", "all_pairs"):
        raise SweepError(f"comparisons={comparisons!r}: choose reference or all_pairs")
    if correction not in ("none", "bonferroni"):
        raise SweepError(f"correction={correction!r}: choose none or bonferroni")
    methods = method_columns(frame)
    labels = pd.Series(method_labels(frame, methods), index=frame.index)
    order = list(dict.fromkeys(labels))
    pairs = [(m, order[0]) for m in order[1:]] if comparisons == "reference" else [(b, a) for a, b in itertools.combinations(order, 2)]
    used = 1 - (1 - level) / len(pairs) if correction == "bonferroni" and pairs else level
    present = [(column, label) for column, label in metrics if column in frame and not column.endswith("trainable_params")]
    margins = dict(margins or {})
    if unknown := sorted(set(margins) - {column for column, _ in present}):
        raise SweepError(f"margins: {unknown} are not metrics of this sweep's records; choose among {[c for c, _ in present]}")
    # What pairs two jobs: the training seed, and for evaluation sweeps (eval/evaluate.py) also the evaluation seed.
    seeds = frame[[c for c in ("seed", "eval.seed") if c in frame]].astype(str).agg("/".join, axis=1)
    numeric = {column: pd.to_numeric(frame[column], errors="coerce").astype(float) for column, _ in present}
    rows = []
    for treatment, reference in pairs:
        for column, label in present:
            values = numeric[column]
            scores = {m: dict(zip(seeds[labels == m], values[labels == m])) for m in (treatment, reference)}
            d = difference(scores[treatment], scores[reference], used)
            if math.isnan(d.mean):
                continue
            rows.append({"method": treatment, "vs": reference, "metric": label, "difference": d.mean, "low": d.low, "high": d.high,
                         "level": round(used, 4), "seeds": d.seeds, "paired": d.paired, "detectable_80pct_power": d.detectable,
                         "verdict": d.verdict, "seeds_to_decide": d.seeds_to_decide,
                         **({"margin": margins[column], "against_margin": d.against_margin(margins[column])} if column in margins else {})})
    return pd.DataFrame(rows)


def curve_metrics(frame: pd.DataFrame) -> np.ndarray:
    """The fidelity metrics the jobs' curves follow (one per condition type: edge_f1, seg_miou)."""
    return frame["metrics.curve_metric"].dropna().unique()
