"""Cost of one ControlNet training step against fine-tuning the base UNet itself (paper: +34% time, +23% memory on SD).

Both are measured in this process on the same batch, base and device, so the
figures are ratios against a baseline run side by side. On CUDA, peak memory comes
from torch.cuda.max_memory_allocated; on the CPU only time is reported.

    python benchmarks/step_cost.py                          # tiny base, CPU
    python benchmarks/step_cost.py --resolution 64 --channels 64 128 256 --batch 64   # larger, e.g. on a GPU
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel


def build_unet(channels: list[int], resolution: int, text_dim: int) -> UNet2DConditionModel:
    down = ["DownBlock2D"] * (len(channels) - 1) + ["CrossAttnDownBlock2D"]
    up = ["CrossAttnUpBlock2D"] + ["UpBlock2D"] * (len(channels) - 1)
    return UNet2DConditionModel(
        sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=1,
        down_block_types=down, up_block_types=up, cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=8,
    )


def measure(step, repeats: int, device: torch.device) -> tuple[float, float | None]:
    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (time.perf_counter() - started) / repeats, torch.cuda.max_memory_allocated() / 2**20
    return (time.perf_counter() - started) / repeats, None


def finetune_cost(unet, x, t, hidden, repeats, device):
    """Time (and CUDA peak memory) of a step that trains the whole UNet; its optimizer dies with this call."""
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)

    def step():
        F.mse_loss(unet(x, t, hidden).sample, x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(step, repeats, device)


def controlnet_cost(unet, controlnet, x, cond, t, hidden, repeats, device):
    """The same for a ControlNet step: the UNet locked, gradients flowing through it into the copy."""
    unet.requires_grad_(False)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)

    def step():
        down, mid = controlnet(x, t, hidden, controlnet_cond=cond, return_dict=False)
        prediction = unet(x, t, hidden, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        F.mse_loss(prediction, x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(step, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text_dim, tokens = 64, 12

    unet = build_unet(args.channels, args.resolution, text_dim).to(device)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16,)).to(device)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
    cond = torch.rand_like(x)
    hidden = torch.randn(args.batch, tokens, text_dim, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)

    finetune_time, finetune_mem = finetune_cost(unet, x, t, hidden, args.repeats, device)
    controlnet_time, controlnet_mem = controlnet_cost(unet, controlnet, x, cond, t, hidden, args.repeats, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; resolution {args.resolution}, channels {args.channels}, batch {args.batch}")
    print(f"UNet params {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, ControlNet params {sum(p.numel() for p in controlnet.parameters()) / 1e6:.2f}M")
    print(f"fine-tune base UNet : {finetune_time * 1000:8.1f} ms/step  {args.batch / finetune_time:8.1f} img/s" + (f"  peak {finetune_mem:8.1f} MiB" if finetune_mem else ""))
    print(f"ControlNet (locked) : {controlnet_time * 1000:8.1f} ms/step  {args.batch / controlnet_time:8.1f} img/s" + (f"  peak {controlnet_mem:8.1f} MiB" if controlnet_mem else ""))
    print(f"ratio ControlNet / fine-tune: time x{controlnet_time / finetune_time:.2f}" + (f", memory x{controlnet_mem / finetune_mem:.2f}" if finetune_mem else "") + "  (paper, SD1.5 on A100: time x1.34, memory x1.23)")


if __name__ == "__main__":
    main()
