"""What Lightning costs: the same ControlNet training step in a bare PyTorch loop and through the harness's Trainer.

Both train the same module (``ControlNetModule`` on the embedded latent base ``tiny_sd``'s architecture at 32 px, its
VAE latents and text embeddings cached as ``model.base.cache_encodings=true`` does; untrained weights: speed does not
depend on them) on the same data loader, one batch of ``--batch`` per step. The cached latent step is the harness's
fastest (about 3x shorter than the pixel base's), so Lightning's fixed cost per step weighs most there.

- ``plain_loop``: ``for batch in loader``: the module's ``diffusion_loss``, ``backward``, the module's own AdamW and
  learning-rate schedule (``configure_optimizers``), ``zero_grad``, and every ``every_n_train_steps`` of the default
  checkpoint callback a ``torch.save`` of the ControlNet's and the optimizer's state (what a bare loop that can be
  resumed saves). Nothing else.
- ``lightning``: ``Trainer.fit`` with what the default config trains with (conf/callbacks/default.yaml: periodic
  checkpoints, the preemption checkpoint, the resume state, the progress bar, ThroughputMonitor, LearningRateMonitor),
  the default trainer's logging period and the CSV logger, through the module's ``training_step`` (the loss, its
  finiteness check, ``self.log``). The callbacks that evaluate during training (the fidelity curve, validation images,
  the initial output change) are left out: they are evaluation, and cost what they measure.

The time of a step is the **mean** from one batch's start to the next's (data loading included) over a run's steps
after its first ``--warmup``, so that the periodic costs (logging, the progress bar, CSV flushes, the checkpoint at
step 500) count; ``--steps`` (600) spans them. The two run by the method of rounds.py (``--rounds``, 7 make a result;
order rotated; the ratio plain / Lightning taken within each round, median and bootstrap 95% interval).

    python benchmarks/vs_plain_loop.py [--steps 600 --rounds 7 --batch 32]

Writes ``--out`` (experiments/performance/vs_plain_loop.json) with every round's figures, the commit, the machine and
the CPU time other programs took meanwhile.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from controlnet_lab.bases import base_fingerprint, build_tiny_sd, load_base
from controlnet_lab.data.datamodule import Fill50kDataModule
from controlnet_lab.data.synthetic import SyntheticFill50kSpec, write_fill50k
from controlnet_lab.locked_encodings import cached_encodings
from controlnet_lab.module import ControlNetModule
from controlnet_lab.provenance import OtherLoad, commit, machine
from rounds import MIN_ROUNDS, method, run_rounds, seconds_per_step, within_round_ratio

ROOT = Path(__file__).resolve().parents[1]
SAMPLING_CALLBACKS = ("fidelity_curve", "validation_images", "initial_output_change")
SETUPS = ("plain_loop", "lightning")


class BatchStarts(L.Callback):
    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())


def plain_loop(module: ControlNetModule, loader, steps: int, checkpoint_every: int, folder: Path) -> list[float]:
    """Batch start times of a bare loop over the same step, saving its state every ``checkpoint_every`` steps."""
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    module.train()
    starts = []
    batches = iter(loader)
    for step in range(1, steps + 1):
        starts.append(time.perf_counter())
        batch = next(batches)
        module.diffusion_loss(batch).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % checkpoint_every == 0:
            torch.save({"controlnet": module.controlnet.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, folder / "last.pt")
    starts.append(time.perf_counter())
    return starts


def lightning_fit(module: ControlNetModule, loader, steps: int, cfg, folder: Path) -> list[float]:
    """Batch start times of Trainer.fit with the default config's callbacks, logging period and the CSV logger, writing
    into ``folder`` (a fresh one per round: a round must not find the previous round's checkpoints)."""
    timer = BatchStarts()
    cfg.paths.output_dir = str(folder)
    callbacks = [hydra.utils.instantiate(c) for name, c in cfg.callbacks.items() if name not in SAMPLING_CALLBACKS]
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, limit_val_batches=0, logger=CSVLogger(folder),
                        log_every_n_steps=cfg.trainer.log_every_n_steps, callbacks=[*callbacks, timer], enable_model_summary=False,
                        default_root_dir=str(folder))
    trainer.fit(module, train_dataloaders=loader)
    return [*timer.starts, time.perf_counter()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="per run; spans the default checkpoint period (500)")
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=10, help="first steps of a run left out of its mean")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "performance" / "vs_plain_loop.json")
    args = parser.parse_args()
    resolution = 32
    with tempfile.TemporaryDirectory() as folder, OtherLoad() as load:
        tmp = Path(folder)
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=["model=tiny_sd", f"data.resolution={resolution}"])
        spec = SyntheticFill50kSpec(count=max(512, args.batch * (args.steps + 1)), resolution=resolution,
                                    palette=tuple(cfg.data.generator.palette), radius_range=(0.15, 0.35), outline_thickness=1, seed=0)
        data = Fill50kDataModule(root=write_fill50k(spec, tmp / "data"), name="bench", resolution=resolution, batch_size=args.batch,
                                 val_size=16, prompt_dropout=0.5, condition="outline", cache_dir=tmp / "cache")
        data.setup()
        torch.manual_seed(0)
        build_tiny_sd(OmegaConf.to_container(cfg.model.base, resolve=True), resolution, data.prompts()).save_pretrained(tmp / "base")
        checkpoint_every = cfg.callbacks.checkpoint.every_n_train_steps
        # The locked parts' encodings, computed once: both setups train on them
        data.train_encodings = cached_encodings(load_base(tmp / "base", torch.float32), base_fingerprint(tmp / "base"), data.train_dataset(),
                                                tmp / "cache")

        def measure(name: str, i: int) -> dict:
            torch.manual_seed(0)
            module = ControlNetModule(str(tmp / "base"), lr=cfg.model.controlnet.lr, noise_offset=cfg.model.base.noise_offset,
                                      num_val_images=0, resolution=resolution, max_steps=args.steps, sample_dir=str(tmp / "samples"))
            run = tmp / f"{name}-{i}"
            run.mkdir()
            loader = data.train_dataloader()
            starts = (plain_loop(module, loader, args.steps, checkpoint_every, run) if name == "plain_loop"
                      else lightning_fit(module, loader, args.steps, cfg, run))
            step = seconds_per_step(starts, args.warmup)
            print(f"round {i} {name:<10} {step * 1000:.1f} ms/step", flush=True)
            return {"s_per_step": round(step, 5)}

        measured = run_rounds(SETUPS, args.rounds, measure)
    ratio = within_round_ratio(measured, "lightning", "plain_loop", "s_per_step")  # plain's time over Lightning's: its speed relative
    report = {
        "what": "mean time from one training batch's start to the next (data loading and periodic costs included), the same ControlNetModule "
                "step (tiny_sd, encodings cached) in a bare loop that checkpoints as often and through Lightning's Trainer with the default "
                "callbacks, logging period and the CSV logger; ratio: Lightning's speed over the bare loop's, within each round",
        "ratio": ratio["median"],
        "ratio_ci95": ratio["ci95"],
        "ratio_per_round": ratio["per_round"],
        "method": method(args.rounds),
        "rounds": measured,
        "settings": {"base": "tiny_sd architecture (untrained), VAE latents and text embeddings cached", "resolution": resolution,
                     "batch": args.batch, "steps": args.steps, "warmup_steps_skipped": args.warmup, "torch_threads": torch.get_num_threads(),
                     "checkpoint_every_n_steps": checkpoint_every, "log_every_n_steps": cfg.trainer.log_every_n_steps,
                     "callbacks": [name for name in cfg.callbacks if name not in SAMPLING_CALLBACKS], "logger": "csv"},
        **commit(), "machine": machine(), "other_load": load.result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("ratio", "ratio_ci95", "ratio_per_round")}, indent=2))


if __name__ == "__main__":
    main()
