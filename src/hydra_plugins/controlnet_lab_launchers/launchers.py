"""hydra-submitit-launcher's launchers, with a requeued job that resumes (in the hydra_plugins namespace, where Hydra finds launchers).

Before a job's time limit (or on preemption) submitit sends its signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says
otherwise), calls the launcher's ``checkpoint`` and requeues what it returns. The plugin's ``checkpoint`` requeues the
job with its original overrides, so a requeued training would start afresh (and be refused, its directory holding
checkpoints). These requeue it with ``ckpt_path=last``: it continues in its own job directory from its newest
checkpoint, which ``run_state.PreemptionCheckpoint`` writes before handing the signal to submitit.
"""
from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher


def resuming(sweep_overrides: list[str]) -> list[str]:
    """The job's overrides with ``ckpt_path=last`` in place of any ``ckpt_path`` it had."""
    return [o for o in sweep_overrides if not o.lstrip("+~").startswith("ckpt_path=")] + ["ckpt_path=last"]


class ResumingSlurmLauncher(SlurmLauncher):
    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        return super().checkpoint(resuming(sweep_overrides), *args, **kwargs)


class ResumingLocalLauncher(LocalLauncher):
    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        return super().checkpoint(resuming(sweep_overrides), *args, **kwargs)
