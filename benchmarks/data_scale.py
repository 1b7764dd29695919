"""Memory, start-up and disk against the dataset's size: do they grow with the number of images?

A generated image folder in diffusers' layout, 256 px files (stored conditions, a distinct caption per image), of N =
1,000 / 4,000 / 16,000 images (``--sizes``), trained by ``src/train.py`` with ``model=tiny_sd`` (a saved random base of
tiny_sd's architecture: what is measured does not depend on its weights, and pretraining it at 256 px would take
hours) at ``data.resolution=--resolution`` (256 by default) for 1 step at batch 1, twice per N, in the same cache:

- **first start**: the first pass over the images (content keys, sizes, a decode check; manifest.py), the VAE
  encoding of every image and the text encoding of every caption (locked_encodings.py), written to disk;
- **second start**: the same run again: the manifest instead of the images, the stored encodings instead of the VAE.

For each N: the set-up time (``wall_time_s.data_setup`` + ``wall_time_s.locked_encodings`` of the run's
results.json), the run's peak RSS, the cache's size on disk. Then a least-squares line of each against N, a plot,
and a projection (arithmetic from the per-sample sizes, stated as such) for SD 1.5 at 512 px and SDXL at 1,024 px
with 50,000 and 3,000,000 images. Separately, the first pass in one process and in ``--num-proc`` processes
(alternating, ``--rounds`` times), its speed-up: over the 4,000-image folder's 8,000 files (1-2 KB each: the pass's
fixed costs weigh most) and over ``--photos`` photo-like 512 px PNG files (about 0.5 MB each, as real images); the
projection's first-pass hours use the photo-like rate.

    python benchmarks/data_scale.py [--sizes 1000 4000 16000]

Writes experiments/performance/data_scale/data_scale.json and data_scale.png, with the commit, the machine and the
CPU time other programs took meanwhile. Run it with nothing else running.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from omegaconf import OmegaConf

from controlnet_lab.bases import build_tiny_sd
from controlnet_lab.data.manifest import Manifest
from controlnet_lab.provenance import OtherLoad, commit, machine

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 256  # of the image files
PHOTO_RESOLUTION = 512  # of the photo-like files the first pass's speed-up is also measured on
WORDS = [["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black", "orange", "purple", "pink", "brown", "gray",
          "olive", "navy", "teal", "maroon", "lime", "gold", "silver", "coral", "beige", "ivory", "khaki", "lavender", "plum"],
         ["square", "circle", "ring", "cross", "bar", "dot", "star", "arc", "frame", "band", "blob", "wedge", "grid", "stripe",
          "spot", "patch", "line", "loop", "knot", "wave", "zigzag", "spiral", "arrow", "heart", "moon", "leaf"],
         ["left", "right", "top", "bottom", "center", "corner", "edge", "middle", "far", "near", "high", "low", "inside",
          "outside", "above", "below", "beside", "across", "around", "behind", "ahead", "aside", "along", "apart", "away", "back"]]
# Per sample, in the dtype the bases compute in on a GPU (bf16): the VAE posterior (mean and log-variance of 4 latent
# channels at 1/8 of the resolution) and the text encoder's hidden states per distinct caption (77 tokens).
PROJECTED_BASES = {
    "sd15_512px": {"latent_values": 2 * 4 * 64 * 64, "text_values": 77 * 768, "bytes_per_value": 2},
    "sdxl_1024px": {"latent_values": 2 * 4 * 128 * 128, "text_values": 77 * 2048 + 1280, "bytes_per_value": 2},
}


def caption(index: int) -> str:
    size = len(WORDS[0])
    return f"{WORDS[0][index % size]} {WORDS[1][index // size % size]} {WORDS[2][index // size // size % size]}"


def write_images(root: Path, count: int) -> None:
    """``count`` target / condition pairs at 256 px and metadata.jsonl lines with distinct captions."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "conditions").mkdir()
    lines = []
    for i in range(count):
        image = np.full((RESOLUTION, RESOLUTION, 3), rng.integers(0, 256, 3), np.uint8)
        centre, radius = rng.integers(64, 192, 2), int(rng.integers(20, 60))
        cv2.circle(image, (int(centre[0]), int(centre[1])), radius, [int(c) for c in rng.integers(0, 256, 3)], -1)
        condition = np.zeros_like(image)
        cv2.circle(condition, (int(centre[0]), int(centre[1])), radius, (255, 255, 255), 2)
        cv2.imwrite(str(root / "images" / f"{i}.png"), image)
        cv2.imwrite(str(root / "conditions" / f"{i}.png"), condition)
        lines.append(json.dumps({"file_name": f"images/{i}.png", "conditioning_image_file_name": f"conditions/{i}.png",
                                 "text": caption(i)}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def linked_folder(source: Path, root: Path, count: int) -> Path:
    """The first ``count`` rows of ``source`` as a folder of its own (hard links: no copies)."""
    (root / "images").mkdir(parents=True)
    (root / "conditions").mkdir()
    for i in range(count):
        for sub in ("images", "conditions"):
            os.link(source / sub / f"{i}.png", root / sub / f"{i}.png")
    lines = (source / "metadata.jsonl").read_text().splitlines()[:count]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def saved_base(folder: Path, count: int, resolution: int) -> Path:
    settings = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "tiny_sd.yaml").base, resolve=True)
    build_tiny_sd(settings, resolution, [caption(i) for i in range(count)] + [""]).save_pretrained(folder)
    return folder


def train(data_root: Path, base: Path, cache: Path, out: Path, encode_batch: int, resolution: int) -> dict:
    command = [sys.executable, str(ROOT / "src" / "train.py"), "model=tiny_sd", f"model.base.pretrained_model_name_or_path={base}",
               f"model.base.encode_batch_size={encode_batch}", "data=folder", f"data.root={data_root}",
               f"data.resolution={resolution}", "data.val_size=4", "data.validation_size=2", "data.batch_size=1", "trainer.max_steps=1",
               # what is measured is the set-up: the rest of the run as small as it gets (one step, one image sampled)
               "eval.num_images=1", "eval.batch_size=1", "eval.prompt_settings=[perfect]", "eval.fid_domain.enabled=false",
               "~callbacks.fidelity_curve", "~callbacks.initial_output_change", "model.sampling.num_inference_steps=1",
               "logger=csv", "extras.print_config=false",
               f"paths.cache_dir={cache}", f"paths.log_dir={out}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    record = json.loads(max(out.rglob("results.json"), key=lambda p: p.stat().st_mtime).read_text())
    wall = record["wall_time_s"]
    return {"setup_s": round(wall["data_setup"] + wall["locked_encodings"], 2), "data_setup_s": wall["data_setup"],
            "locked_encodings_s": wall["locked_encodings"], "total_s": wall["total"], "peak_rss_mb": record["peak_rss_mb"]}


def disk_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 2) if folder.exists() else 0.0


def write_photos(root: Path, count: int, resolution: int = PHOTO_RESOLUTION) -> Path:
    """``count`` photo-like PNG files (smooth color fields with fine grain, about 0.5 MB each, as a 512 px photo saved
    as PNG): the first pass over them costs what it costs on real images, where the 256 px flat circles above are 1-2 KB."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for i in range(count):
        coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.float32)
        field = cv2.resize(coarse, (resolution, resolution), interpolation=cv2.INTER_CUBIC)
        grain = rng.normal(0, 6, (resolution, resolution, 3))
        cv2.imwrite(str(root / f"{i}.png"), np.clip(field + grain, 0, 255).astype(np.uint8))
    return root


def first_pass_speedup(paths: list[str], num_proc: int, rounds: int) -> dict:
    """The first pass over ``paths`` from an empty manifest, one process against ``num_proc``, alternating."""
    seconds = {1: [], num_proc: []}
    for _ in range(rounds):
        for processes in (1, num_proc):
            started = time.perf_counter()
            Manifest(None, "benchmark", processes).facts(paths, lambda i: paths[i])
            seconds[processes].append(time.perf_counter() - started)
    one, many = statistics.median(seconds[1]), statistics.median(seconds[num_proc])
    return {"files": len(paths), "mean_file_kb": round(sum(os.path.getsize(p) for p in paths) / len(paths) / 1024, 1),
            "num_proc": num_proc, "rounds_s": {str(k): [round(s, 2) for s in v] for k, v in seconds.items()},
            "files_per_s": {"1": round(len(paths) / one, 1), str(num_proc): round(len(paths) / many, 1)},
            "speedup": round(one / many, 3)}


def fit(sizes: list[int], values: list[float]) -> dict:
    slope, intercept = np.polyfit(np.asarray(sizes, float), np.asarray(values, float), 1)
    return {"per_1000_images": round(float(slope) * 1000, 4), "at_0": round(float(intercept), 3)}


def projections(first_pass_files_per_s: float) -> dict:
    """Disk and first-pass hours for real bases and sizes: arithmetic from per-sample sizes, not a measurement."""
    result = {}
    for name, base in PROJECTED_BASES.items():
        per_sample = (base["latent_values"] + base["text_values"]) * base["bytes_per_value"]
        for count in (50_000, 3_000_000):
            result[f"{name}_{count}"] = {
                "cache_disk_gb": round(per_sample * count / 1e9, 1),
                "cache_ram": "memory-mapped: the rows a step reads, shared by the processes through the page cache (not loaded)",
                "first_pass_hours": round(2 * count / first_pass_files_per_s / 3600, 2),
            }
    return {"method": "arithmetic: (VAE posterior + text hidden states) per sample in bf16, each caption distinct; first pass: "
                      "2 files per sample (image and condition) at the rate measured here on 2 cores (real 512-1024 px files "
                      "are larger: more time per file)", "cases": result}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [row["images"] for row in rows]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for start, style in (("first_start", "o-"), ("second_start", "s--")):
        axes[0].plot(sizes, [row[start]["peak_rss_mb"] for row in rows], style, label=start.replace("_", " "))
        axes[1].plot(sizes, [row[start]["setup_s"] for row in rows], style, label=start.replace("_", " "))
    axes[2].plot(sizes, [row["cache_disk_mb"] for row in rows], "o-")
    for axis, title in zip(axes, ("peak RSS (MB)", "set-up: data + encodings (s)", "cache on disk (MB)")):
        axis.set_xlabel("images")
        axis.set_title(title)
        axis.set_xscale("log")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--encode-batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=RESOLUTION,
                        help="data.resolution the runs train at (the files are 256 px; lower: the VAE encodes fewer pixels)")
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--photos", type=int, default=2000, help="photo-like files the first pass's speed-up is also measured on")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "performance" / "data_scale")
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    with tempfile.TemporaryDirectory(prefix="data-scale-") as tmp, OtherLoad() as load:
        tmp = Path(tmp)
        started = time.perf_counter()
        write_images(tmp / "all", sizes[-1])
        print(f"generated {sizes[-1]} image pairs in {time.perf_counter() - started:.0f} s")
        base = saved_base(tmp / "base", sizes[-1], args.resolution)
        rows = []
        for count in sizes:
            folder = linked_folder(tmp / "all", tmp / f"n{count}", count)
            cache = tmp / f"cache{count}"
            row = {"images": count}
            for start in ("first_start", "second_start"):
                row[start] = train(folder, base, cache, tmp / f"out{count}", args.encode_batch, args.resolution)
                print(f"N={count:>6} {start}: {row[start]}")
            row["cache_disk_mb"] = disk_mb(cache / "encodings")
            row["manifest_disk_mb"] = disk_mb(cache / "manifests")
            rows.append(row)
            shutil.rmtree(cache)
        middle = tmp / f"n{next((count for count in sizes if count >= 4000), sizes[-1])}"
        speedup = first_pass_speedup(sorted(str(p) for sub in ("images", "conditions") for p in (middle / sub).glob("*.png")),
                                     args.num_proc, args.rounds)
        photos = write_photos(tmp / "photos", args.photos)
        photo_speedup = first_pass_speedup(sorted(str(p) for p in photos.glob("*.png")), args.num_proc, args.rounds)
        for name, measured in (("circle", speedup), ("photo-like", photo_speedup)):
            print(f"first pass over {measured['files']} {name} files: {measured['speedup']:.2f}x with {args.num_proc} processes")
    smallest, largest = rows[0], rows[-1]
    result = {
        **commit(), "machine": machine(), "other_load": load.result,
        "settings": {"file_resolution": RESOLUTION, "resolution": args.resolution,
                     "model": "tiny_sd architecture, saved random weights", "train_steps": 1,
                     "encode_batch_size": args.encode_batch, "sizes": sizes},
        "runs": rows,
        "peak_rss_growth_mb": round(largest["first_start"]["peak_rss_mb"] - smallest["first_start"]["peak_rss_mb"], 1),
        "second_start_peak_rss_growth_mb": round(largest["second_start"]["peak_rss_mb"] - smallest["second_start"]["peak_rss_mb"], 1),
        "second_start_setup_s": {str(row["images"]): row["second_start"]["setup_s"] for row in rows},
        "second_start_setup_ratio_largest_over_smallest": round(largest["second_start"]["setup_s"] / smallest["second_start"]["setup_s"], 3),
        "fits": {key: fit([r["images"] for r in rows], [value(r) for r in rows]) for key, value in {
            "first_start_peak_rss_mb": lambda r: r["first_start"]["peak_rss_mb"],
            "second_start_peak_rss_mb": lambda r: r["second_start"]["peak_rss_mb"],
            "first_start_setup_s": lambda r: r["first_start"]["setup_s"],
            "second_start_setup_s": lambda r: r["second_start"]["setup_s"],
            "cache_disk_mb": lambda r: r["cache_disk_mb"]}.items()},
        "first_pass": speedup,
        "first_pass_photos": {**photo_speedup, "resolution": PHOTO_RESOLUTION},
        "projection": projections(photo_speedup["files_per_s"][str(args.num_proc)]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_scale.json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out / "data_scale.png")
    print(json.dumps({k: result[k] for k in ("peak_rss_growth_mb", "second_start_setup_s", "first_pass", "first_pass_photos")}, indent=2))
    print(f"wrote {args.out / 'data_scale.json'}")


if __name__ == "__main__":
    main()
