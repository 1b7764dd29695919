"""What each conditioning architecture costs to train and to sample, side by side (the blocks of experiment=ablation_architecture).

Each block (zero, gauss, single, t2i_adapter, controlnet_lora, controlnet_xs by default) is built as training builds
it: the experiment's config composed by Hydra with ``block=<name>`` and its ``module`` node instantiated, on a saved
base of the experiment's architecture (tiny_sd with two ResNet layers per UNet block; random weights: a step's cost
does not depend on them). One step is the module's own objective (``diffusion_loss`` with the training denoiser, on a
batch as the locked-encoding cache serves it: VAE posterior, text hidden states, condition), its backward pass and
the configured optimizer's step over the trainable parameters. Then the cost of sampling: one batch of the same
conditions generated through the block's diffusers pipeline (``StableDiffusionControlNetPipeline``, ``...AdapterPipeline``,
which computes the adapter's features once per image, ``...ControlNetXSPipeline``) at the experiment's sampling
settings (20 DDIM steps). Each block runs in its own child process (its peak memory is its own: the peak RSS of the
training steps above the RSS after the imports: the model, its optimizer state and a step's activations),
``--rounds`` times in alternation (zero, gauss, ..., zero, gauss, ...), so that drift of the machine falls on every
block alike; a block's time is the median over its rounds of each round's median.

    python benchmarks/architecture_cost.py [--blocks zero t2i_adapter] [--rounds 3] [--steps 20] [data.batch_size=8 ...]

Writes ``--out`` (experiments/ablation_architecture/cost.json) with each block's trainable parameters, ms per step,
seconds per generated batch, peak memory, their ratios to zero, the commit, the machine and the CPU time other
programs took meanwhile. Run it with nothing else running.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from step_cost import rss_mb  # this folder is on the path of a script run from it

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = ["zero", "gauss", "single", "t2i_adapter", "controlnet_lora", "controlnet_xs"]
PROMPTS = ["red circle with blue background", "green circle with yellow background"]


def composed(experiment: str, block: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={experiment}", f"block={block}", *overrides], return_hydra_config=True)


def save_base(experiment: str, overrides: list[str], folder: Path) -> None:
    """The experiment's base architecture with random weights, saved as the module loads a base."""
    from omegaconf import OmegaConf

    from controlnet_lab.bases.tiny_sd import build_tiny_sd

    cfg = composed(experiment, "zero", overrides)
    settings = OmegaConf.to_container(cfg.model.base, resolve=True)
    build_tiny_sd(settings, cfg.data.resolution, PROMPTS).save_pretrained(folder)


def child(block: str, args) -> dict:
    """One block in this process: median ms per training step (``args.steps`` after one warm-up), the training's peak
    memory, then median seconds per generated batch (``args.generations`` after one warm-up)."""
    import hydra
    import torch

    import controlnet_lab.module  # noqa: F401  loaded before the baseline RSS, as every block imports it
    from controlnet_lab.sampling import Sampling

    cfg = composed(args.experiment, block, args.overrides)
    baseline_rss = rss_mb()
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.module, base_path=str(args.base), sample_dir=None, base_dtype="float32", ema=None,
                                     base_fingerprint=None, compile=None)
    module.train()
    optimizer = module.configure_optimizers()["optimizer"]
    batch_size, resolution = cfg.data.batch_size, cfg.data.resolution
    generator = torch.Generator().manual_seed(0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    with torch.no_grad():
        hidden, _ = module.base.encode_prompt(prompts)
        encoding = module.base.image_encoding(torch.rand(batch_size, 3, resolution, resolution, generator=generator) * 2 - 1)
    batch = {"image_encoding": encoding, "text_hidden": hidden, "prompt": prompts,
             "condition": torch.rand(batch_size, 3, resolution, resolution, generator=generator)}

    def step() -> float:
        started = time.perf_counter()
        module.diffusion_loss(batch, denoiser=module.training_denoiser).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    step()  # warm-up
    seconds = [step() for _ in range(args.steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    module.eval()
    sampling = Sampling.from_config(cfg.model.sampling).kwargs()

    def generate() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            module.base(prompts, condition=batch["condition"], controlnet=module.controlnet, **sampling,
                        generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - started

    generate()  # warm-up
    generating = [generate() for _ in range(args.generations)]
    return {"ms_per_step": round(statistics.median(seconds) * 1000, 1), "trainable_params": module.trainable_parameter_count(),
            "s_per_generated_batch": round(statistics.median(generating), 2),
            "peak_memory_mb": round(peak - baseline_rss, 1), "batch": batch_size, "resolution": resolution,
            "torch_threads": torch.get_num_threads()}


def run_child(block: str, args) -> dict:
    flags = ["--experiment", args.experiment, "--steps", str(args.steps), "--generations", str(args.generations), "--base", str(args.base), *args.overrides]
    done = subprocess.run([sys.executable, __file__, "--child", block, *flags], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"block={block} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(runs: list[dict], reference: dict | None) -> dict:
    result = {"trainable_params": runs[0]["trainable_params"],
              "ms_per_step": round(statistics.median(r["ms_per_step"] for r in runs), 1),
              "ms_per_step_rounds": [r["ms_per_step"] for r in runs],
              "s_per_generated_batch": round(statistics.median(r["s_per_generated_batch"] for r in runs), 2),
              "peak_memory_mb": round(statistics.median(r["peak_memory_mb"] for r in runs), 1)}
    if reference is not None:
        for key in ("trainable_params", "ms_per_step", "s_per_generated_batch", "peak_memory_mb"):
            result[f"{key}_ratio_to_zero"] = round(result[key] / reference[key], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="ablation_architecture")
    parser.add_argument("--blocks", nargs="+", default=BLOCKS, choices=BLOCKS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round, after one warm-up step")
    parser.add_argument("--generations", type=int, default=3, help="timed generated batches per round, after one warm-up")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "ablation_architecture" / "cost.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the experiment's config, e.g. data.batch_size=8")
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", metavar="BLOCK", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    if "zero" not in args.blocks:
        parser.error("--blocks must include zero: every ratio is to it")

    from controlnet_lab.provenance import OtherLoad, commit, machine

    runs = {block: [] for block in args.blocks}
    with tempfile.TemporaryDirectory() as folder, OtherLoad() as load:
        args.base = Path(folder) / "base"
        save_base(args.experiment, args.overrides, args.base)
        for round_index in range(args.rounds):
            for block in args.blocks:
                runs[block].append(run_child(block, args))
                print(f"round {round_index + 1}: {block:16} {runs[block][-1]['ms_per_step']:8.1f} ms/step  "
                      f"peak {runs[block][-1]['peak_memory_mb']:7.1f} MiB", flush=True)
    zero = summary(runs["zero"], None)
    blocks = {block: zero if block == "zero" else summary(block_runs, zero) for block, block_runs in runs.items()}
    for block, row in blocks.items():
        print(f"{block:16} {row['trainable_params']:>9,} trainable  {row['ms_per_step']:8.1f} ms/step  {row['peak_memory_mb']:7.1f} MiB  "
              f"{row['s_per_generated_batch']:6.2f} s/generated batch  "
              + ("" if block == "zero" else f"(x{row['ms_per_step_ratio_to_zero']} step, x{row['s_per_generated_batch_ratio_to_zero']} generation, "
                                            f"x{row['peak_memory_mb_ratio_to_zero']} memory)"))
    first = runs["zero"][0]
    report = {"what": "one training step of each block (objective, backward, optimizer step) and one generated batch (the "
                      "same conditions through diffusers' pipeline of the block at the experiment's sampling settings), each "
                      "block in its own process, alternating blocks over rounds; base: the experiment's architecture with "
                      "random weights",
              "memory": "peak RSS above the RSS after the imports (model, optimizer state, one step's activations)",
              "experiment": args.experiment, "overrides": args.overrides, "batch": first["batch"], "resolution": first["resolution"],
              "torch_threads": first["torch_threads"], "rounds": args.rounds, "steps_per_round": args.steps,
              "blocks": blocks, **commit(), "machine": machine(), "other_load": load.result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
