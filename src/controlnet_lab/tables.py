"""Paper-style tables from a sweep: one row per method, mean, spread and interval over seeds, and the differences.

A sweep is a Hydra multirun directory of src/train.py, where every finished job left a
``results.json`` in its subdirectory, or of eval/evaluate.py, where it left an
``eval.json``. A "method" is a combination of the values that vary across the sweep's
jobs among ``METHOD_KEYS`` (block and its init std, data size, prompt dropout, condition, the
conditions of ControlNets composed in an evaluation, guidance scale, CFG resolution weighting, conditioning scale); the jobs of one method differ
only in their seed (the training seed, and for re-scored checkpoints the evaluation seed). Methods are
compared with intervals.py: each against the first method of the sweep, or every pair.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import wandb  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from controlnet_lab.evaluation.prompts import PROMPT_SETTINGS  # noqa: E402
from controlnet_lab.failures import failed_jobs  # noqa: E402
from controlnet_lab.intervals import difference, half_width  # noqa: E402
from controlnet_lab.tracking import sweep_group, typed_tables, wandb_mode  # noqa: E402

METHOD_KEYS = ("block", "block_std", "data.size", "data.prompt_dropout", "data.condition", "composition", "sampling.guidance_scale",
               "sampling.resolution_weighting", "sampling.conditioning_scale")
RECORD_FILES = ("results.json", "eval.json")  # what a job of src/train.py, or of eval/evaluate.py, leaves
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
    ("metrics.rise.rise_fraction", "10-90% rise / training"),
    ("metrics.rise.half_step", "step reaching half of the rise"),
    ("metrics.rise.end_step", "step reaching 90% of the rise"),
    ("metrics.base_mask_iou", "base alone mask IoU"),
    ("metrics.trainable_params", "trainable params"),
)
# The paper's numbers where it has them (SD 1.5 on ADE20K segmentation; Tables 2 and 3), by block.
PAPER = {
    "zero": {"FID (Inception)": 15.27, "CLIP score": 0.26, "seg IoU (OneFormer re-detection)": 0.35},
    "single": {"FID (Inception)": 17.92, "CLIP score": 0.26, "seg IoU (OneFormer re-detection)": 0.32},
}


CURVE_QUANTITIES = (("mask_iou", "mask IoU"), ("edge_f1", "edge F1"), ("seg_miou", "seg mIoU"), ("color_accuracy", "color acc."))


class SweepError(ValueError):
    pass


def add_curve_points(frame: pd.DataFrame, steps) -> tuple[tuple[str, str], ...]:
    """Add each job's fidelity-curve values at ``steps`` to ``frame`` as metric columns (``metrics.curve_at_<step>.<quantity>``)
    and return their (column, label) pairs, so that the tables give them intervals and paired differences like the
    final scores. A step the curves did not record is an error naming it."""
    if not steps:
        return ()
    if "metrics.curve" not in frame:
        raise SweepError(f"curve_steps={list(steps)}: the jobs recorded no fidelity curve (callbacks.fidelity_curve)")
    added = []
    images = int(frame["metrics.curve_images"].dropna().iloc[0])
    for step in steps:
        points = [next((p for p in curve if p["step"] == step), None) if isinstance(curve, list) else None for curve in frame["metrics.curve"]]
        if all(point is None for point in points):
            recorded = sorted({p["step"] for curve in frame["metrics.curve"] if isinstance(curve, list) for p in curve})
            raise SweepError(f"curve_steps: no job's curve has step {step} (recorded: {recorded})")
        for quantity, name in CURVE_QUANTITIES:
            if any(point and quantity in point for point in points):
                column = f"metrics.curve_at_{step}.{quantity}"
                frame[column] = [point.get(quantity) if point else np.nan for point in points]
                added.append((column, f"{name} at step {step} (curve, {images} held-out)"))
    return tuple(added)


def load_sweep(sweep_dir: Path, rescored: bool = False) -> tuple[pd.DataFrame, list[Path]]:
    """(one flattened row per finished job, the job directories that left no results.json or eval.json).

    With ``rescored``, a job's metrics are updated with those of its
    ``checkpoints/eval.json`` (written by eval/evaluate.py), where there is one.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepError(f"sweep={sweep_dir}: not a directory")
    jobs = job_dirs(sweep_dir)
    records = {job: job_record(job) for job in jobs}
    finished = [job for job in jobs if records[job] is not None]
    if not finished:
        raise SweepError(f"sweep={sweep_dir}: no job directory holds a results.json or eval.json "
                         "(is it a multirun directory of src/train.py or eval/evaluate.py?)")
    rows = []
    for job in finished:
        try:
            record = json.loads(records[job].read_text())
        except json.JSONDecodeError as err:
            raise SweepError(f"{records[job]}: not valid JSON ({err.msg})") from None
        rescore = rescore_record(job)
        if rescored and rescore is not None:
            record["metrics"] = {**record["metrics"], **json.loads(rescore.read_text())["metrics"]}
        rows.append({**pd.json_normalize(record).iloc[0].to_dict(), "job_dir": str(job)})
    return pd.DataFrame(rows), [job for job in jobs if job not in finished]


def parse_only(only) -> list[tuple[str, object]]:
    """``only`` entries "key=value" (a flattened record column and a YAML value: ``data.prompt_dropout=0.5``) as pairs."""
    pairs = []
    for entry in only or ():
        key, sep, value = str(entry).partition("=")
        if not sep or not key:
            raise SweepError(f"only: {entry!r} is not key=value (a results.json key such as data.prompt_dropout=0.5)")
        pairs.append((key, yaml.safe_load(value)))
    return pairs


def row_matches(row: dict, only: list[tuple[str, object]]) -> bool:
    """Whether a flattened record has every (key, value) of ``only`` (null matches a missing or null value)."""
    def equal(found, wanted) -> bool:
        if wanted is None:
            return found is None or (isinstance(found, float) and math.isnan(found))
        return found == wanted
    return all(equal(row.get(key), value) for key, value in only)


def rows_where(frame: pd.DataFrame, only) -> pd.DataFrame:
    """The jobs whose records match every ``only`` entry (all jobs when none is given)."""
    pairs = parse_only(only)
    missing = [key for key, _ in pairs if key not in frame]
    if missing:
        raise SweepError(f"only: no job records {', '.join(missing)}")
    kept = frame[[row_matches(row, pairs) for row in frame.to_dict("records")]] if pairs else frame
    if kept.empty:
        raise SweepError(f"only: no job matches {', '.join(map(str, only))}")
    return kept.reset_index(drop=True)


def job_dirs(sweep_dir: Path) -> list[Path]:
    """A multirun directory's job folders (those with Hydra's ``.hydra``) in launch order; or, in a folder that
    archive_sweep wrote (a committed experiment, its multirun gone), the finished jobs' records under ``jobs/``."""
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    if not jobs and (sweep_dir / "jobs").is_dir():
        jobs = [p for p in (sweep_dir / "jobs").iterdir() if p.is_dir()]
    return sorted(jobs, key=job_number)


def job_record(job: Path) -> Path | None:
    """The job's results.json (src/train.py) or eval.json (eval/evaluate.py); None for a job that left neither."""
    return next((job / name for name in RECORD_FILES if (job / name).is_file()), None)


def rescore_record(job: Path) -> Path | None:
    """The job's eval/evaluate.py re-scoring: ``checkpoints/eval.json``, or in an archive ``checkpoints_eval.json``."""
    return next((p for p in (job / "checkpoints" / "eval.json", job / "checkpoints_eval.json") if p.is_file()), None)


def load_sweeps(sweep_dirs: list[Path], rescored: bool = False) -> tuple[pd.DataFrame, dict[Path, list[Path]]]:
    """The finished jobs of several multirun directories, in the order given, and each directory's unfinished jobs."""
    frames, unfinished = [], {}
    for folder in map(Path, sweep_dirs):
        frame, unfinished[folder] = load_sweep(folder, rescored)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True), unfinished


def job_number(job: Path) -> tuple[int, str]:
    """Hydra's job number, the prefix of a multirun job directory ("10_block=zero" after "9_..."), for launch order."""
    prefix = job.name.split("_", 1)[0]
    return (int(prefix) if prefix.isdigit() else -1, job.name)


def method_columns(frame: pd.DataFrame) -> list[str]:
    """The method keys whose values differ across the sweep (``block`` if none does), less those the keys before them
    determine (``block_std`` in a sweep of blocks, where each block has one std)."""
    chosen: list[str] = []
    for key in METHOD_KEYS:
        if key not in frame or frame[key].astype(str).nunique() < 2:
            continue
        if chosen and frame[key].astype(str).groupby([frame[c].astype(str) for c in chosen]).nunique().max() < 2:
            continue
        chosen.append(key)
    return chosen or ["block"]


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


def _summary_methods(summary: pd.DataFrame) -> list[str]:
    """The method columns of a ``summarize`` result (the rest are statistics)."""
    return [c for c in summary.columns if ":" not in c and c not in ("seeds", "eval_images")]


def display_table(summary: pd.DataFrame, metrics=METRICS) -> pd.DataFrame:
    """'mean ± std' strings under readable labels; counts as integers."""
    methods = _summary_methods(summary)
    table = readable_methods(summary, methods)
    for column, label in metrics:
        if f"{column}:mean" not in summary:
            continue
        mean, std = summary[f"{column}:mean"], summary[f"{column}:std"]
        if column.endswith("trainable_params"):
            table[label] = mean.map(lambda v: f"{v / 1e6:.3f} M")
        else:
            table[label] = [_mean_std(m, s, lo, hi) for m, s, lo, hi in zip(mean, std, summary[f"{column}:low"], summary[f"{column}:high"])]
    table["seeds"] = summary["seeds"]
    table["images / setting"] = summary["eval_images"]
    return table


def _mean_std(mean: float, std: float, low: float, high: float) -> str:
    """"mean ± std [low, high]" (the interval of the mean); the mean alone for one seed."""
    if np.isnan(mean):
        return ""  # the jobs of this method have no such metric (e.g. the fill50k oracle scores on other data)
    return f"{mean:.3f}" if np.isnan(std) else f"{mean:.3f} ± {std:.3f} [{low:.3f}, {high:.3f}]"


def differences(frame: pd.DataFrame, level: float = 0.95, comparisons: str = "reference", correction: str = "none",
                metrics=METRICS) -> pd.DataFrame:
    """Per pair of methods and metric: the difference of the means (later method minus earlier, in launch order), its
    interval (paired by seed where the seeds match), the effect this design detects with 80% power, and the verdict.

    ``comparisons``: "reference" compares every method with the sweep's first, "all_pairs" every pair. ``correction``:
    "bonferroni" widens every interval to level 1 - (1 - level) / (number of comparisons), so that the chance of any
    false call stays at 1 - level; "none" leaves them at ``level``.
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
                         "verdict": d.verdict, "seeds_to_decide": d.seeds_to_decide})
    return pd.DataFrame(rows)


def display_differences(table: pd.DataFrame) -> pd.DataFrame:
    """The differences as text: the interval, the pairing, and for an inconclusive one the seeds that would decide it."""
    def decide(row) -> str:
        if row["verdict"] != "inconclusive":
            return ""
        return f"{int(row['seeds_to_decide'])}" if not pd.isna(row["seeds_to_decide"]) else "> 1000 or no effect"

    return pd.DataFrame({
        "method": table["method"], "vs": table["vs"], "metric": table["metric"],
        "difference [interval]": [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in zip(table["difference"], table["low"], table["high"])],
        "level": table["level"], "seeds": [f"{n} {'paired' if p else 'unpaired'}" for n, p in zip(table["seeds"], table["paired"])],
        "detectable (80% power)": table["detectable_80pct_power"].map(lambda v: f"{v:.3f}"),
        "verdict": table["verdict"], "seeds that would decide": table.apply(decide, axis=1),
    })


def write_tables(sweep_dir: Path, out_dir: Path | None = None, rescored: bool = False, level: float = 0.95,
                 comparisons: str = "reference", correction: str = "none", curve_steps=(),
                 extra_sweeps=(), average_eval_seeds: bool = False, only=()) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Write table.md, table.csv (numbers), table.tex, the differences (differences.md/.csv/.tex) and the plots;
    returns the displayed table and the paths. ``curve_steps``: fidelity-curve steps whose values join the metrics.
    ``extra_sweeps``: more multirun directories (an arm launched later) whose jobs join the sweep's, after them.
    ``average_eval_seeds``: see average_evaluation_seeds. ``only``: "key=value" entries, the jobs kept (rows_where)."""
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
    compared = differences(frame, level, comparisons, correction, metrics)
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


def archive_sweep(sweep_dir: Path, out_dir: Path, only=()) -> list[Path]:
    """Copy what the tables were made from next to them: the sweep's multirun.yaml and each finished job's record
    (``jobs/<job>/results.json`` or ``eval.json``, with its ``checkpoints/eval.json`` where re-scored), of the jobs that
    match ``only`` (rows_where). Small files only: no checkpoints, images or logs. A sweep given as an archive folder
    is archived again from its ``jobs/``."""
    sweep_dir, out_dir, pairs = Path(sweep_dir), Path(out_dir), parse_only(only)
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    if (sweep_dir / "multirun.yaml").is_file():
        copied.append(out_dir / "multirun.yaml")
        copied[-1].write_text((sweep_dir / "multirun.yaml").read_text())
    for job in job_dirs(sweep_dir):
        record = job_record(job)
        if record is None or not row_matches(pd.json_normalize(json.loads(record.read_text())).iloc[0].to_dict(), pairs):
            continue
        for source, name in ((record, record.name), (rescore_record(job), "checkpoints_eval.json")):
            if source is not None:
                target = out_dir / "jobs" / job.name / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(source.read_text())
                copied.append(target)
    return copied


def unfinished_note(sweep_dir: Path, unfinished: list[Path]) -> str:
    """The jobs missing from the table: those that failed (with their error, failures.py) and those that never finished."""
    if not unfinished:
        return ""
    failed = failed_jobs(sweep_dir)
    lines = [f"- {job.name}: failed ({failed[job.name]})" if job.name in failed else f"- {job.name}: left no results.json or eval.json"
             for job in unfinished]
    return f"\n\n{len(unfinished)} job(s) of the sweep {Path(sweep_dir).name} are not in the table:\n\n" + "\n".join(lines) + "\n"


def log_to_wandb(paths: dict[str, Path], sweep_dir: Path, project: str = "controlnet-lab") -> None:
    """The tables (numbers typed) and plots as a W&B run of job type "tables", in the sweep's group (WANDB_MODE; offline
    when unset)."""
    run = wandb.init(project=project, group=sweep_group(sweep_dir), job_type="tables", name="tables", dir=str(sweep_dir), mode=wandb_mode())
    run.log({**{name: wandb.Table(dataframe=frame) for name, frame in typed_tables(paths).items()},
             **{name: wandb.Image(str(path)) for name, path in paths.items() if path.suffix == ".png"}})
    run.finish()


def paper_note(summary: pd.DataFrame) -> str:
    """The paper's own numbers for the blocks in this table, labelled as such (empty if it has none)."""
    if "block" not in summary or not set(summary["block"]) & set(PAPER):
        return ""
    rows = [{"block": block, **PAPER[block]} for block in summary["block"] if block in PAPER]
    return ("\n**Paper's numbers (SD 1.5, ADE20K segmentation, Tables 2-3; not comparable in scale with ours):**\n\n"
            + pd.DataFrame(rows).to_markdown(index=False) + "\n")


def curve_metrics(frame: pd.DataFrame) -> np.ndarray:
    """The fidelity metrics the jobs' curves follow (one per condition type: edge_f1, seg_miou)."""
    return frame["metrics.curve_metric"].dropna().unique()


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


def method_labels(frame: pd.DataFrame, methods: list[str]) -> list[str]:
    """Each row's method, "size=1000" or "block=zero, block_std=standard"."""
    readable = readable_methods(frame, methods)
    return [", ".join(f"{m.split('.')[-1]}={v}" for m, v in zip(methods, values)) for values in readable.itertuples(index=False)]


def readable_methods(frame: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """The method columns as the config wrote them: a column with a null in it (``data.size: null``) holds 1000 as
    1000.0 and null as NaN in pandas; written 1000 and null. Other columns as they are."""
    readable = frame[methods].copy()
    for column in methods:
        if frame[column].isna().any():
            readable[column] = frame[column].map(config_value)
    return readable


def config_value(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "null"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def plot_mask_iou(summary: pd.DataFrame, path: Path, level: float = 0.95) -> Path:
    """Grouped bars: mask IoU per prompt setting evaluated, for each method, error bars the interval of the mean over
    seeds; the legend below the axes, where it hides no bar."""
    methods = _summary_methods(summary)
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
