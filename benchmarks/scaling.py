"""How the default ControlNet step's cost grows with the work: samples/s and peak memory at resolutions x batches.

The step is step_cost.py's ControlNet step on the embedded ``tiny`` pixel base (untrained weights), each
(resolution, batch) in its own process. From the fitted power laws (log-log least squares) a user can predict a
bigger run: seconds per step ~ pixels^a x batch^b.

    python benchmarks/scaling.py                                   # 32/64/128 px x batch 8/32/128, CPU
    python benchmarks/scaling.py --resolutions 32 64 --batches 8 32 --repeats 2

Writes ``scaling.json``, ``scaling.md`` (the table) and ``scaling.png`` (log-log plot) into ``--out``
(experiments/performance/), with the commit, the machine and the CPU time other programs took meanwhile.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from controlnet_lab.provenance import OtherLoad, commit, machine  # noqa: E402
from step_cost import run_child  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def power_law(points: list[dict], key: str) -> dict:
    """Least-squares exponents of ``key`` ~ c * pixels^a * batch^b over the measured points."""
    design = np.array([[1.0, np.log(p["resolution"] ** 2), np.log(p["batch"])] for p in points])
    (log_c, a, b), *_ = np.linalg.lstsq(design, np.log([p[key] for p in points]), rcond=None)
    return {"c": round(float(np.exp(log_c)), 6), "pixels_exponent": round(float(a), 3), "batch_exponent": round(float(b), 3)}


def table(points: list[dict]) -> str:
    rows = ["| resolution | batch | ms/step | samples/s | peak MiB |", "|---:|---:|---:|---:|---:|"]
    rows += [f"| {p['resolution']} | {p['batch']} | {p['ms_per_step']:.1f} | {p['samples_per_s']:.1f} | {p['peak_memory_mb']:.0f} |" for p in points]
    return "\n".join(rows) + "\n"


def plot(points: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for resolution in sorted({p["resolution"] for p in points}):
        line = [p for p in points if p["resolution"] == resolution]
        for axis, key in zip(axes, ("ms_per_step", "peak_memory_mb")):
            axis.loglog([p["batch"] for p in line], [p[key] for p in line], "o-", label=f"{resolution} px")
    for axis, label in zip(axes, ("ms per ControlNet step", "peak memory (MiB)")):
        axis.set_xlabel("batch")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "performance")
    args = parser.parse_args()
    points = []
    with OtherLoad() as load:
        for resolution in args.resolutions:
            for batch in args.batches:
                run = run_child("tiny", "controlnet", resolution=resolution, batch=batch, repeats=args.repeats, device=args.device)
                point = {"resolution": resolution, "batch": batch, "ms_per_step": run["ms_per_step"],
                         "samples_per_s": round(batch / run["ms_per_step"] * 1000, 2), "peak_memory_mb": run["peak_memory_mb"]}
                points.append(point)
                print(f"{resolution:4} px  batch {batch:4}  {point['ms_per_step']:9.1f} ms/step  {point['samples_per_s']:8.1f} samples/s  "
                      f"peak {point['peak_memory_mb']:8.1f} MiB", flush=True)
    report = {"what": "the default ControlNet step (tiny pixel base, untrained) at each resolution and batch, each in its own process",
              "memory": "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS above the RSS after imports",
              "points": points, "fit_ms_per_step": power_law(points, "ms_per_step"), "fit_peak_memory_mb": power_law(points, "peak_memory_mb"),
              "settings": {**vars(args), "out": str(args.out)}, **commit(), "machine": machine(), "other_load": load.result}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(report, indent=2))
    (args.out / "scaling.md").write_text(table(points))
    plot(points, args.out / "scaling.png")
    print(json.dumps({k: report[k] for k in ("fit_ms_per_step", "fit_peak_memory_mb")}, indent=2))


if __name__ == "__main__":
    main()
