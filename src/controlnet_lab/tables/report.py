"""Paper-style tables from a sweep: one row per method, mean, spread and interval over seeds, and the differences.

A sweep is a Hydra multirun directory of src/train.py, where every finished job left a
``results.json`` in its subdirectory, or of eval/evaluate.py, where it left an
``eval.json``. A "method" is a combination of the values that vary across the sweep's
jobs among ``METHOD_KEYS`` (block and its init std, data size, prompt dropout, condition, the
conditions of ControlNets composed in an evaluation, guidance scale, CFG resolution weighting, conditioning scale); the jobs of one method differ
only in their seed (the training seed, and for re-scored checkpoints the evaluation seed). Methods are
compared with intervals.py: each against the first method of the sweep, or every pair.

``write_tables`` writes the tables, differences and plots; ``log_to_wandb`` sends them to the sweep's W&B group."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import wandb

from controlnet_lab.evaluation.prompts import PROMPT_SETTINGS
from controlnet_lab.tables.plots import plot_curves, plot_mask_iou, sample_sheet
from controlnet_lab.tables.render import display_differences, display_table, paper_note
from controlnet_lab.tables.statistics import METRICS, average_evaluation_seeds, curve_metrics, differences, summarize
from controlnet_lab.tables.sweeps import add_curve_points, load_sweeps, rescore_record, rows_where, unfinished_note
from controlnet_lab.tracking import sweep_group, typed_tables, wandb_mode


def write_tables(sweep_dir: Path, out_dir: Path | None = None, rescored: bool = False, level: float = 0.95,
                 comparisons: str = "reference", correction: str = "none", curve_steps=(),
                 extra_sweeps=(), average_eval_seeds: bool = False, only=(), margins: dict | None = None) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Write table.md, table.csv (numbers), table.tex, the differences (differences.md/.csv/.tex) and the plots;
    returns the displayed table and the paths. ``curve_steps``: fidelity-curve steps whose values join the metrics.
    ``extra_sweeps``: more multirun directories (an arm launched later) whose jobs join the sweep's, after them.
    ``average_eval_seeds``: see average_evaluation_seeds. ``only``: "key=value" entries, the jobs kept (rows_where).
    ``margins``: equivalence margins by metric column (statistics.differences)."""
    frame, unfinished = load_sweeps([sweep_dir, *extra_sweeps], rescored)
    frame = rows_where(frame, only)
    metrics = METRICS + add_curve_points(frame, curve_steps)
    if average_eval_seeds:
        frame = average_evaluation_seeds(frame, metrics)
    out_dir = Path(out_dir or sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(frame, level, metrics)
    table = display_table(summary, metrics)
    paths = {"markdown": out_dir / "table.md", "csv": out_dir / "table.csv", "latex": out_dir / "table.tex"}
    compared = differences(frame, level, comparisons, correction, metrics, margins)
    if len(compared):
        shown = display_differences(compared)
        paths.update({"differences_markdown": out_dir / "differences.md", "differences_csv": out_dir / "differences.csv",
                      "differences_latex": out_dir / "differences.tex"})
        paths["differences_markdown"].write_text(shown.to_markdown(index=False, disable_numparse=True) + "\n")
        compared.to_csv(paths["differences_csv"], index=False)
        paths["differences_latex"].write_text(shown.to_latex(index=False, escape=True))
    note = "".join(unfinished_note(folder, jobs) for folder, jobs in unfinished.items()) or "\n"
    if rescored:
        count = sum(rescore_record(Path(job)) is not None for job in frame["job_dir"])
        note += f"\nMetrics of {count} of {len(frame)} jobs re-scored by eval/evaluate.py (their checkpoints/eval.json).\n"
    paths["markdown"].write_text(table.to_markdown(index=False, disable_numparse=True) + note + paper_note(summary))
    summary.to_csv(paths["csv"], index=False)
    paths["latex"].write_text(table.to_latex(index=False, escape=True))
    if any(f"metrics.prompt_settings.{s}.mask_iou:mean" in summary for s in PROMPT_SETTINGS):
        paths["mask_iou_plot"] = plot_mask_iou(summary, out_dir / "mask_iou_by_prompt.png", level)
    if sheet := sample_sheet(frame, out_dir / "samples.png"):
        paths["samples"] = sheet
    if "metrics.curve" in frame:
        paths["curves"] = plot_curves(frame, out_dir / "fidelity_curves.png")
        # mask IoU on one scale for all, where the jobs' own fidelity metrics differ (a sweep of condition types)
        quantities = {"color_curves": "color_accuracy", **({"mask_iou_curves": "mask_iou"} if curve_metrics(frame).size > 1 else {})}
        for key, quantity in quantities.items():
            if any(isinstance(curve, list) and curve and quantity in curve[0] for curve in frame["metrics.curve"]):
                paths[key] = plot_curves(frame, out_dir / f"{quantity}_curves.png", quantity)
    return table, paths


def log_to_wandb(paths: dict[str, Path], sweep_dir: Path, project: str = "controlnet-lab") -> None:
    """The tables (numbers typed) and plots as a W&B run of job type "tables", in the sweep's group (WANDB_MODE; offline
    when unset)."""
    run = wandb.init(project=project, group=sweep_group(sweep_dir), job_type="tables", name="tables", dir=str(sweep_dir), mode=wandb_mode())
    run.log({**{name: wandb.Table(dataframe=frame) for name, frame in typed_tables(paths).items()},
             **{name: wandb.Image(str(path)) for name, path in paths.items() if path.suffix == ".png"}})
    run.finish()
