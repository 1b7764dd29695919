"""Sampling speed of ``src/sample.py`` against diffusers' ``StableDiffusionControlNetPipeline`` on the same exported ControlNet.

The ControlNet is a ``model=tiny_sd`` one (untrained base saved with ``save_pretrained``, one training step, then
``src/export.py``'s ``export``: what a user samples from). Both sides generate the same ``--images`` images from the
same conditions, prompts and seeds, with DDIM at ``--steps`` steps, guidance ``--guidance``, batch ``--batch``, and
write each image as a PNG. Timed from the export folder on disk to the last PNG written (model loading included, Python
imports not):

- ``harness``: ``controlnet_lab.generation.sample`` (what ``src/sample.py`` runs), which also writes its grid and
  samples.json;
- ``diffusers_pipeline``: ``StableDiffusionControlNetPipeline.from_pretrained(<export>/base, controlnet=
  ControlNetModel.from_pretrained(<export>/controlnet))`` with ``DDIMScheduler``, images saved with PIL.

The two alternate for ``--rounds`` rounds after one warm-up of each; the images of both are compared (they must agree).

    python benchmarks/vs_pipeline_sampling.py [--images 128 --batch 16 --steps 20 --rounds 3]

Writes ``--out`` (experiments/performance/vs_pipeline_sampling.json) with the commit, the machine and the CPU time
other programs took meanwhile.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
from hydra import compose, initialize_config_dir
from PIL import Image
from torch.utils.data import DataLoader

from controlnet_lab.data.datamodule import Fill50kDataModule
from controlnet_lab.data.fill50k import read_index
from controlnet_lab.data.samples import load_rgb
from controlnet_lab.data.synthetic import SyntheticFill50kSpec, write_fill50k
from controlnet_lab.export import export
from controlnet_lab.generation import sample
from controlnet_lab.module import ControlNetModule
from controlnet_lab.provenance import OtherLoad, commit, machine
from vs_diffusers import build_models

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("CONTROLNET_LAB_ROOT", str(ROOT))  # conf/paths: root_dir, as src/sample.py sets it


def exported_controlnet(tmp: Path, data: Path, resolution: int) -> Path:
    """A tiny_sd ControlNet trained one step and exported as src/export.py does."""
    prompts = [record.prompt for record in read_index(data)]
    base, _, hint_channels = build_models(tmp, resolution, prompts)
    module = Fill50kDataModule(root=data, name="bench", resolution=resolution, batch_size=8, val_size=8, condition="outline", cache_dir=tmp / "cache")
    module.setup()
    L.seed_everything(0)
    net = ControlNetModule(str(base), hint_channels=tuple(hint_channels), num_val_images=0, resolution=resolution)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp))
    trainer.fit(net, train_dataloaders=DataLoader(module.train_dataset(), batch_size=8))
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    trainer.save_checkpoint(ckpt)
    export(ckpt, tmp / "export")
    return tmp / "export"


def harness(export_dir: Path, conditions: Path, prompts: list[str], args, out: Path) -> list[np.ndarray]:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="sample", overrides=[
            f"ckpt={export_dir}", f"condition={conditions}", f"sampling.num_inference_steps={args.steps}", f"sampling.guidance_scale={args.guidance}",
            f"batch_size={args.batch}", "seeds=[0]", "device=cpu", f"paths.output_dir={out}"])
    cfg.prompt = prompts
    report = sample(cfg)
    return [np.asarray(Image.open(out / record["file"])) for record in report["images"]]


def diffusers_pipeline(export_dir: Path, conditions: Path, prompts: list[str], args, out: Path) -> list[np.ndarray]:
    controlnet = ControlNetModel.from_pretrained(export_dir / "controlnet")
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(str(export_dir / "base"), controlnet=controlnet, safety_checker=None,
                                                                  requires_safety_checker=False)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    files = sorted(conditions.iterdir())
    resolution = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    out.mkdir(parents=True)
    images = []
    for start in range(0, len(files), args.batch):
        batch = files[start:start + args.batch]
        condition = torch.from_numpy(np.stack([load_rgb(path, resolution) for path in batch]).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        generated = pipeline(prompts[start:start + args.batch], image=condition, num_inference_steps=args.steps, guidance_scale=args.guidance,
                             generator=[torch.Generator().manual_seed(0) for _ in batch], height=resolution, width=resolution).images
        for path, image in zip(batch, generated, strict=True):
            image.save(out / f"{path.stem}.png")
            images.append(np.asarray(image))
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "performance" / "vs_pipeline_sampling.json")
    args = parser.parse_args()
    setups = {"harness": harness, "diffusers_pipeline": diffusers_pipeline}
    with tempfile.TemporaryDirectory() as folder, OtherLoad() as load:
        tmp = Path(folder)
        spec = SyntheticFill50kSpec(count=max(64, args.images), resolution=args.resolution, palette=("red", "green", "blue", "yellow"),
                                    radius_range=(0.15, 0.35), outline_thickness=1, seed=0)
        data = write_fill50k(spec, tmp / "data")
        export_dir = exported_controlnet(tmp, data, args.resolution)
        records = read_index(data)[:args.images]
        conditions = tmp / "conditions"
        conditions.mkdir()
        for i, record in enumerate(records):
            (conditions / f"{i:04d}.png").write_bytes(Path(record.source).read_bytes())
        prompts = [record.prompt for record in records]
        seconds, images = {name: [] for name in setups}, {}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for name, run in setups.items():
                started = time.perf_counter()
                images[name] = run(export_dir, conditions, prompts, args, tmp / "out" / f"{name}-{round_}")
                if round_:
                    seconds[name].append(time.perf_counter() - started)
                    print(f"round {round_} {name:<18} {args.images / seconds[name][-1]:7.2f} images/s", flush=True)
    difference = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(images["harness"], images["diffusers_pipeline"], strict=True))
    rate = {name: args.images / statistics.median(values) for name, values in seconds.items()}
    report = {
        "what": "images/s from the export folder to the last PNG written (model loading included, imports not): src/sample.py's "
                "sample() against StableDiffusionControlNetPipeline on the same exported tiny_sd ControlNet",
        "harness_images_per_s": round(rate["harness"], 2), "diffusers_images_per_s": round(rate["diffusers_pipeline"], 2),
        "ratio": round(rate["harness"] / rate["diffusers_pipeline"], 3),
        "rounds_s": {name: [round(v, 2) for v in values] for name, values in seconds.items()},
        "max_pixel_difference": difference,
        "settings": {**vars(args), "out": str(args.out), "scheduler": "DDIMScheduler", "base": "tiny_sd (untrained)",
                     "torch_threads": torch.get_num_threads()},
        **commit(), "machine": machine(), "other_load": load.result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("harness_images_per_s", "diffusers_images_per_s", "ratio", "max_pixel_difference")}, indent=2))


if __name__ == "__main__":
    main()
