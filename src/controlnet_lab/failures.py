"""Sweeps that lose no job: a failed job leaves ``failed.json`` in its directory, the others run on.

Hydra's launchers run every job of a sweep and report a failure only once all have run
(the basic launcher; submitit's jobs are separate processes anyway); the sweep then exits
non-zero. ``FailedJobs`` (a Hydra callback, conf/hydra/default.yaml) logs, after each failed
job, which jobs of the sweep have failed so far and why, and eval/tables.py lists them under
the table.
"""
from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode

FAILED_FILE = "failed.json"
log = logging.getLogger(__name__)


def record_failure(output_dir: Path, error: BaseException, overrides: list[str]) -> None:
    """``failed.json``: the error and where it came from, beside what the job wrote before it failed."""
    record = {"status": "failed", "error": f"{type(error).__name__}: {error}", "overrides": overrides,
              "traceback": "".join(traceback.format_exception(error))}
    (output_dir / FAILED_FILE).write_text(json.dumps(record, indent=2))


def failed_jobs(sweep_dir: Path) -> dict[str, str]:
    """{job directory name: error} of the sweep's jobs that recorded a failure."""
    return {path.parent.name: json.loads(path.read_text())["error"] for path in sorted(Path(sweep_dir).glob(f"*/{FAILED_FILE}"))}


class FailedJobs(Callback):
    def on_job_end(self, config, job_return: JobReturn, **kwargs) -> None:
        hydra_cfg = HydraConfig.get()
        if job_return.status != JobStatus.FAILED or hydra_cfg.mode != RunMode.MULTIRUN:
            return
        failed = failed_jobs(Path(hydra_cfg.sweep.dir))
        log.error(f"{len(failed)} job(s) of this sweep failed so far; the others run on, and the sweep exits non-zero:\n"
                  + "\n".join(f"  {job}: {error}" for job, error in failed.items()))
