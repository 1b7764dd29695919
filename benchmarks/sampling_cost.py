"""Cost of sampling with ControlNets: one or two nets, with and without CFG and its resolution weighting.

Every figure is measured in this process on the same base, batch and device, and
reported as a ratio against the locked base alone with the same guidance (and peak
memory on CUDA). Weights are untrained (cost does not depend on them): the embedded
default's tiny base (conf/model/tiny.yaml) and ControlNetModel.from_unet copies of it.

    python benchmarks/sampling_cost.py                      # CPU, 32 px, batch 64, 20 DDIM steps
    python benchmarks/sampling_cost.py --device cuda --batch 256

Writes the figures, the commit, the machine and the CPU time other programs took
meanwhile to ``--out`` (experiments/sampling_cost/sampling_cost.json).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from controlnet_lab.bases import build_pixel_base
from controlnet_lab.blocks import build_trainable_copy
from controlnet_lab.data.colors import make_prompt
from controlnet_lab.provenance import OtherLoad, commit, machine

ROOT = Path(__file__).resolve().parents[1]


def measure(run, repeats: int, device: torch.device) -> tuple[float, float | None]:
    """Seconds per call of ``run`` after a warm-up (and CUDA peak memory)."""
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (time.perf_counter() - started) / repeats, torch.cuda.max_memory_allocated() / 2**20
    return (time.perf_counter() - started) / repeats, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "sampling_cost" / "sampling_cost.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml").base
    colors = ["red", "green", "blue", "yellow"]
    prompts = [make_prompt(colors[i % 4], colors[(i + 1) % 4]) for i in range(args.batch)]
    pipeline = build_pixel_base(OmegaConf.to_container(model_cfg), args.resolution, prompts).to(device)
    pipeline.set_progress_bar_config(disable=True)
    nets = [build_trainable_copy(pipeline.unet, "gauss", (16,), std=0.02).to(device).eval() for _ in range(2)]
    condition = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device)

    def sampler(controlnets: list, guidance: float, weighting: str = "off"):
        def run():
            pipeline(prompts, condition=[condition] * len(controlnets) if controlnets else None, controlnet=controlnets or None,
                     num_inference_steps=args.steps, guidance_scale=guidance, resolution_weighting=weighting,
                     generator=torch.Generator().manual_seed(0))
        return run

    cases = [
        ("base alone", [], 1.0, "off"),
        ("+ 1 ControlNet", nets[:1], 1.0, "off"),
        ("+ 2 ControlNets", nets, 1.0, "off"),
        ("base alone", [], args.guidance, "off"),
        ("+ 1 ControlNet", nets[:1], args.guidance, "off"),
        ("+ 1 ControlNet, resolution weighting (paper)", nets[:1], args.guidance, "paper"),
        ("+ 2 ControlNets", nets, args.guidance, "off"),
        ("+ 2 ControlNets, resolution weighting (paper)", nets, args.guidance, "paper"),
    ]
    print(f"device {device}, {args.resolution} px, batch {args.batch}, {args.steps} DDIM steps, {args.repeats} repeats")
    print(f"{'case':<48} {'guidance':>8} {'s/batch':>8} {'images/s':>9} {'x base alone':>13} {'peak MiB':>9}")
    baseline, rows = {}, []
    with torch.no_grad(), OtherLoad() as load:
        for name, controlnets, guidance, weighting in cases:
            cost, memory = measure(sampler(controlnets, guidance, weighting), args.repeats, device)
            baseline.setdefault(guidance, cost)
            peak = f"{memory:9.0f}" if memory is not None else f"{'-':>9}"
            print(f"{name:<48} {guidance:>8.1f} {cost:>8.3f} {args.batch / cost:>9.1f} {cost / baseline[guidance]:>13.2f} {peak}")
            rows.append({"case": name, "guidance_scale": guidance, "resolution_weighting": weighting, "s_per_batch": round(cost, 4),
                         "images_per_s": round(args.batch / cost, 2), "ratio_to_base_alone": round(cost / baseline[guidance], 3), "peak_mib": memory})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**commit(), "machine": machine(), "device": str(device), "other_load": load.result,
                                    "settings": {k: v for k, v in vars(args).items() if k != "out"}, "cases": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
