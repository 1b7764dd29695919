"""The speed-ups one would try on the default's ControlNet step on this CPU, measured side by side before adopting any.

On the default's step (step_cost.py's ControlNet step: the embedded ``tiny`` base at 32 px, batch 32, untrained
weights), in this process, alternating for ``--rounds`` rounds (median ms/step of ``--repeats`` steps each):

- ``eager_fp32``: the step with torch's default threads and torch's CPU default AdamW (a Python loop over the tensors);
- ``foreach_adamw`` / ``fused_adamw``: the same with AdamW's ``foreach=True`` (one multi-tensor op per stage; what
  conf/optimizer/adamw.yaml sets) or ``fused=True`` (one kernel; what base pretraining uses);
- ``one_thread``: ``torch.set_num_threads(1)``;
- ``channels_last``: both models and the inputs in ``torch.channels_last``;
- ``bf16_autocast``: ``torch.autocast("cpu", torch.bfloat16)`` around the forward passes (as ``trainer.precision=bf16-mixed``);
- ``compile`` (with ``--compile``; minutes of compilation first): ``torch.compile`` of the locked UNet and the copy.

The optimizer alone: ms per AdamW update of the tiny base's UNet and text encoder (what base pretraining updates, 288
tensors) with each implementation, and the largest difference of the three from the loop's weights after 10 updates.

And the data side: ms per batch of the default's training loader (PNG decoding, ``num_workers=0``), of the same loader
without the targets (what training on cached VAE latents reads), and of indexing the same batch out of an in-memory
tensor cache. Writes ``--out`` (experiments/performance/speed_options.json) with the
commit, the machine and the CPU time other programs took meanwhile.

    python benchmarks/speed_options.py [--rounds 3 --repeats 5 --compile]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from controlnet_lab.bases import build_pixel_base
from controlnet_lab.data.datamodule import Fill50kDataModule
from controlnet_lab.data.synthetic import SyntheticFill50kSpec, write_fill50k
from controlnet_lab.provenance import OtherLoad, commit, machine
from step_cost import build

ROOT = Path(__file__).resolve().parents[1]


ADAMW = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def controlnet_step(unet, controlnet, inputs, autocast: bool, adamw: str):
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, **ADAMW[adamw])
    unet.requires_grad_(False)
    extra = {"class_labels": inputs["class_labels"]} if inputs["class_labels"] is not None else {}

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            down, mid = controlnet(inputs["x"], inputs["t"], inputs["hidden"], controlnet_cond=inputs["cond"], return_dict=False, **extra)
            prediction = unet(inputs["x"], inputs["t"], inputs["hidden"], down_block_additional_residuals=down,
                              mid_block_additional_residual=mid, **extra).sample
        F.mse_loss(prediction.float(), inputs["x"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def option_step(name: str, args):
    """A fresh (unet, controlnet) set up as the option says, and its step."""
    torch.manual_seed(0)
    unet, controlnet, inputs, _ = build("tiny", torch.device("cpu"), resolution=32, batch=args.batch, sd15_latent=0)
    if name == "channels_last":
        unet, controlnet = unet.to(memory_format=torch.channels_last), controlnet.to(memory_format=torch.channels_last)
        inputs = {k: v.contiguous(memory_format=torch.channels_last) if v is not None and v.dim() == 4 else v for k, v in inputs.items()}
    if name == "compile":
        unet, controlnet = torch.compile(unet), torch.compile(controlnet)
    adamw = name.removesuffix("_adamw") if name.endswith("_adamw") else "loop"
    return controlnet_step(unet, controlnet, inputs, autocast=name == "bf16_autocast", adamw=adamw)


def optimizer_cost(rounds: int, updates: int = 20) -> dict:
    """ms per AdamW update of the tiny base's UNet and text encoder by each implementation (median of ``rounds``),
    and each one's largest weight difference from the loop's after 10 updates from the same gradients."""
    torch.manual_seed(0)
    settings = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml").base, resolve=True)
    base = build_pixel_base(settings, 32, ["red circle with blue background"])
    start = [p.detach().clone() for p in list(base.unet.parameters()) + list(base.text_encoder.parameters())]
    grads = [torch.randn_like(p) for p in start]

    def optimizer(kind: str):
        params = [p.clone().requires_grad_() for p in start]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        return params, torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, **ADAMW[kind])

    ms, weights = {kind: [] for kind in ADAMW}, {}
    for kind in ADAMW:
        params, adamw = optimizer(kind)
        for _ in range(10):
            adamw.step()
        weights[kind] = params
    for _ in range(rounds):
        for kind in ADAMW:
            _, adamw = optimizer(kind)
            adamw.step()  # the state's first allocation, outside the timing
            started = time.perf_counter()
            for _ in range(updates):
                adamw.step()
            ms[kind].append((time.perf_counter() - started) / updates * 1000)
    return {"tensors": len(start), "parameters": sum(p.numel() for p in start),
            "ms_per_update": {kind: round(statistics.median(values), 2) for kind, values in ms.items()},
            "max_abs_difference_from_loop_after_10": {kind: float(max((a - b).abs().max() for a, b in zip(weights[kind], weights["loop"])))
                                                      for kind in ADAMW}}


def timed(step, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def loader_cost(batch: int, batches: int) -> dict:
    """ms per batch: the training loader (PNG decoding), the same without targets, and the same batches indexed out
    of tensors in memory."""
    with tempfile.TemporaryDirectory() as folder:
        spec = SyntheticFill50kSpec(count=batch * batches + 64, resolution=32, palette=("red", "green", "blue", "yellow"),
                                    radius_range=(0.15, 0.35), outline_thickness=1, seed=0)
        data = Fill50kDataModule(root=write_fill50k(spec, Path(folder) / "data"), name="bench", resolution=32, batch_size=batch,
                                 val_size=16, prompt_dropout=0.5, condition="outline", cache_dir=Path(folder) / "cache")
        data.setup()
        started = time.perf_counter()
        items = list(data.train_dataloader())[:batches]
        decoded = (time.perf_counter() - started) / len(items)
        loader = data.train_dataloader()
        loader.dataset.with_target = False
        started = time.perf_counter()
        without_targets = [batch for batch, _ in zip(loader, range(batches))]
        no_targets = (time.perf_counter() - started) / len(without_targets)
        cached = {key: torch.cat([b[key] for b in items]) for key in ("condition", "target")}
        order = torch.randperm(len(cached["target"]))
        started = time.perf_counter()
        for i in range(len(items)):
            rows = order[i * batch:(i + 1) * batch]
            _ = {key: values[rows] for key, values in cached.items()}
        in_memory = (time.perf_counter() - started) / len(items)
    return {"png_decoding_ms_per_batch": round(decoded * 1000, 2), "without_targets_ms_per_batch": round(no_targets * 1000, 2),
            "in_memory_ms_per_batch": round(in_memory * 1000, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "performance" / "speed_options.json")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    names = ["eager_fp32", "foreach_adamw", "fused_adamw", "one_thread", "channels_last", "bf16_autocast"] + (["compile"] if args.compile else [])
    with OtherLoad() as load:
        steps = {name: option_step(name, args) for name in names}
        for name, step in steps.items():  # warm-up (and compilation)
            torch.set_num_threads(1 if name == "one_thread" else threads)
            step()
        ms = {name: [] for name in names}
        for round_ in range(args.rounds):
            for name, step in steps.items():
                torch.set_num_threads(1 if name == "one_thread" else threads)
                ms[name].append(timed(step, args.repeats) * 1000)
                print(f"round {round_} {name:<14} {ms[name][-1]:7.1f} ms/step", flush=True)
        torch.set_num_threads(threads)
        data = loader_cost(args.batch, 40)
        optimizer = optimizer_cost(args.rounds)
    median = {name: statistics.median(values) for name, values in ms.items()}
    report = {
        "what": "the default's ControlNet step (tiny base, 32 px) under each option, alternating in one process; and its data loading",
        "ms_per_step": {name: round(value, 1) for name, value in median.items()},
        "speedup_vs_eager_fp32": {name: round(median["eager_fp32"] / value, 3) for name, value in median.items()},
        "rounds_ms_per_step": {name: [round(v, 1) for v in values] for name, values in ms.items()},
        "data_loading": {**data, "share_of_eager_step": round(data["png_decoding_ms_per_batch"] / median["eager_fp32"], 4)},
        "optimizer_alone": optimizer,
        "settings": {**vars(args), "out": str(args.out), "torch_threads": threads},
        **commit(), "machine": machine(), "other_load": load.result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("ms_per_step", "speedup_vs_eager_fp32", "data_loading", "optimizer_alone")}, indent=2))


if __name__ == "__main__":
    main()
