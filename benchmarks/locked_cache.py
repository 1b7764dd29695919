"""Training speed with the locked parts' outputs cached (``model.base.cache_encodings=true``) vs computed every step.

Same base, same data, same batch, in one process, through Lightning's Trainer as
src/train.py trains: the cached run reads the VAE posterior and the text embeddings
from the cache (locked_encodings.py), the other encodes every batch's targets with the
VAE and its prompts with the text encoder, as diffusers' ControlNet script does. The two
run by the method of rounds.py (``--rounds``, 7 make a result; order rotated; the speed-up
computed / cached taken within each round, median and bootstrap 95% interval); s/step is
the mean over a run's steps after its first ``--warmup``. Weights are untrained: speed
does not depend on them. Two bases:

- ``tiny_sd``: the embedded latent default (conf/model/tiny_sd.yaml), 32 px, batch 32;
- ``sd_shaped_128``: the shape of DESIGN.md's profile of diffusers' script (VAE factor 8,
  UNet 32/64/64, 128 px, batch 16).

    python benchmarks/locked_cache.py [--steps 60 --rounds 7]

Writes ``--out`` (experiments/performance/locked_cache.json) with the commit, the machine
and the CPU time other programs took meanwhile.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from controlnet_lab.bases import base_fingerprint, build_tiny_sd
from controlnet_lab.data.datamodule import Fill50kDataModule
from controlnet_lab.data.synthetic import SyntheticFill50kSpec, write_fill50k
from controlnet_lab.locked_encodings import cached_encodings
from controlnet_lab.module import ControlNetModule
from controlnet_lab.provenance import OtherLoad, commit, machine
from rounds import MIN_ROUNDS, method, run_rounds, seconds_per_step, within_round_ratio

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "tiny_sd": {"resolution": 32, "batch": 32, "overrides": []},
    "sd_shaped_128": {"resolution": 128, "batch": 16, "overrides": [
        "model.base.vae.block_out_channels=[32,64,64,64]", "model.base.unet.block_out_channels=[32,64,64]",
        "model.controlnet.hint_channels=[16,32,96,256]"]},
}


class StepTimes(L.Callback):
    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())


def train_steps(module: ControlNetModule, data: Fill50kDataModule, steps: int, warmup: int, folder: Path) -> float:
    timer = StepTimes()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer], default_root_dir=str(folder))
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    return seconds_per_step([*timer.starts, time.perf_counter()], warmup)


def run_case(name: str, case: dict, steps: int, warmup: int, rounds: int, tmp: Path) -> dict:
    resolution, batch = case["resolution"], case["batch"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=tiny_sd", f"data.resolution={resolution}", *case["overrides"]])
    spec = SyntheticFill50kSpec(count=max(256, 4 * batch * (steps + 1)), resolution=resolution, palette=tuple(cfg.data.generator.palette),
                                radius_range=(0.15, 0.35), outline_thickness=max(1, resolution // 32), seed=0)
    root = write_fill50k(spec, tmp / name / "data")
    data = Fill50kDataModule(root=root, name=name, resolution=resolution, batch_size=batch, val_size=16, prompt_dropout=0.5,
                             condition="outline", cache_dir=tmp / name / "cache")
    data.setup()
    torch.manual_seed(0)
    base = build_tiny_sd(OmegaConf.to_container(cfg.model.base, resolve=True), resolution, data.prompts())
    base.save_pretrained(tmp / name / "base")
    hint_channels = cfg.model.controlnet.hint_channels  # null: the paper's encoder for the VAE factor
    module = ControlNetModule(str(tmp / name / "base"), hint_channels=tuple(hint_channels) if hint_channels else None, lr=1e-4,
                              num_val_images=0, resolution=resolution)
    started = time.perf_counter()
    encodings = cached_encodings(module.base, base_fingerprint(tmp / name / "base"), data.train_dataset(), tmp / name / "cache")
    encode_seconds = time.perf_counter() - started

    def measure(mode: str, i: int) -> dict:
        data.train_encodings = encodings if mode == "cached" else None
        return {"s_per_step": round(train_steps(module, data, steps, warmup, tmp / name), 5)}

    measured = run_rounds(("cached", "computed"), rounds, measure)
    speedup = within_round_ratio(measured, "computed", "cached", "s_per_step")
    cached, computed = (statistics.median(r[mode]["s_per_step"] for r in measured) for mode in ("cached", "computed"))
    row = {"resolution": resolution, "batch": batch, "latent_size": resolution // base.vae_scale_factor,
           "train_samples": len(data.train_rows), "one_time_encoding_s": round(encode_seconds, 2),
           "s_per_step_median": {"cached": round(cached, 4), "computed": round(computed, 4)},
           "speedup_cached_over_computed": speedup["median"], "speedup_ci95": speedup["ci95"], "speedup_per_round": speedup["per_round"],
           "rounds": measured}
    print(f"{name:<16} {resolution:>4} px batch {batch:>3}: cached {cached:.3f} s/step, computed {computed:.3f} s/step, "
          f"speed-up {speedup['median']:.2f}x {speedup['ci95']} (one-time encoding of {len(data.train_rows)} samples {encode_seconds:.1f} s)")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps of a run left out of its mean")
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "performance" / "locked_cache.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, OtherLoad() as load:
        rows = {name: run_case(name, CASES[name], args.steps, args.warmup, args.rounds, Path(tmp)) for name in args.cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**commit(), "machine": machine(), "other_load": load.result, "threads": torch.get_num_threads(),
                                    "settings": {"steps": args.steps, "warmup_steps_skipped": args.warmup},
                                    "method": method(args.rounds), "cases": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
