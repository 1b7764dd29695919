"""A trained run's own W&B run, taken up again after training: eval/evaluate.py adds its re-scoring to the run's summary
and src/export.py logs the export as a W&B ``model`` artifact (its model card as the description). The mode is W&B's
own WANDB_MODE (offline when unset, as in training); an offline run's artifacts are uploaded by ``wandb sync``."""
from __future__ import annotations

from pathlib import Path

import wandb
from omegaconf import OmegaConf

from controlnet_lab.resume import WANDB_ID_FILE
from controlnet_lab.tracking import wandb_mode

DEFAULT_PROJECT = "controlnet-lab"


def run_project(run_dir: Path) -> str:
    """The W&B project the run logged to (its config's ``logger.wandb.project``)."""
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        return DEFAULT_PROJECT
    return OmegaConf.select(OmegaConf.load(config), "logger.wandb.project", default=DEFAULT_PROJECT) or DEFAULT_PROJECT


def run_id(run_dir: Path) -> str | None:
    """The run's W&B id: the one training remembered (resume.py), else that of its newest ``wandb/*run-<id>`` folder."""
    remembered = run_dir / WANDB_ID_FILE
    if remembered.is_file():
        return remembered.read_text().strip()
    runs = sorted((run_dir / "wandb").glob("*run-*"))
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


def resumed_run(run_dir: Path, job_type: str, project: str | None = None):
    """The run's W&B run resumed by its id, or None when the run logged to no W&B run."""
    found = run_id(run_dir)
    if found is None:
        return None
    return wandb.init(project=project or run_project(run_dir), id=found, resume="allow", dir=str(run_dir), mode=wandb_mode(),
                      job_type=job_type)


def log_export(out: Path, info: dict, run_dir: Path) -> str:
    """Log the export folder ``out`` as a ``model`` artifact ``controlnet-<run id>`` (aliases latest and
    ``step-<global step>``) to the training run's W&B run, or to a new run of job type export in ``run_dir`` when the
    run had none; returns the artifact's name."""
    run = resumed_run(run_dir, "export") or wandb.init(project=run_project(run_dir), dir=str(run_dir), mode=wandb_mode(), job_type="export")
    card = out / "README.md"
    artifact = wandb.Artifact(f"controlnet-{run.id}", type="model", description=card.read_text() if card.is_file() else None,
                              metadata=info)
    artifact.add_dir(str(out))
    run.log_artifact(artifact, aliases=["latest", f"step-{info['global_step']}"])
    run.finish()
    return artifact.name
