"""Where the default run's time goes: a py-spy sampling profile of one cold `make train`, split by phase.

    pip install -e '.[bench]'                     # py-spy
    python benchmarks/default_profile.py          # the default, caches in a fresh temp folder
    python benchmarks/default_profile.py experiment=smoke --out /tmp/profile.json

py-spy samples the training process's Python stack ``--rate`` times a second without
changing its code. Each sample is given to the first phase whose marker frame it holds
(``PHASES``: the fidelity curve's measurement inside the training loop is its own phase,
not ControlNet training), and each phase lists the leaf functions that took most of it.
Writes ``--out`` with the phases' seconds and shares, the run's wall time and scores, the
commit, the machine and the CPU time other programs took meanwhile.
"""
from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from controlnet_lab.provenance import OtherLoad, commit, machine

ROOT = Path(__file__).resolve().parents[1]
# (phase, a substring of one frame of the stack), first match wins.
PHASES = (
    ("fidelity curve", "_measure (controlnet_lab/callbacks.py"),
    ("other callbacks", "controlnet_lab/callbacks.py"),
    ("other callbacks", "controlnet_lab/run_state.py"),
    ("base pretraining", "build_once (controlnet_lab/bases/pretraining.py"),
    ("data generation", "write_fill50k"),
    ("held-out split", "controlnet_lab/data/held_out.py"),
    ("domain FID network", "controlnet_lab/metrics/domain_features.py"),
    ("final evaluation", "controlnet_lab/evaluation/"),
    ("ControlNet training", "lightning/pytorch/loops/"),
    ("imports", "<module>"),
)
SCORES = ("mask_iou", "color_accuracy", "edge_f1", "base_mask_iou", "base_color_accuracy", "curve_seconds")


def phase_of(stack: str) -> str:
    return next((phase for phase, marker in PHASES if marker in stack), "other")


def split_by_phase(raw: Path, rate: int, top: int = 6) -> list[dict]:
    """py-spy's raw output (one ``frame;frame;... count`` line per distinct stack) as seconds per phase, largest first."""
    counts: collections.Counter = collections.Counter()
    leaves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        phase = phase_of(stack)
        counts[phase] += int(count)
        leaves[phase][stack.split(";")[-1].split(" (")[0]] += int(count)
    total = sum(counts.values())
    return [{"phase": phase, "seconds": round(count / rate, 1), "share": round(count / total, 4),
             "top_functions": {name: round(n / rate, 1) for name, n in leaves[phase].most_common(top)}}
            for phase, count in counts.most_common()]


def py_spy() -> str | None:
    """py-spy on the PATH or beside this Python (a virtual environment's bin/)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.is_file() else None)


def profile(overrides: list[str], rate: int, tmp: Path) -> dict:
    spy = py_spy()
    if spy is None:
        raise SystemExit("py-spy is missing: pip install -e '.[bench]'")
    raw = tmp / "profile.txt"
    train = [sys.executable, str(ROOT / "src" / "train.py"), f"paths.cache_dir={tmp / 'cache'}", f"paths.log_dir={tmp / 'outputs'}",
             "logger=csv", *overrides]
    started = time.time()
    with OtherLoad() as load:  # the run is this process's own child (py-spy attaches to it), so its CPU time is not "other"
        run = subprocess.Popen(train, cwd=ROOT)
        spy_process = subprocess.Popen([spy, "record", "--rate", str(rate), "--format", "raw", "--output", str(raw), "--pid", str(run.pid)])
        if run.wait() != 0:
            raise SystemExit(f"the profiled run failed (exit status {run.returncode})")
        spy_process.wait()
    wall = time.time() - started
    (results_file,) = (tmp / "outputs").rglob("results.json")
    results = json.loads(results_file.read_text())
    return {"wall_s": round(wall, 1), "other_load": load.result, "run_wall_time_s": results["wall_time_s"],
            "scores": {k: results["metrics"][k] for k in SCORES if k in results["metrics"]},
            "phases": split_by_phase(raw, rate)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=20, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "performance" / "default_profile.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to src/train.py")
    args = parser.parse_args()
    record = {**commit(), "machine": machine(), "overrides": args.overrides, "rate_hz": args.rate}
    with tempfile.TemporaryDirectory() as tmp:
        record.update(profile(args.overrides, args.rate, Path(tmp)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"\n{record['wall_s']:.0f} s in all (py-spy at {args.rate:g} Hz)\n| phase | seconds | share |\n|---|---|---|")
    for row in record["phases"]:
        print(f"| {row['phase']} | {row['seconds']:.0f} | {100 * row['share']:.1f}% |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
