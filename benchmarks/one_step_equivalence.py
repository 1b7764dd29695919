"""Do the harness and diffusers' ControlNet script take the same training step? One step of each on the same batch,
noise, timesteps and starting weights, compared by loss and gradients.

Both run as vs_diffusers.py runs them (the same base, ControlNet start, imagefolder data and settings; the harness in
its default configuration, locked encodings cached), each under step_probe.py, which gives the step its random draws
(the VAE posterior's sample, the noise, the timesteps: drawn here once from ``--seed``) and saves its loss and the
ControlNet's gradients before clipping. The harness runs first: its first batch (which samples, in which order, which
prompts its dropout emptied) becomes the script's data, its folder holding exactly those samples with those captions,
read in order, with ``--proportion_empty_prompts=0``. The ControlNet starts with its zero convolutions drawn from a
normal distribution (std ``--join-std``), as after some training: from the zero start only those convolutions get a
gradient, and the comparison would leave the copy's gradients untested. Equivalent when the losses agree to ``--rtol`` and so does every
gradient (its largest difference against the largest gradient of its parameter); the cosine similarity and norm
ratio of all gradients together are recorded beside.

    python benchmarks/one_step_equivalence.py [--batch 8 --resolution 32 --seed 0]

Writes ``--out`` (experiments/performance/one_step_equivalence.json) and exits 1 when the two steps differ.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import ControlNetModel

from controlnet_lab.data.fill50k import read_index
from controlnet_lab.provenance import commit, machine
from vs_diffusers import ANCHOR, ROOT, build_models, command, require_anchor, same_data

PROBE = Path(__file__).resolve().parent / "step_probe.py"
LATENT_CHANNELS, VAE_FACTOR = 4, 4  # model=tiny_sd's latents
NUM_TRAIN_TIMESTEPS = 1000


def given_draws(batch: int, resolution: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, LATENT_CHANNELS, resolution // VAE_FACTOR, resolution // VAE_FACTOR)
    return {"latent_eps": torch.randn(shape, generator=generator), "noise": torch.randn(shape, generator=generator),
            "timesteps": torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)}


def joined_start(controlnet_folder: Path, std: float, seed: int) -> None:
    """The saved ControlNet with its zero convolutions (the joins to the locked UNet) drawn from N(0, std^2)."""
    controlnet = ControlNetModel.from_pretrained(controlnet_folder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for join in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            for parameter in join.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    controlnet.save_pretrained(controlnet_folder)


def probed(argv: list[str], draws: Path, out: Path, log: Path) -> dict:
    """``argv`` (a python command) run under step_probe.py; its record."""
    with log.open("w") as output:
        status = subprocess.run([sys.executable, str(PROBE), str(draws), str(out), *argv[1:]], cwd=ROOT, stdout=output,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}).returncode
    if status != 0 or not out.exists():
        raise RuntimeError(f"{argv[1]} failed under the probe; see {log}:\n{log.read_text()[-3000:]}")
    record = torch.load(out)
    if record.get("given_draws_used") != 3 or "grads" not in record:
        raise RuntimeError(f"{argv[1]}: {record.get('given_draws_used')} of the 3 given draws used, gradients "
                           f"{'saved' if 'grads' in record else 'missing'}; see {log}")
    return record


def batch_folder(harness: dict, folder: Path) -> Path:
    """The harness's first batch as the script's imagefolder: its samples in its order, each with the prompt it trained on."""
    (folder / "images").mkdir(parents=True)
    (folder / "conditions").mkdir()
    with (folder / "metadata.jsonl").open("w") as metadata:
        for i, (target, condition, prompt) in enumerate(zip(harness["targets"], harness["conditions"], harness["prompts"])):
            shutil.copyfile(target, folder / "images" / f"{i}.png")
            shutil.copyfile(condition, folder / "conditions" / f"{i}.png")
            metadata.write(json.dumps({"file_name": f"images/{i}.png", "conditioning_image_file_name": f"conditions/{i}.png",
                                       "text": prompt}) + "\n")
    return folder


def compare(harness: dict, script: dict, rtol: float) -> dict:
    """Loss and gradients of the two steps, side by side."""
    if set(harness["grads"]) != set(script["grads"]):
        raise RuntimeError(f"the ControlNets' parameters differ: only in the harness {sorted(set(harness['grads']) - set(script['grads']))[:5]}, "
                           f"only in the script {sorted(set(script['grads']) - set(harness['grads']))[:5]}")
    names = sorted(harness["grads"])
    worst = max(names, key=lambda n: float((harness["grads"][n] - script["grads"][n]).abs().max() / script["grads"][n].abs().max().clamp_min(1e-30)))
    worst_difference = float((harness["grads"][worst] - script["grads"][worst]).abs().max() / script["grads"][worst].abs().max().clamp_min(1e-30))
    ours, theirs = (torch.cat([g[n].flatten() for n in names]).double() for g in (harness["grads"], script["grads"]))
    loss_difference = abs(harness["loss"] - script["loss"]) / abs(script["loss"])
    return {"harness_loss": harness["loss"], "script_loss": script["loss"], "loss_relative_difference": loss_difference,
            "gradient_largest_relative_difference": {"parameter": worst, "value": worst_difference},
            "gradient_cosine_similarity": float(torch.nn.functional.cosine_similarity(ours, theirs, dim=0)),
            "gradient_norm_ratio": float(ours.norm() / theirs.norm()), "parameters": len(names),
            "nonzero_gradients": sum(bool(script["grads"][n].abs().max() > 0) for n in names),
            "rtol": rtol, "equivalent": loss_difference <= rtol and worst_difference <= rtol}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--samples", type=int, default=64, help="the harness's data (it holds some out; its first batch is compared)")
    parser.add_argument("--seed", type=int, default=0, help="of the given draws")
    parser.add_argument("--join-std", type=float, default=0.02, help="of the ControlNet's starting zero convolutions")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--anchor", type=Path, default=ANCHOR, help="diffusers' train_controlnet.py")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "performance" / "one_step_equivalence.json")
    args = parser.parse_args()
    require_anchor(parser, args.anchor)
    # What vs_diffusers.command reads: one step, float32, CPU, in-process data loading, its default learning rate.
    settings = argparse.Namespace(batch=args.batch, resolution=args.resolution, lr=1e-4, precision="32", workers=0, device="cpu",
                                  base="tiny_sd", window=1)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        fill50k = same_data(tmp, args.anchor, args.samples, args.resolution)
        build_models(tmp, args.resolution, [r.prompt for r in read_index(fill50k)])
        joined_start(tmp / "controlnet_init", args.join_std, args.seed)
        torch.save(given_draws(args.batch, args.resolution, args.seed), tmp / "draws.pt")
        harness = probed(command("harness", 1, settings, tmp, tmp / "runs" / "harness"), tmp / "draws.pt", tmp / "harness.pt", tmp / "harness.log")
        ordered = batch_folder(harness, tmp / "batch_folder")
        argv = [a.replace(f"--train_data_dir={tmp / 'folder'}", f"--train_data_dir={ordered}")
                 .replace("--proportion_empty_prompts=0.5", "--proportion_empty_prompts=0")
                 .replace("--report_to=tensorboard", "--report_to=wandb")  # disabled here: nothing to log, and no bench extra needed
                for a in command("diffusers_script", 1, settings, tmp, tmp / "runs" / "script")]
        script = probed(argv, tmp / "draws.pt", tmp / "script.pt", tmp / "script.log")
    result = compare(harness, script, args.rtol)
    report = {
        "what": "one training step of the harness (default configuration, encodings cached) and of diffusers' train_controlnet.py on the "
                "same batch, VAE posterior sample, noise, timesteps and starting weights: loss and ControlNet gradients before clipping",
        **result,
        "batch_prompts_emptied": sum(p == "" for p in harness["prompts"]),
        "settings": {"base": "model=tiny_sd architecture, untrained", "batch": args.batch, "resolution": args.resolution, "seed": args.seed,
                     "controlnet_start": f"copied from the UNet, its zero convolutions drawn from N(0, {args.join_std}^2)", "precision": "float32", "device": "cpu",
                     "anchor": "diffusers examples/controlnet/train_controlnet.py at 58eb52c0803ea9af3abec60841c2a093bdf1f951 (../shared/anchors)"},
        **commit(), "machine": machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("harness_loss", "script_loss", "loss_relative_difference", "gradient_largest_relative_difference",
                                             "gradient_cosine_similarity", "nonzero_gradients", "parameters", "equivalent")}, indent=2))
    if not result["equivalent"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
