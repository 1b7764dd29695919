"""Two-process DDP on this CPU (gloo) against one process, on the smoke config lengthened to ``--steps`` steps.

Both run src/train.py as a user would (``trainer=cpu`` vs ``trainer=ddp trainer.accelerator=cpu
trainer.devices=2``), with the same per-process batch (``data.batch_size``), so DDP trains on
twice as many samples per step. Training samples/s is Lightning's ThroughputMonitor over the
last ``--window`` batches (``train/device/samples_per_sec`` for one process, ``train/samples_per_sec``
summed over the DDP processes), read from each run's CSV log. The runs alternate (one, DDP,
one, DDP, ...) for ``--rounds`` rounds; the base is pretrained once, before the first timed run.

    python benchmarks/ddp_cpu.py [--steps 240 --window 100 --rounds 2]

Writes ``--out`` (experiments/performance/ddp_cpu.json) with the commit, the machine and the
CPU time other programs took meanwhile.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from controlnet_lab.provenance import OtherLoad, commit, machine

ROOT = Path(__file__).resolve().parents[1]
SETUPS = {
    "one_process": ["trainer=cpu"],
    "ddp_2_processes": ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"],
}


def train(setup: str, overrides: list[str], tmp: Path) -> Path:
    """One training run through src/train.py; its run directory."""
    logs = tmp / "outputs" / setup
    command = [sys.executable, str(ROOT / "src" / "train.py"), *SETUPS[setup], *overrides,
               f"paths.log_dir={logs}", f"paths.cache_dir={tmp / 'cache'}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{setup} failed:\n{done.stderr[-3000:]}")
    return max((logs / "smoke" / "runs").iterdir())


def run(setup: str, overrides: list[str], tmp: Path) -> dict:
    """One training run; its samples/s, global step and scores."""
    run_dir = train(setup, overrides, tmp)
    with (run_dir / "csv" / "version_0" / "metrics.csv").open() as log:
        rows = list(csv.DictReader(log))
    key = "train/samples_per_sec" if setup.startswith("ddp") else "train/device/samples_per_sec"
    rates = [float(row[key]) for row in rows if row.get(key)]
    record = json.loads((run_dir / "results.json").read_text())
    return {"samples_per_s": rates[-1], "global_step": record["global_step"],
            "edge_f1": record["metrics"]["edge_f1"], "mask_iou": record["metrics"]["mask_iou"],
            "until_trained_s": record["wall_time_s"]["until_trained"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "performance" / "ddp_cpu.json")
    args = parser.parse_args()
    overrides = ["experiment=smoke", "logger=csv", "extras.print_config=false", "eval.fid_domain.enabled=false",
                 "~callbacks.fidelity_curve", f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
                 f"callbacks.throughput.window_size={args.window}", f"trainer.log_every_n_steps={args.window}"]
    with tempfile.TemporaryDirectory() as folder, OtherLoad() as load:
        tmp = Path(folder)
        train("one_process", [*overrides, "trainer.max_steps=1"], tmp)  # pretrains and caches the base, untimed
        rounds = [{setup: run(setup, overrides, tmp) for setup in SETUPS} for _ in range(args.rounds)]
    summary = {setup: statistics.median(r[setup]["samples_per_s"] for r in rounds) for setup in SETUPS}
    report = {
        "what": "training samples/s, Lightning ThroughputMonitor over the last window of batches; smoke config (16 px, "
                "batch 8 per process), DDP on CPU with gloo",
        "settings": {"steps": args.steps, "window_batches": args.window, "rounds": args.rounds, "overrides": overrides,
                     "setups": SETUPS, "batch_per_process": 8},
        "median_samples_per_s": summary,
        "ratio_ddp_to_one_process": round(summary["ddp_2_processes"] / summary["one_process"], 3),
        "rounds": rounds,
        **commit(), "machine": machine(), "other_load": load.result,
        "other_load_note": "other_cpu_s includes DDP's second process: Lightning starts it and this script never waits for it, "
                           "so its CPU time is not counted as this benchmark's own",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("median_samples_per_s", "ratio_ddp_to_one_process")}, indent=2))


if __name__ == "__main__":
    main()
