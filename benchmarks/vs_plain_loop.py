"""What Lightning costs: the same ControlNet training step in a bare PyTorch loop and through the harness's Trainer.

Both train the same module (``ControlNetModule`` on the embedded ``tiny`` pixel base at 32 px, untrained weights: speed
does not depend on them) on the same data loader, one batch of ``--batch`` per step:

- ``plain_loop``: ``for batch in loader``: the module's ``diffusion_loss``, ``backward``, the module's own AdamW and
  learning-rate schedule (``configure_optimizers``), ``zero_grad``. Nothing else.
- ``lightning``: ``Trainer.fit`` with what the default config trains with (conf/callbacks/default.yaml: periodic
  checkpoints, the preemption checkpoint, the resume state, the progress bar, ThroughputMonitor, LearningRateMonitor)
  and the CSV logger, through the module's ``training_step`` (the loss, its finiteness check, ``self.log``). The
  callbacks that evaluate during training (the fidelity curve, validation images, the initial output change) are left
  out: they are evaluation, and cost what they measure.

The time of a step is the time from one batch's start to the next's (data loading included), median over a round's
steps after its first ``--warmup``; the two alternate for ``--rounds`` rounds (plain, Lightning, plain, ...).

    python benchmarks/vs_plain_loop.py [--steps 100 --rounds 3 --batch 32]

Writes ``--out`` (experiments/performance/vs_plain_loop.json) with the commit, the machine and the CPU time other
programs took meanwhile.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from controlnet_lab.bases import build_pixel_base
from controlnet_lab.data.datamodule import Fill50kDataModule
from controlnet_lab.data.synthetic import SyntheticFill50kSpec, write_fill50k
from controlnet_lab.module import ControlNetModule
from controlnet_lab.provenance import OtherLoad, commit, machine

ROOT = Path(__file__).resolve().parents[1]
SAMPLING_CALLBACKS = ("fidelity_curve", "validation_images", "initial_output_change")


class BatchStarts(L.Callback):
    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())


def median_step(starts: list[float], warmup: int) -> float:
    return statistics.median(b - a for a, b in zip(starts[warmup:], starts[warmup + 1:]))


def plain_loop(module: ControlNetModule, loader, steps: int) -> list[float]:
    """Batch start times of a bare loop over the same step."""
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    module.train()
    starts = []
    batches = iter(loader)
    for _ in range(steps):
        starts.append(time.perf_counter())
        batch = next(batches)
        module.diffusion_loss(batch).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    starts.append(time.perf_counter())
    return starts


def lightning_fit(module: ControlNetModule, loader, steps: int, cfg, folder: Path) -> list[float]:
    """Batch start times of Trainer.fit with the default config's callbacks and the CSV logger, writing into ``folder``
    (a fresh one per round: a round must not find the previous round's checkpoints)."""
    timer = BatchStarts()
    cfg.paths.output_dir = str(folder)
    callbacks = [hydra.utils.instantiate(c) for name, c in cfg.callbacks.items() if name not in SAMPLING_CALLBACKS]
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, limit_val_batches=0, logger=CSVLogger(folder),
                        callbacks=[*callbacks, timer], enable_model_summary=False, default_root_dir=str(folder))
    trainer.fit(module, train_dataloaders=loader)
    return [*timer.starts, time.perf_counter()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "performance" / "vs_plain_loop.json")
    args = parser.parse_args()
    resolution = 32
    with tempfile.TemporaryDirectory() as folder, OtherLoad() as load:
        tmp = Path(folder)
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"data.resolution={resolution}"])
        spec = SyntheticFill50kSpec(count=max(512, args.batch * (args.steps + 1)), resolution=resolution,
                                    palette=tuple(cfg.data.generator.palette), radius_range=(0.15, 0.35), outline_thickness=1, seed=0)
        data = Fill50kDataModule(root=write_fill50k(spec, tmp / "data"), name="bench", resolution=resolution, batch_size=args.batch,
                                 val_size=16, prompt_dropout=0.5, condition="outline", cache_dir=tmp / "cache")
        data.setup()
        build_pixel_base(OmegaConf.to_container(cfg.model.base, resolve=True), resolution, data.prompts()).save_pretrained(tmp / "base")
        seconds = {"plain_loop": [], "lightning": []}
        for i in range(args.rounds):
            for name in seconds:
                torch.manual_seed(0)
                module = ControlNetModule(str(tmp / "base"), lr=cfg.model.controlnet.lr, noise_offset=cfg.model.base.noise_offset,
                                          num_val_images=0, resolution=resolution,
                                          max_steps=args.steps, sample_dir=str(tmp / "samples"))
                loader = data.train_dataloader()
                starts = (plain_loop(module, loader, args.steps) if name == "plain_loop"
                          else lightning_fit(module, loader, args.steps, cfg, tmp / f"lightning-{i}"))
                seconds[name].append(median_step(starts, args.warmup))
                print(f"round {i} {name:<10} {seconds[name][-1] * 1000:.1f} ms/step", flush=True)
    step = {name: statistics.median(values) for name, values in seconds.items()}
    report = {
        "what": "median time from one training batch's start to the next (data loading included), the same ControlNetModule "
                "step in a bare loop and through Lightning's Trainer with the default callbacks and the CSV logger",
        "plain_loop_samples_per_s": round(args.batch / step["plain_loop"], 2),
        "lightning_samples_per_s": round(args.batch / step["lightning"], 2),
        "ratio": round(step["plain_loop"] / step["lightning"], 3),
        "rounds_s_per_step": {name: [round(v, 4) for v in values] for name, values in seconds.items()},
        "settings": {"base": "tiny (pixel, untrained)", "resolution": resolution, "batch": args.batch, "steps": args.steps,
                     "rounds": args.rounds, "warmup_steps_skipped": args.warmup, "torch_threads": torch.get_num_threads(),
                     "callbacks": [name for name in cfg.callbacks if name not in SAMPLING_CALLBACKS], "logger": "csv"},
        **commit(), "machine": machine(), "other_load": load.result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("plain_loop_samples_per_s", "lightning_samples_per_s", "ratio")}, indent=2))


if __name__ == "__main__":
    main()
