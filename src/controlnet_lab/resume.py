"""Resuming a run in its own directory: which checkpoint, the base it needs, its CSV log and its W&B run.

``ckpt_path=last`` (or ``latest``) resumes ``checkpoints/last.ckpt`` of the run directory
(``paths.run_dir=<dir>``, or a sweep job's directory), and starts afresh when there is none
yet (a requeued job that never reached its first checkpoint); a last.ckpt that cannot be read
is passed over for the newest readable step checkpoint, with a warning. An explicit path
resumes that file. Checkpoints are read with ``torch.load(weights_only=True)``: nothing is
unpickled.
"""
from __future__ import annotations

import csv
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

LAST = ("last", "latest")
WANDB_ID_FILE = "wandb_run_id"
log = logging.getLogger(__name__)


@dataclass
class Resume:
    """The checkpoint a run resumes from: its step, the fingerprint of the base it was trained on, and the newer
    checkpoints passed over because they could not be read (each with why)."""

    path: Path
    global_step: int
    base_fingerprint: str | None
    passed_over: list[str] = field(default_factory=list)


def resume_checkpoint(ckpt_path: str | None, output_dir: Path) -> Resume | None:
    """The checkpoint this run resumes from, or None for a fresh run (which must not write over another run's).

    ``last``: the readable one of the highest step among ``checkpoints/interrupted.ckpt`` (written on SIGTERM),
    ``checkpoints/last.ckpt`` and ``checkpoints/step-<n>.ckpt`` (``step=<n>.ckpt`` as earlier runs named them): one
    that cannot be read (a write cut short) is passed over with a warning. A SLURM job requeued by Lightning (which
    saved ``hpc_ckpt_<n>.ckpt`` in the run directory on the requeue signal) resumes from its newest such checkpoint,
    as Lightning itself would."""
    if not ckpt_path:
        requeued = sorted(output_dir.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]), reverse=True)
        if requeued:
            return newest_readable(requeued)
        if any((output_dir / "checkpoints").glob("*.ckpt")):
            raise FileExistsError(f"{output_dir} holds another run's checkpoints: resume it with ckpt_path=last, or leave "
                                  "paths.run_dir unset for a new run directory")
        return None
    if str(ckpt_path) in LAST:
        folder = output_dir / "checkpoints"
        steps = sorted([*folder.glob("step-*.ckpt"), *folder.glob("step=*.ckpt")], key=lambda p: int(p.stem[5:]), reverse=True)
        return newest_readable([p for p in (folder / "interrupted.ckpt", folder / "last.ckpt") if p.is_file()] + steps)
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint there (give a .ckpt file, or ckpt_path=last with "
                                "paths.run_dir=<the run's directory>)")
    return read_checkpoint(path)


def read_checkpoint(path: Path) -> Resume:
    """The checkpoint's step and base; nothing is unpickled, and a file cut short fails here (its zip directory is read)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    hparams = checkpoint.get("hyper_parameters", {})
    return Resume(path, checkpoint["global_step"], hparams.get("base_fingerprint"))


def newest_readable(candidates: list[Path]) -> Resume | None:
    """Of the ``candidates`` that can be read, the one of the highest step (the first of them on a tie); each one
    passed over as unreadable is logged with why."""
    readable, passed_over = [], []
    for path in candidates:
        try:
            readable.append(read_checkpoint(path))
        except (RuntimeError, EOFError, OSError, KeyError, pickle.UnpicklingError) as err:
            passed_over.append(f"{path}: {type(err).__name__}: {str(err).splitlines()[0]}")
    if not readable:
        if passed_over:
            raise RuntimeError("no readable checkpoint to resume from:\n" + "\n".join(passed_over))
        return None
    found = max(readable, key=lambda r: r.global_step)  # max keeps the first of equals
    for reason in passed_over:
        log.warning(f"passing over an unreadable checkpoint, {reason}; resuming from {found.path} (step {found.global_step})")
    found.passed_over = passed_over
    return found


def csv_rows_before(output_dir: Path, step: int) -> tuple[str | None, list[dict]]:
    """(version, rows) of the run's newest CSV log that were logged before ``step``, the checkpoint's global step: the
    log the resumed run continues (rows logged after the checkpoint are logged again by the resumed run)."""
    versions = sorted((output_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not versions:
        return None, []
    with versions[-1].open(newline="") as log:
        rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(log)]
    return versions[-1].parent.name, [row for row in rows if int(row["step"]) < step]


def continue_csv_log(logger, rows: list[dict]) -> None:
    """Put the earlier rows back into a CSVLogger of the same version (its writer starts the file anew)."""
    for row in rows:
        logger.experiment.log_metrics({k: float(v) for k, v in row.items() if k != "step"}, step=int(row["step"]))


def wandb_run_id(output_dir: Path) -> str | None:
    path = output_dir / WANDB_ID_FILE
    return path.read_text().strip() if path.is_file() else None


def remember_wandb_run_id(output_dir: Path, run_id: str) -> None:
    (output_dir / WANDB_ID_FILE).write_text(run_id)
