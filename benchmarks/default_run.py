"""Wall time, peak memory and scores of the default run (`make train`), cold (empty cache) and warm (cached base).

    python benchmarks/default_run.py                # cold then warm, caches in a fresh temp folder
    python benchmarks/default_run.py --warm-only    # reuse the project's .cache

Each run is a child process (src/train.py through Hydra); its peak RSS and scores
come from the run's results.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(cache_dir: Path, log_dir: Path, overrides: list[str]) -> dict:
    started = time.time()
    command = [sys.executable, str(ROOT / "src" / "train.py"), f"paths.cache_dir={cache_dir}", f"paths.log_dir={log_dir}", *overrides]
    subprocess.run(command, cwd=ROOT, check=True)
    wall = time.time() - started
    run_dir = max((log_dir / "train" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    results = json.loads((run_dir / "results.json").read_text())
    return {"wall_s": wall, "peak_rss_mb": results["peak_rss_mb"], "results": results, "run_dir": str(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm-only", action="store_true")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to src/train.py")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = ROOT / ".cache" if args.warm_only else Path(tmp) / "cache"
        logs = ROOT / "outputs" / "benchmark"
        if not args.warm_only:
            rows.append(("cold (generate data, pretrain base, train, evaluate)", run_once(cache, logs, args.overrides)))
        rows.append(("warm (cached data and base)", run_once(cache, logs, args.overrides)))
    print("\n| run | wall time | peak RSS | mask IoU: base / +ControlNet / random | color acc.: base / +ControlNet |")
    print("|---|---|---|---|---|")
    for name, row in rows:
        m = row["results"]["metrics"]
        print(
            f"| {name} | {row['wall_s'] / 60:.1f} min | {row['peak_rss_mb'] / 1024:.2f} GB | "
            f"{m['base_mask_iou']:.3f} / {m['mask_iou']:.3f} / {m['random_placement_mask_iou']:.3f} | "
            f"{m['base_color_accuracy']:.3f} / {m['color_accuracy']:.3f} |"
        )
    print(f"\n(eval images: {m['eval_images']}; runs under {logs})")
    print_evaluation_cost(rows[-1][1]["results"])


def print_evaluation_cost(results: dict) -> None:
    """How long evaluation took, against the run's wall time, and images/s for each metric."""
    m, wall = results["metrics"], results["wall_time_s"]
    final_eval = wall["total"] - wall["until_trained"]
    curve = m.get("curve_seconds", 0.0)
    print(f"\nfinal evaluation {final_eval:.0f} s + fidelity curve during training {curve:.0f} s = "
          f"{100 * (final_eval + curve) / wall['total']:.1f}% of the run's {wall['total']:.0f} s")
    generated = m["eval_images"] * 5  # base alone + four prompt settings
    counts = {"generation": generated, "oracle": generated, "fidelity": generated - m["eval_images"]}
    print("| part | seconds | images | images/s |\n|---|---|---|---|")
    for part, seconds in m["seconds"].items():
        images = counts.get(part, m["eval_images"] * (2 if part.startswith("fid") else 1))  # FID reads generated + reference
        print(f"| {part} | {seconds:.2f} | {images} | {images / max(seconds, 1e-9):.0f} |")


if __name__ == "__main__":
    main()
