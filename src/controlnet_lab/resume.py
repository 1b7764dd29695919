"""Resuming a run in its own directory: which checkpoint, the base it needs, its CSV log and its W&B run.

``ckpt_path=last`` (or ``latest``) resumes ``checkpoints/last.ckpt`` of the run directory
(``paths.run_dir=<dir>``, or a sweep job's directory), and starts afresh when there is none
yet (a requeued job that never reached its first checkpoint). An explicit path resumes that
file. Checkpoints are read with ``torch.load(weights_only=True)``: nothing is unpickled.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

LAST = ("last", "latest")
WANDB_ID_FILE = "wandb_run_id"


def resume_checkpoint(ckpt_path: str | None, output_dir: Path) -> Path | None:
    """The checkpoint this run resumes from, or None for a fresh run (which must not write over another run's).
    A SLURM job requeued by Lightning (which saved ``hpc_ckpt_<n>.ckpt`` in the run directory on the requeue signal)
    resumes from its newest such checkpoint, as Lightning itself would."""
    if not ckpt_path:
        requeued = sorted(output_dir.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        if requeued:
            return requeued[-1]
        if any((output_dir / "checkpoints").glob("*.ckpt")):
            raise FileExistsError(f"{output_dir} holds another run's checkpoints: resume it with ckpt_path=last, or leave "
                                  "paths.run_dir unset for a new run directory")
        return None
    if str(ckpt_path) in LAST:
        last = output_dir / "checkpoints" / "last.ckpt"
        return last if last.is_file() else None
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint there (give a .ckpt file, or ckpt_path=last with "
                                "paths.run_dir=<the run's directory>)")
    return path


def checkpoint_summary(path: Path) -> dict:
    """The global step and the locked base a checkpoint was trained on."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters", {})
    return {"global_step": checkpoint["global_step"], "base_path": hparams.get("base_path"),
            "base_fingerprint": hparams.get("base_fingerprint")}


def check_same_base(path: Path, recorded: str | None, base_path: Path, fingerprint: str) -> None:
    """A checkpoint trained on another locked base than the one this run loads is refused, naming both."""
    if recorded and recorded != fingerprint:
        raise ValueError(f"{path} was trained on a locked base with fingerprint {recorded}, but the base at {base_path} "
                         f"has fingerprint {fingerprint}: the base folder changed since; restore it or retrain")


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
