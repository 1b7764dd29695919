"""Training speed of the harness against diffusers' own ControlNet script, on the same work, side by side.

The script is ``../shared/anchors/diffusers_train_controlnet.py`` (diffusers' examples/controlnet/train_controlnet.py,
unmodified), run from a temporary copy as a researcher would run it (Accelerate, CPU, one process); it needs
``pip install -e '.[bench]'``. Both train:

- the same locked base, built once and saved with ``save_pretrained`` (untrained weights: speed does not depend on them):
  ``--base tiny_sd``, the ``model=tiny_sd`` architecture (conf/model/tiny_sd.yaml) at ``--resolution``, or ``--base sd15``,
  Stable Diffusion 1.5's (sd15_shaped.py), which the harness reads as ``model=sd15`` reads the real one;
- the same ControlNet from the same start: copied from that UNet (hint encoder ``model.controlnet.hint_channels``), saved,
  and given to the script as ``--controlnet_model_name_or_path`` and to the harness as
  ``model.controlnet.pretrained_model_name_or_path``;
- the same data: ``--samples`` synthetic fill50k samples written as the imagefolder the script reads (``metadata.jsonl``
  with ``file_name``, ``conditioning_image_file_name``, ``text``), read by the harness as ``data=folder``;
- the same objective and settings: batch, learning rate (constant), AdamW, gradient clipping at 1, 50% empty prompts,
  epsilon MSE without noise offset, the machine's default torch threads, ``--workers`` data loading processes, no
  validation during training, and the same ``--precision`` on the same ``--device``: float32, or bf16 mixed precision
  as the script does it (``--mixed_precision=bf16``: the locked parts in bfloat16, the ControlNet float32 under
  autocast), which the harness does with ``trainer.precision=bf16-mixed``.

Measured by the method of rounds.py: ``--rounds`` rounds (7 make a result), each running every setup once in an order
rotated round by round; every ratio taken within a round, reported as the median with a bootstrap 95% interval, beside
each round's raw figures. In a round each setup runs twice, from the command line as a user runs it:

- ``--steps`` steps (1,500): its **steady-state** training samples/s over the last ``--window`` steps (1,000, which span
  the harness's logging every 10 steps and both sides' checkpoints every 500), from the wall time of each step's log
  (the script's TensorBoard ``loss`` events; the harness's Lightning ``ThroughputMonitor``, ``window_size=--window + 1``
  points, whose ``train/device/samples_per_sec`` is the same quotient), and its **end-to-end** wall time;
- ``--short-steps`` steps (150): its end-to-end wall time.

End to end is the process's whole life: start-up, the harness's one-time encoding of the locked parts, compilation,
the steps, the final save and the harness's evaluation (8 images). The ratios are the harness's speed over the script's
(above 1: the harness is faster). ``fixed_s``: the long run's wall time minus its steps at the measured rate. Setups:
the harness **as configured by default** (``model.base.cache_encodings=true``: VAE latents and text embeddings
computed once; no other override than what makes the work the same), the same with ``model.compile=true``
(``--compile``, opt-in: the training step's UNet and ControlNet call compiled; every compiled run shares one Inductor
cache, new in the temporary folder, so the warm-up run compiles from nothing, and its wall time against the eager
warm-up's, in ``warmup_wall_s``, is the cold compilation), the harness with caching off (every target through the VAE
and every prompt through the text encoder at every step, as the script does), and the script. Peak RSS is each
process's own (``wait4``); on a GPU, peak GPU memory is the most ``nvidia-smi`` reported in use on the device while the
process ran (sampled every 0.2 s), less what was in use before it started. That the two take the same step is
one_step_equivalence.py's check (same loss and gradients on the same batch and draws), not this file's.

    python benchmarks/vs_diffusers.py [--steps 1500 --window 1000 --short-steps 150 --rounds 7 --batch 32 --resolution 32 --samples 2000]
    python benchmarks/vs_diffusers.py --base sd15 --resolution 512 --device cuda --precision bf16 --workers 4 \
        --batch 8 --samples 256 --steps 80 --window 60 --short-steps 0 --rounds 1 --no-warmup --no-compile \
        --out experiments/performance/gpu/vs_diffusers.json

Writes ``--out`` (experiments/performance/vs_diffusers.json) with the settings, the commit, the machine and the CPU
time other programs took meanwhile.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from diffusers import ControlNetModel
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from controlnet_lab.bases import build_tiny_sd
from controlnet_lab.data.fill50k import read_index
from controlnet_lab.data.synthetic import SyntheticFill50kSpec, write_fill50k
from controlnet_lab.provenance import OtherLoad, commit, machine
from rounds import MIN_ROUNDS, method, run_rounds, within_round_ratio
from sd15_shaped import HINT_CHANNELS as SD15_HINT_CHANNELS, sd15_pipeline

ROOT = Path(__file__).resolve().parents[1]
# diffusers' script sits outside the repository, beside the checkout (../shared/anchors); another copy: the variable.
ANCHOR = Path(os.environ.get("CONTROLNET_LAB_DIFFUSERS_SCRIPT", ROOT.parent / "shared" / "anchors" / "diffusers_train_controlnet.py"))
SETUPS = ("harness", "harness_compiled", "harness_no_cache", "diffusers_script")
SCRIPT = "diffusers_script"


def require_anchor(parser: argparse.ArgumentParser, anchor: Path) -> None:
    """Stop before any work when diffusers' script is not where --anchor says."""
    if not anchor.is_file():
        parser.error(f"--anchor {anchor}: no such file; give diffusers' examples/controlnet/train_controlnet.py "
                     "(or set CONTROLNET_LAB_DIFFUSERS_SCRIPT)")


def write_imagefolder(fill50k: Path, folder: Path) -> Path:
    """The fill50k samples as the imagefolder diffusers' script reads: images/, conditions/, metadata.jsonl."""
    (folder / "images").mkdir(parents=True)
    (folder / "conditions").mkdir()
    with (folder / "metadata.jsonl").open("w") as metadata:
        for i, record in enumerate(read_index(fill50k)):
            shutil.copyfile(record.target, folder / "images" / f"{i}.png")
            shutil.copyfile(record.source, folder / "conditions" / f"{i}.png")
            metadata.write(json.dumps({"file_name": f"images/{i}.png", "conditioning_image_file_name": f"conditions/{i}.png",
                                       "text": record.prompt}) + "\n")
    return folder


def same_data(tmp: Path, anchor: Path, samples: int, resolution: int) -> Path:
    """The script's copy and the data both sides train on, in ``tmp``: ``samples`` synthetic fill50k samples and the same
    as the script's imagefolder (``tmp/folder``). Returns the fill50k folder."""
    shutil.copyfile(anchor, tmp / "train_controlnet.py")
    spec = SyntheticFill50kSpec(count=samples, resolution=resolution, palette=("red", "green", "blue", "yellow", "cyan", "magenta", "white", "black"),
                                radius_range=(0.15, 0.35), outline_thickness=1, seed=0)
    fill50k = write_fill50k(spec, tmp / "fill50k")
    write_imagefolder(fill50k, tmp / "folder")
    return fill50k


def build_models(tmp: Path, resolution: int, prompts: list[str], base_name: str = "tiny_sd") -> tuple[Path, Path, list[int]]:
    """The locked base and the ControlNet both start from, saved with save_pretrained."""
    torch.manual_seed(0)
    if base_name == "sd15":
        base, hint_channels = sd15_pipeline(resolution, prompts), list(SD15_HINT_CHANNELS)
    else:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=["model=tiny_sd", f"data.resolution={resolution}"])
        base = build_tiny_sd(OmegaConf.to_container(cfg.model.base, resolve=True), resolution, prompts)
        hint_channels = list(cfg.model.controlnet.hint_channels)
    base.save_pretrained(tmp / "base")
    ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=tuple(hint_channels)).save_pretrained(tmp / "controlnet_init")
    return tmp / "base", tmp / "controlnet_init", hint_channels


def command(setup: str, steps: int, args, tmp: Path, run: Path) -> list[str]:
    if setup == "diffusers_script":
        return [sys.executable, str(tmp / "train_controlnet.py"), f"--pretrained_model_name_or_path={tmp / 'base'}",
                f"--controlnet_model_name_or_path={tmp / 'controlnet_init'}", f"--train_data_dir={tmp / 'folder'}",
                f"--output_dir={run}", f"--resolution={args.resolution}", f"--train_batch_size={args.batch}",
                f"--learning_rate={args.lr}", f"--max_train_steps={steps}", "--lr_scheduler=constant", "--lr_warmup_steps=0",
                "--proportion_empty_prompts=0.5", f"--mixed_precision={'bf16' if args.precision == 'bf16' else 'no'}",
                "--report_to=tensorboard", "--seed=0", f"--dataloader_num_workers={args.workers}", "--image_column=image",
                "--conditioning_image_column=conditioning_image", "--caption_column=text", f"--cache_dir={tmp / 'hf_cache'}"]
    trainer = ["trainer=gpu"] if args.device == "cuda" else []
    precision = "bf16-mixed" if args.precision == "bf16" else "32-true"
    return [sys.executable, str(ROOT / "src" / "train.py"), f"model={args.base}", f"model.base.pretrained_model_name_or_path={tmp / 'base'}",
            f"model.controlnet.pretrained_model_name_or_path={tmp / 'controlnet_init'}", "data=folder", f"data.root={tmp / 'folder'}",
            f"data.resolution={args.resolution}", f"data.batch_size={args.batch}", "data.val_size=16", "data.validation_size=8", "data.prompt_dropout=0.5",
            f"data.cache_dir={tmp / 'hf_cache'}", f"data.num_workers={args.workers}", f"paths.cache_dir={run / 'cache'}", f"paths.run_dir={run}",
            f"model.controlnet.lr={args.lr}", "lr_scheduler.name=constant", *trainer, "trainer.gradient_clip_val=1.0", f"trainer.precision={precision}",
            "model.base.noise_offset=0", f"model.base.cache_encodings={setup != 'harness_no_cache'}", f"model.compile={setup == 'harness_compiled'}",
            f"trainer.max_steps={steps}",
            "trainer.limit_val_batches=0", "~callbacks.fidelity_curve", "eval.fid_domain.enabled=false",
            f"callbacks.throughput.window_size={args.window + 1}",  # window_size points span window steps
            "eval.num_images=8", "logger=csv", "extras.print_config=false", "seed=0"]


class GpuMemoryPeak:
    """Context manager: ``.mb`` is the most GPU memory in use (``nvidia-smi``, MiB) while it was open, less what was in use
    when it opened. One process runs on the device at a time here, so that is the process's own, CUDA context included."""

    def __enter__(self) -> "GpuMemoryPeak":
        self.baseline = self.peak = self.used()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def used() -> float:
        query = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"],
                               capture_output=True, text=True, check=True)
        return float(query.stdout.strip())

    def poll(self) -> None:
        while not self.done.wait(0.2):
            self.peak = max(self.peak, self.used())

    def __exit__(self, *_) -> None:
        self.done.set()
        self.thread.join()
        self.mb = self.peak - self.baseline


def timed(argv: list[str], log: Path, device: str, inductor_cache: Path) -> tuple[float, float, float | None]:
    """Wall seconds, the process's own peak RSS (MiB) and on a GPU its peak GPU memory (MiB) of one run, which must succeed
    (compiled runs share the Inductor cache ``inductor_cache``)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)}
    started = time.perf_counter()
    with log.open("w") as out, (GpuMemoryPeak() if device == "cuda" else contextlib.nullcontext()) as gpu:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv[1]} failed; see {log}:\n{log.read_text()[-3000:]}")
    return wall, usage.ru_maxrss / 1024, gpu.mb if gpu else None


def logged_rate(setup: str, run: Path, window: int, batch: int) -> float | None:
    """Samples/s over the last ``window`` steps (None for a run shorter than that): from the script's TensorBoard
    events (each step's loss and its wall time), or the harness's CSV log (its ThroughputMonitor's last value)."""
    if setup == SCRIPT:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for events in sorted({p.parent for p in (run / "logs").rglob("events.out.tfevents.*")}):
            accumulator = EventAccumulator(str(events))
            accumulator.Reload()
            if "loss" in accumulator.Tags()["scalars"]:
                steps = accumulator.Scalars("loss")
                return window * batch / (steps[-1].wall_time - steps[-1 - window].wall_time) if len(steps) > window else None
        raise RuntimeError(f"no loss in the TensorBoard events under {run / 'logs'}")
    with (run / "csv" / "version_0" / "metrics.csv").open() as log:
        rates = [float(row["train/device/samples_per_sec"]) for row in csv.DictReader(log) if row.get("train/device/samples_per_sec")]
    return rates[-1] if rates else None


def run_setup(setup: str, steps: int, args, tmp: Path, name: str) -> dict:
    """One run of ``setup`` from the command line: its wall time, peak memory and (for a run longer than the window)
    steady-state samples/s."""
    run = tmp / "runs" / name
    run.parent.mkdir(exist_ok=True)
    log = (args.logs or tmp / "runs") / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    wall, rss, gpu_mb = timed(command(setup, steps, args, tmp, run), log, args.device, tmp / "inductor")
    rate = logged_rate(setup, run, args.window, args.batch) if steps > args.window else None
    if steps > args.window and rate is None:
        raise RuntimeError(f"{name}: no samples/s logged over the last {args.window} of {steps} steps; see {log}")
    shutil.rmtree(run)  # its checkpoints: a 1,500-step run's are most of the temporary folder
    return {"wall_s": round(wall, 2), "samples_per_s": rate and round(rate, 2), "peak_rss_mb": round(rss, 1), "peak_gpu_mb": gpu_mb}


def measure_round(setup: str, i: int, args, tmp: Path, started: float) -> dict:
    """One round's figures of ``setup``: its long run (steady state, end to end) and its short run (end to end)."""
    long = run_setup(setup, args.steps, args, tmp, f"{i}-{setup}-{args.steps}")
    figures = {"samples_per_s": long["samples_per_s"], f"wall_{args.steps}_s": long["wall_s"],
               "fixed_s": round(long["wall_s"] - args.steps * args.batch / long["samples_per_s"], 1),
               "peak_rss_mb": long["peak_rss_mb"], "peak_gpu_mb": long["peak_gpu_mb"]}
    if args.short_steps:
        figures[f"wall_{args.short_steps}_s"] = run_setup(setup, args.short_steps, args, tmp, f"{i}-{setup}-{args.short_steps}")["wall_s"]
    print(f"{time.perf_counter() - started:.0f} s: round {i} {setup:<17} {figures['samples_per_s']:7.1f} samples/s, "
          + ", ".join(f"{k} {v}" for k, v in figures.items() if k.startswith("wall_")), flush=True)
    return figures


def ratios(rounds: list[dict], setup: str, args) -> dict:
    """``setup``'s speed over the script's, within each round: steady state and end to end at each length."""
    lengths = [args.steps, *([args.short_steps] if args.short_steps else [])]
    return {"steady_state": within_round_ratio(rounds, setup, SCRIPT, "samples_per_s"),
            **{f"end_to_end_{n}": within_round_ratio(rounds, SCRIPT, setup, f"wall_{n}_s") for n in sorted(lengths)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="of the long run: steady state and end to end")
    parser.add_argument("--window", type=int, default=1000, help="the last steps of the long run samples/s is measured over")
    parser.add_argument("--short-steps", type=int, default=150, help="of the short run, end to end only (0: none)")
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--base", choices=["tiny_sd", "sd15"], default="tiny_sd", help="the locked base's architecture (untrained)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32", help="float32, or bf16 mixed precision")
    parser.add_argument("--workers", type=int, default=0, help="data loading processes of each (0: in the training process)")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="a 1-step run of each first, untimed, so the first timed runs find the datasets caches built")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also the harness with model.compile=true (cold compilation: warmup_wall_s; from the warm cache: fixed_s)")
    parser.add_argument("--anchor", type=Path, default=ANCHOR, help="diffusers' train_controlnet.py")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "performance" / "vs_diffusers.json")
    parser.add_argument("--logs", type=Path, help="keep each run's output here (default: in the temporary folder, deleted at the end)")
    args = parser.parse_args()
    require_anchor(parser, args.anchor)
    if args.steps <= args.window:
        raise SystemExit(f"--steps {args.steps} must exceed --window {args.window}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder, OtherLoad() as load:
        tmp = Path(folder)
        fill50k = same_data(tmp, args.anchor, args.samples, args.resolution)
        print(f"{time.perf_counter() - started:.0f} s: {args.samples} samples written", flush=True)
        _, _, hint_channels = build_models(tmp, args.resolution, [r.prompt for r in read_index(fill50k)], args.base)
        print(f"{time.perf_counter() - started:.0f} s: base and ControlNet start saved", flush=True)
        setups = [s for s in SETUPS if args.compile or s != "harness_compiled"]
        warmups = {setup: run_setup(setup, 1, args, tmp, f"warmup-{setup}")["wall_s"]
                   for setup in setups if args.warmup and setup != "harness_no_cache"}
        rounds = run_rounds(setups, args.rounds, lambda setup, i: measure_round(setup, i, args, tmp, started))
    by_setup = {setup: ratios(rounds, setup, args) for setup in setups if setup != SCRIPT}
    default = by_setup["harness"]
    report = {
        "what": "the harness's training speed over diffusers' train_controlnet.py's on the same base, ControlNet start, data and settings: "
                "steady-state samples/s (last --window steps) and end-to-end wall time, each ratio the median of within-round ratios "
                "with its bootstrap 95% interval; peak memory beside",
        "ratio": default["steady_state"]["median"],
        "ratio_ci95": default["steady_state"]["ci95"],
        "end_to_end_ratio": {name.removeprefix("end_to_end_"): r["median"] for name, r in default.items() if name.startswith("end_to_end_")},
        "ratios": by_setup,
        "method": method(args.rounds),
        "peak_rss_mb": {setup: max(r[setup]["peak_rss_mb"] for r in rounds) for setup in setups},
        "peak_gpu_mb": {setup: max(r[setup]["peak_gpu_mb"] for r in rounds) for setup in setups} if args.device == "cuda" else None,
        "warmup_wall_s": warmups,
        "settings": {"resolution": args.resolution, "batch": args.batch, "steps": args.steps, "window": args.window, "short_steps": args.short_steps,
                     "samples": args.samples, "lr": args.lr, "lr_scheduler": "constant", "device": args.device,
                     "precision": "bf16 mixed (locked parts bfloat16, ControlNet float32)" if args.precision == "bf16" else "float32",
                     "workers": args.workers, "warmup": args.warmup, "hint_channels": hint_channels, "torch_threads": torch.get_num_threads(),
                     "base": {"tiny_sd": "model=tiny_sd architecture, untrained", "sd15": "SD 1.5 architecture (sd15_shaped.py), untrained"}[args.base],
                     "anchor": "diffusers examples/controlnet/train_controlnet.py at 58eb52c0803ea9af3abec60841c2a093bdf1f951 (../shared/anchors)"},
        "rounds": rounds,
        **commit(), "machine": machine(), "other_load": load.result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("ratio", "ratio_ci95", "end_to_end_ratio", "peak_rss_mb", "peak_gpu_mb")}, indent=2))


if __name__ == "__main__":
    main()
