"""What a result file must say (a benchmark's, a training job's): the commit, the machine, and what else used its CPU meanwhile.

``OtherLoad`` measures the CPU time the whole machine spent (``/proc/stat``) minus what
this process and its waited-for children spent (``getrusage``): the CPU other programs
took while the benchmark ran, as a fraction of all cores' time.
"""
from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout (src/controlnet_lab/provenance.py)


def commit() -> dict:
    """The checkout's commit and whether tracked files differ from it; both None where that is unknown (no git
    installed, or a copy outside a repository): a benchmark on a lent machine still writes its result."""
    def git(*args: str) -> str | None:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        head = git("rev-parse", "HEAD")
    except FileNotFoundError:  # no git executable
        head = None
    if head is None:
        return {"commit": None, "uncommitted_changes": None}
    return {"commit": head, "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine() -> dict:
    import diffusers  # imported here: the record readers (tables) import this module without torch
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(), "cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__}


def cpu_model() -> str | None:
    """The processor's model name (/proc/cpuinfo): timings compare only between machines that share it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def _busy_cpu_seconds() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


class OtherLoad:
    """Context manager: ``.result`` is the CPU other programs used while it was open (run children to their end inside it)."""

    def __enter__(self) -> "OtherLoad":
        self.started, self.busy, self.own = time.time(), _busy_cpu_seconds(), _own_cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.time() - self.started
        other = (_busy_cpu_seconds() - self.busy) - (_own_cpu_seconds() - self.own)
        self.result = {"other_cpu_s": round(max(other, 0.0), 1), "other_cpu_fraction_of_all_cores": round(max(other, 0.0) / (wall * os.cpu_count()), 4)}
