"""Reading a sweep: its jobs in launch order, each job's record (results.json or eval.json, or a re-scored
checkpoints/eval.json, all read by run_record.read_record) flattened into one row, the methods (the values that vary
among ``METHOD_KEYS``), the jobs kept by ``only`` and their labels, the fidelity-curve points joined as metrics, and
copying a sweep's records into the repository."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from controlnet_lab.failures import failed_jobs
from controlnet_lab.metrics.convergence import curve_convergence
from controlnet_lab.run_record import RECORD_FILES, read_record

METHOD_KEYS = ("block", "block_std", "data.size", "data.prompt_dropout", "data.condition", "composition", "sampling.guidance_scale",
               "sampling.resolution_weighting", "sampling.conditioning_scale")
CURVE_QUANTITIES = (("mask_iou", "mask IoU"), ("edge_f1", "edge F1"), ("seg_miou", "seg mIoU"), ("color_accuracy", "color acc."))


class SweepError(ValueError):
    pass


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
            record = read_record(records[job])
        except json.JSONDecodeError as err:
            raise SweepError(f"{records[job]}: not valid JSON ({err.msg})") from None
        rescore = rescore_record(job)
        if rescored and rescore is not None:
            record["metrics"] = {**record["metrics"], **read_record(rescore)["metrics"]}
        if record.get("metrics", {}).get("curve"):  # the stored curve judged by today's rule (metrics/convergence.py)
            record["metrics"].update(curve_convergence(record["metrics"]["curve"], record["metrics"]["curve_metric"]))
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
        if record is None or not row_matches(pd.json_normalize(read_record(record)).iloc[0].to_dict(), pairs):
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
