"""Cost of one ControlNet training step against fine-tuning the base UNet itself (paper: +34% time, +23% memory on SD 1.5, A100).

Three bases, each with untrained weights (cost does not depend on them):

- ``tiny``: the embedded pixel base (conf/model/tiny.yaml) at 32 px, batch 32;
- ``tiny_sd``: the embedded latent base's UNet (conf/model/tiny_sd.yaml) on 8x8 latents of 32 px images, batch 32;
- ``sd15``: Stable Diffusion 1.5's UNet shape (diffusers' ``UNet2DConditionModel`` defaults with SD 1.5's
  768-wide cross-attention, 860 M parameters) and its ControlNet (hint encoder 16/32/96/256), at
  ``--sd15-latent`` (16: 128 px images) and batches 1 and 4 on a CPU: the largest this 2-core machine steps in seconds.

Fine-tuning trains the whole UNet (AdamW); the ControlNet step trains the copy (AdamW) with the UNet locked and its
residuals added; with ``--precision bf16`` both run under bf16 autocast with the trained weights in float32 and the
locked UNet in bfloat16, as diffusers' script does with ``--mixed_precision=bf16``. Each (base, step) runs in its own
child process, so peak memory is that process's own: on CUDA ``max_memory_allocated``, on a CPU the peak RSS above
the RSS after the imports (ru_maxrss). The ControlNet step's time is split into the hint encoder
(``controlnet_cond_embedding``), the rest of the trainable copy's forward, the locked UNet's forward (and how much the
residuals add to it: the additions and the graph they make the locked decoder record), the backward pass and the
optimizer.

    python benchmarks/step_cost.py                               # all three, CPU
    python benchmarks/step_cost.py --bases sd15 --device cuda --precision bf16 --sd15-latent 64 --sd15-batch 8   # 512 px on a GPU

Writes ``--out`` (experiments/performance/step_cost.json) with the commit, the machine and the CPU time other programs
took meanwhile.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"time": 1.34, "memory": 1.23}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def build(base: str, device, resolution: int, batch: int, sd15_latent: int, with_controlnet: bool = True):
    """(unet, controlnet, inputs, shape) of a base: the UNet and (unless ``with_controlnet`` is false: None) its
    trainable copy as the harness builds them."""
    import torch
    from omegaconf import OmegaConf

    from controlnet_lab.blocks import build_trainable_copy
    from sd15_shaped import HINT_CHANNELS, sd15_unet

    prompts = ["red circle with blue background", "green circle with yellow background"]
    if base == "sd15":
        unet = sd15_unet(sd15_latent)
        hint, resolution, tokens, pooled, latent = HINT_CHANNELS, sd15_latent * 8, 77, None, sd15_latent
    else:
        settings = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{base}.yaml").base, resolve=True)
        tokens = settings["text_encoder"]["max_position_embeddings"]
        if base == "tiny":
            from controlnet_lab.bases import build_pixel_base
            unet, hint, latent = build_pixel_base(settings, resolution, prompts).unet, (16,), resolution
        else:
            from controlnet_lab.bases.tiny_sd import build_tiny_sd, vae_scale_factor
            unet, hint = build_tiny_sd(settings, resolution, prompts).unet, (16, 32, 64)
            latent = resolution // vae_scale_factor(settings["vae"])
        pooled = settings["text_encoder"]["hidden_size"] if unet.config.class_embed_type == "projection" else None
    controlnet = build_trainable_copy(unet, "zero", hint).to(device) if with_controlnet else None
    unet = unet.to(device)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "x": torch.randn(batch, unet.config.in_channels, latent, latent, generator=generator).to(device),
        "t": torch.randint(0, 1000, (batch,), generator=generator).to(device),
        "hidden": torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=generator).to(device),
        "class_labels": torch.randn(batch, pooled, generator=generator).to(device) if pooled else None,
        "cond": torch.rand(batch, 3, resolution, resolution, generator=generator).to(device),
    }
    shape = {"resolution": resolution, "latent": latent, "batch": batch, "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
             "controlnet_params_m": round(sum(p.numel() for p in controlnet.parameters()) / 1e6, 2) if controlnet else None}
    return unet, controlnet, inputs, shape


class Phases:
    """Wall time of named phases within a step (synchronised on CUDA)."""

    def __init__(self, device):
        self.device, self.seconds = device, {}

    def now(self) -> float:
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def hook(self, module, name: str) -> None:
        """Times ``module``'s forward as the phase ``name``."""
        started = {}
        module.register_forward_pre_hook(lambda *_: started.__setitem__("t", self.now()))
        module.register_forward_hook(lambda *_: self.add(name, self.now() - started["t"]))

    def add(self, name: str, seconds: float) -> None:
        self.seconds.setdefault(name, []).append(seconds)


def child(base: str, mode: str, args) -> dict:
    """One (base, step) in this process: median ms per step and its phases, and peak memory."""
    import torch
    import torch.nn.functional as F

    import controlnet_lab.bases.tiny_sd  # noqa: F401  what build() imports, loaded before the baseline RSS
    import controlnet_lab.blocks  # noqa: F401

    device = torch.device(args.device)
    baseline_rss = rss_mb()
    unet, controlnet, inp, shape = build(base, device, args.resolution, args.batch, args.sd15_latent, with_controlnet=mode == "controlnet")
    phases = Phases(device)
    bf16 = args.precision == "bf16"
    if bf16 and mode == "controlnet":
        unet.to(torch.bfloat16)  # the locked UNet in bfloat16, as diffusers' script and the harness keep it under bf16 mixed precision
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    extra = {"class_labels": inp["class_labels"]} if inp["class_labels"] is not None else {}
    if mode == "finetune":
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)

        def step():
            t0 = phases.now()
            with autocast:
                loss = F.mse_loss(unet(inp["x"], inp["t"], inp["hidden"], **extra).sample.float(), inp["x"])
            t1 = phases.now()
            loss.backward()
            t2 = phases.now()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t3 = phases.now()
            phases.add("unet_forward", t1 - t0), phases.add("backward", t2 - t1), phases.add("optimizer", t3 - t2)
    else:
        unet.requires_grad_(False)
        optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
        phases.hook(controlnet.controlnet_cond_embedding, "hint_encoder")

        def step():
            t0 = phases.now()
            with autocast:
                down, mid = controlnet(inp["x"], inp["t"], inp["hidden"], controlnet_cond=inp["cond"], return_dict=False, **extra)
            t1 = phases.now()
            with autocast:
                prediction = unet(inp["x"], inp["t"], inp["hidden"], down_block_additional_residuals=down, mid_block_additional_residual=mid,
                                  **extra).sample
            t2 = phases.now()
            F.mse_loss(prediction.float(), inp["x"]).backward()
            t3 = phases.now()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t4 = phases.now()
            phases.add("controlnet_forward", t1 - t0), phases.add("unet_forward", t2 - t1)
            phases.add("backward", t3 - t2), phases.add("optimizer", t4 - t3)
            with autocast:
                unet(inp["x"], inp["t"], inp["hidden"], **extra)  # the locked forward without residuals (not part of the step)
            phases.add("unet_forward_without_residuals", phases.now() - t4)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up
    phases.seconds.clear()
    totals = []
    for _ in range(args.repeats):
        started = phases.now()
        step()
        totals.append(phases.now() - started - (phases.seconds.get("unet_forward_without_residuals", [0])[-1]))
    report = {"mode": mode, **shape, "ms_per_step": round(statistics.median(totals) * 1000, 1),
              "phases_ms": {name: round(statistics.median(values) * 1000, 1) for name, values in phases.seconds.items()},
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "rss_after_imports_mb": round(baseline_rss, 1)}
    report["peak_memory_mb"] = (round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda"
                                else round(report["peak_rss_mb"] - baseline_rss, 1))
    return report


def run_child(base: str, mode: str, **options) -> dict:
    """``child(base, mode)`` in a fresh process (its own peak memory); options are this script's flags."""
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--child", base, mode, *flags], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{base} {mode} {options} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(finetune: dict, controlnet: dict) -> dict:
    phases = controlnet["phases_ms"]
    return {
        "time_ratio": round(controlnet["ms_per_step"] / finetune["ms_per_step"], 3),
        "memory_ratio": round(controlnet["peak_memory_mb"] / finetune["peak_memory_mb"], 3),
        "controlnet_step_ms": {
            "hint_encoder": phases["hint_encoder"],
            "trainable_encoder_forward": round(phases["controlnet_forward"] - phases["hint_encoder"], 1),
            "locked_unet_forward": phases["unet_forward"],
            "of_which_residuals": round(phases["unet_forward"] - phases["unet_forward_without_residuals"], 1),
            "backward": phases["backward"], "optimizer": phases["optimizer"]},
        "finetune_step_ms": finetune["phases_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", nargs="+", default=["tiny", "tiny_sd", "sd15"], choices=["tiny", "tiny_sd", "sd15"])
    parser.add_argument("--batch", type=int, default=32, help="batch of the tiny bases")
    parser.add_argument("--resolution", type=int, default=32, help="image side of the tiny bases")
    parser.add_argument("--sd15-latent", type=int, default=16, help="latent side of the SD 1.5-shaped UNet (images 8x larger)")
    parser.add_argument("--sd15-batch", type=int, nargs="+", default=[1, 4], help="batches of the SD 1.5-shaped UNet, each measured")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32",
                        help="bf16: mixed precision as diffusers' script does it (autocast; trained weights float32, the locked UNet bfloat16)")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "performance" / "step_cost.json")
    parser.add_argument("--child", nargs=2, metavar=("BASE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return

    from controlnet_lab.provenance import OtherLoad, commit, machine

    results = {}
    with OtherLoad() as load:
        for base in args.bases:
            for batch in args.sd15_batch if base == "sd15" else [args.batch]:
                name = f"{base}_batch{batch}" if base == "sd15" else base
                options = dict(resolution=args.resolution, batch=batch, sd15_latent=args.sd15_latent, repeats=args.repeats, device=args.device,
                               precision=args.precision)
                runs = {mode: run_child(base, mode, **options) for mode in ("finetune", "controlnet")}
                for mode, run in runs.items():
                    print(f"{name:12} {mode:10} {run['ms_per_step']:9.1f} ms/step  peak {run['peak_memory_mb']:8.1f} MiB", flush=True)
                results[name] = {**runs, **compare(runs["finetune"], runs["controlnet"])}
                print(f"{name:12} ControlNet / fine-tune: time x{results[name]['time_ratio']}, memory x{results[name]['memory_ratio']}"
                      f"  (paper, SD 1.5 on an A100: x{PAPER['time']}, x{PAPER['memory']})", flush=True)
    import torch
    report = {"what": "one training step: the ControlNet (UNet locked) against fine-tuning the UNet, each in its own process",
              "memory": "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS above the RSS after imports",
              "paper": PAPER, "bases": results, "settings": {**vars(args), "out": str(args.out), "torch_threads": torch.get_num_threads()},
              **commit(), "machine": machine(), "other_load": load.result}
    report["settings"].pop("child")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
