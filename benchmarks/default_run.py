"""Wall time, peak memory and scores of the default run (`make train`), cold (empty cache) and warm (cached data and base).

    python benchmarks/default_run.py                # cold then warm, caches in a fresh temp folder
    python benchmarks/default_run.py --warm-only    # reuse the project's .cache
    python benchmarks/default_run.py --cold-only --out experiments/embedded_default/shipped_base   # one cold run
    python benchmarks/default_run.py --warm-only --out experiments/performance/default_compile --after model.compile=true
                                                    # a before/after pair: what an option buys the default run

Each run is a child process (src/train.py through Hydra); its peak RSS and scores come
from the run's results.json. Writes ``default_run.json`` (every run, the commit, the
machine, and the CPU time other programs took meanwhile), the warm run's own
``results.json``, its fidelity curve with the 10-90% rise marked (``fidelity_curve.png``)
and its evaluation grid (``eval_samples.png``) into ``--out``.

``--after OVERRIDE ...`` adds two warm runs with those overrides added, in the same
benchmark run: ``after`` and ``after_repeat``. Every run starts from an empty Inductor
cache (torch.compile's compiled kernels) except ``after_repeat``, which reuses
``after``'s: for ``model.compile=true`` the pair is a first compiled run and a later one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from controlnet_lab.tables.plots import plot_curves
from controlnet_lab.provenance import OtherLoad, commit, machine

ROOT = Path(__file__).resolve().parents[1]
AFTER_RUNS = ("after", "after_repeat")  # --after: the first run from an empty Inductor cache, the second from its cache
SUMMARY_KEYS = ("mask_iou", "color_accuracy", "base_mask_iou", "base_color_accuracy", "random_placement_mask_iou", "edge_f1",
                "fid_domain", "prompt_settings", "rise", "sudden_convergence_step", "curve_images", "curve_seconds", "eval_images", "seconds",
                "block_init_std")


def run_once(cache_dir: Path, log_dir: Path, overrides: list[str], inductor_cache: Path) -> dict:
    started = time.time()
    command = [sys.executable, str(ROOT / "src" / "train.py"), f"paths.cache_dir={cache_dir}", f"paths.log_dir={log_dir}", *overrides]
    with OtherLoad() as load:
        subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)})
    wall = time.time() - started
    run_dir = max(log_dir.glob("*/runs/*"), key=lambda p: p.stat().st_mtime)  # <task_name>/runs/<time>: the run just ended
    results = json.loads((run_dir / "results.json").read_text())
    return {"wall_s": round(wall, 1), "peak_rss_mb": results["peak_rss_mb"], "other_load": load.result, "results": results, "run_dir": str(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm-only", action="store_true")
    parser.add_argument("--cold-only", action="store_true", help="only the cold run (empty cache: data made, shipped base copied)")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "embedded_default")
    parser.add_argument("--cache", type=Path, help="an empty folder for the cold run's cache, kept afterwards (default: a temporary one)")
    parser.add_argument("--logs", type=Path, default=ROOT / "outputs" / "benchmark", help="the runs' log folder (paths.log_dir)")
    parser.add_argument("--after", nargs="+", default=[], metavar="OVERRIDE",
                        help="overrides added for two more warm runs (after, after_repeat): a before/after pair in one run")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to src/train.py")
    args = parser.parse_args()
    if args.cold_only and (args.warm_only or args.after):
        parser.error("--cold-only runs no warm run: it goes with neither --warm-only nor --after")
    runs = {}
    provenance = {**commit(), "machine": machine(), "overrides": args.overrides, "after": args.after}
    with tempfile.TemporaryDirectory() as tmp:
        cache = ROOT / ".cache" if args.warm_only else args.cache or Path(tmp) / "cache"
        if not args.warm_only and cache.exists() and any(cache.iterdir()):
            raise SystemExit(f"--cache {cache} is not empty: a cold run needs an empty cache")
        logs, inductor = args.logs, Path(tmp) / "inductor"
        if not args.warm_only:
            runs["cold"] = run_once(cache, logs, args.overrides, inductor / "cold")
        if not args.cold_only:
            runs["warm"] = run_once(cache, logs, args.overrides, inductor / "warm")
        if args.after:
            for name in AFTER_RUNS:
                runs[name] = run_once(cache, logs, [*args.overrides, *args.after], inductor / "after")
    gains = {name: speedups(runs["warm"], runs[name]) for name in AFTER_RUNS if name in runs}
    report(runs, gains)
    write_record(runs, gains, provenance, args.out)


def report(runs: dict, gains: dict) -> None:
    print("\n| run | wall time | peak RSS | other programs' CPU | mask IoU: base / +ControlNet / random | color acc.: base / +ControlNet |")
    print("|---|---|---|---|---|---|")
    for name, row in runs.items():
        m = row["results"]["metrics"]
        print(
            f"| {name} | {row['wall_s'] / 60:.1f} min | {row['peak_rss_mb'] / 1024:.2f} GB | {100 * row['other_load']['other_cpu_fraction_of_all_cores']:.1f}% | "
            f"{m['base_mask_iou']:.3f} / {m['mask_iou']:.3f} / {m['random_placement_mask_iou']:.3f} | "
            f"{m['base_color_accuracy']:.3f} / {m['color_accuracy']:.3f} |"
        )
    for name, gain in gains.items():
        print(f"{name} against warm: {gain['wall']:.3f}x as fast (whole run), {gain['until_trained']:.3f}x until trained")
    print_evaluation_cost(shown_run(runs)["results"])


def shown_run(runs: dict) -> dict:
    """The run whose results.json, curve and grid are kept: the warm one, or the cold one where it ran alone."""
    return runs.get("warm") or runs["cold"]


def speedups(before: dict, after: dict) -> dict:
    """How many times as fast ``after`` ran: the whole process, and its run from start to the end of training."""
    return {"wall": round(before["wall_s"] / after["wall_s"], 3),
            "until_trained": round(before["results"]["wall_time_s"]["until_trained"] / after["results"]["wall_time_s"]["until_trained"], 3)}


def write_record(runs: dict, gains: dict, provenance: dict, out: Path) -> None:
    """default_run.json (every run, with provenance), the warm (or only) run's results.json, curve plot and evaluation grid."""
    out.mkdir(parents=True, exist_ok=True)
    record = {**provenance, "runs": {name: {
        "wall_s": row["wall_s"], "peak_rss_mb": row["peak_rss_mb"], "other_load": row["other_load"],
        "wall_time_s": row["results"]["wall_time_s"], "split": row["results"]["split"], "global_step": row["results"]["global_step"],
        "base": row["results"].get("base"),
        "metrics": {k: row["results"]["metrics"][k] for k in SUMMARY_KEYS if k in row["results"]["metrics"]},
        "curve": row["results"]["metrics"].get("curve"),
    } for name, row in runs.items()}}
    if gains:
        record["speedup_over_warm"] = gains
    (out / "default_run.json").write_text(json.dumps(record, indent=2))
    shown = shown_run(runs)
    plot_curves(pd.DataFrame([pd.json_normalize(shown["results"]).iloc[0]]), out / "fidelity_curve.png")
    for name in ("results.json", "eval_samples.png"):
        shutil.copyfile(Path(shown["run_dir"]) / name, out / name)
    print(f"\nwrote {out / 'default_run.json'}, results.json, fidelity_curve.png, eval_samples.png")


def print_evaluation_cost(results: dict) -> None:
    """How long evaluation took, against the run's wall time, and images/s for each metric."""
    m, wall = results["metrics"], results["wall_time_s"]
    final_eval = wall["total"] - wall["until_trained"]
    curve = m.get("curve_seconds", 0.0)
    print(f"\nfinal evaluation {final_eval:.0f} s + fidelity curve during training {curve:.0f} s = "
          f"{100 * (final_eval + curve) / wall['total']:.1f}% of the run's {wall['total']:.0f} s")
    settings = len(m["prompt_settings"])
    generated = m["eval_images"] * (settings + 1)  # base alone + each prompt setting
    counts = {"generation": generated, "oracle": generated, "fidelity": generated - m["eval_images"]}
    print("| part | seconds | images | images/s |\n|---|---|---|---|")
    for part, seconds in m["seconds"].items():
        images = counts.get(part, m["eval_images"] * (2 if part.startswith("fid") else 1))  # FID reads generated + reference
        print(f"| {part} | {seconds:.2f} | {images} | {images / max(seconds, 1e-9):.0f} |")


if __name__ == "__main__":
    main()
