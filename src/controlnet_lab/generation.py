"""The generation task behind src/sample.py: trained ControlNets + condition images + prompts -> PNGs, grids, samples.json.

Every image of a seed starts from the same noise, whatever its condition and prompt
(one generator per image, seeded with the seed), so an image is made again exactly
from its condition, prompt, seed and the sampling settings recorded in samples.json.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path

import diffusers
import numpy as np
import torch
from matplotlib.colors import CSS4_COLORS
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from controlnet_lab.bases import load_base
from controlnet_lab.data.colors import parse_prompt
from controlnet_lab.data.conditions import DETECTORS, condition_maker
from controlnet_lab.data.samples import load_rgb
from controlnet_lab.evaluation.prompts import PROMPT_SETTINGS, setting_prompts
from controlnet_lab.bases import base_fingerprint
from controlnet_lab.export import TrainedControlNet, load_trained
from controlnet_lab.images import save_grid, to_uint8
from controlnet_lab.bases.pixel import TinyTextToImagePipeline
from controlnet_lab.config_checks import check_sampling_config
from controlnet_lab.controlnet_sd3 import is_transformer
from controlnet_lab.sampling import Sampling, residual_heights, resolution_weights

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class ControlInput:
    """One ControlNet's part of a request: where it comes from, its condition images, detector and scale."""

    ckpt: str
    images: list[Path]
    detector: str | None
    scale: float


def as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]


def one_per_net(cfg: DictConfig, key: str, count: int) -> list:
    """The config's ``key`` (dotted) as one value per ControlNet: a list of ``count``, or one value for all."""
    values = as_list(OmegaConf.select(cfg, key)) or [None]
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"{key} has {len(values)} entries for {count} ControlNets (ckpt): give one for all or one per ControlNet")
    return values


def image_files(path: str, key: str) -> list[Path]:
    """An image file, or the image files of a folder sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            return files
        raise FileNotFoundError(f"{key}={path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    raise FileNotFoundError(f"{key}={path}: no such file or folder")


def control_inputs(cfg: DictConfig) -> list[ControlInput]:
    """The request's ControlNets with their conditions, checked before any model is loaded."""
    ckpts = as_list(cfg.ckpt)
    if not ckpts:
        raise ValueError("ckpt: give a checkpoint, run directory or export folder (a list [a,b] composes several)")
    conditions = one_per_net(cfg, "condition", len(ckpts))
    detectors, scales = one_per_net(cfg, "detector", len(ckpts)), one_per_net(cfg, "sampling.conditioning_scale", len(ckpts))
    inputs = []
    for ckpt, condition, detector, scale in zip(ckpts, conditions, detectors, scales, strict=True):
        if condition is None:
            raise ValueError("condition: give an image file or a folder of images for each ControlNet")
        if detector is not None and detector not in DETECTORS:
            raise ValueError(f"detector={detector!r} is not a controlnet-aux detector; choose one of {', '.join(DETECTORS)} or null")
        if detector is not None and DETECTORS[detector][1] and not cfg.detector_weights:
            raise ValueError(f"detector={detector} needs weights: set detector_weights to a local folder holding the lllyasviel/Annotators files")
        inputs.append(ControlInput(str(ckpt), image_files(condition, "condition"), detector, float(scale)))
    counts = {len(i.images) for i in inputs}
    if len(counts) > 1:
        raise ValueError(f"condition: the ControlNets have different numbers of condition images ({sorted(counts)}); they are paired by sorted name")
    return inputs


def check_sampling(cfg: DictConfig) -> None:
    check_sampling_config(cfg.sampling, "sampling")
    if cfg.sampling.num_inference_steps < 1:
        raise ValueError(f"sampling.num_inference_steps={cfg.sampling.num_inference_steps} must be >= 1")
    if cfg.sampling.guidance_scale < 0:
        raise ValueError(f"sampling.guidance_scale={cfg.sampling.guidance_scale} must be >= 0 (1: no classifier-free guidance)")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size={cfg.batch_size} must be >= 1")
    if not as_list(cfg.seeds):
        raise ValueError("seeds: give at least one seed")
    if cfg.scheduler is not None:
        scheduler_class(cfg.scheduler)


def scheduler_class(name: str) -> type:
    scheduler = getattr(diffusers, str(name), None)
    if not (isinstance(scheduler, type) and issubclass(scheduler, diffusers.SchedulerMixin)):
        raise ValueError(f"scheduler={name!r} is not a diffusers scheduler class (e.g. DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler)")
    return scheduler


def prompt_sets(cfg: DictConfig, count: int, palette: list[str]) -> dict[str, list[str]]:
    """The prompts per setting: ``{"given": prompts}``, or the paper's prompt settings with ``prompt`` as the perfect one."""
    prompts = [str(p) for p in as_list(cfg.prompt)] or [""]
    if len(prompts) == 1:
        prompts *= count
    if len(prompts) != count:
        raise ValueError(f"prompt has {len(prompts)} entries for {count} conditions: give one for all or one per condition image")
    if not cfg.prompt_settings:
        return {"given": prompts}
    sets = {setting: setting_prompts(setting, prompts, palette, seed=0) for setting in PROMPT_SETTINGS if setting != "conflicting"}
    conflicting = [str(p) for p in as_list(cfg.conflicting_prompt)]
    if conflicting:
        sets["conflicting"] = conflicting * count if len(conflicting) == 1 else conflicting
        if len(sets["conflicting"]) != count:
            raise ValueError(f"conflicting_prompt has {len(conflicting)} entries for {count} conditions")
    else:
        unparsed = [p for p in prompts if parse_prompt(p) is None]
        if unparsed:
            raise ValueError(f"prompt_settings=true derives the conflicting prompt from a fill50k prompt ('<color> circle with <color> background'); "
                             f"{unparsed[0]!r} is not one: set conflicting_prompt")
        if len(palette) < 4:
            raise ValueError(f"the base's vocabulary names {len(palette)} CSS colors ({palette}); deriving a conflicting prompt needs 4: set conflicting_prompt")
        sets["conflicting"] = setting_prompts("conflicting", prompts, palette, seed=0)
    return {setting: sets[setting] for setting in PROMPT_SETTINGS}


def vocabulary_palette(pipeline: TinyTextToImagePipeline) -> list[str]:
    """The CSS colors the base's tokenizer knows: the colors it was trained on."""
    return sorted(word for word in pipeline.tokenizer.get_vocab() if word in CSS4_COLORS)


def shared_base(nets: list[TrainedControlNet]) -> tuple[Path, str]:
    """The one locked base all ControlNets were trained on, and its fingerprint; composing nets of different bases is an error."""
    fingerprints = [base_fingerprint(net.base) for net in nets]
    if len(set(fingerprints)) > 1:
        listing = "; ".join(f"{net.source} -> {net.base}" for net in nets)
        raise ValueError(f"ckpt: the ControlNets were trained on different locked bases ({listing}); they can only be composed on one base")
    return nets[0].base, fingerprints[0]


def load_conditions(control: ControlInput, resolution: int, cfg: DictConfig) -> torch.Tensor:
    """(N, 3, H, W) conditions in [0, 1]: the images resized to the base's resolution, or the detector's maps of them."""
    make = condition_maker(control.detector, resolution, cfg.detector_weights, tuple(cfg.canny_thresholds)) if control.detector else None
    maps = []
    for path in control.images:
        image = load_rgb(path, resolution)
        maps.append(make(image, image, path.name) if make else image)
    return torch.from_numpy(np.stack(maps).astype(np.float32) / 255.0).permute(0, 3, 1, 2)


def save_images(images: np.ndarray, out: Path, folder: Path, setting: str, seed: int, prompts: list[str],
                controls: list[ControlInput]) -> list[dict]:
    """One PNG per image, named by its condition and seed; their records for samples.json."""
    (out / folder).mkdir(parents=True, exist_ok=True)
    records = []
    for index, image in enumerate(images):
        path = folder / f"{index:03d}_{controls[0].images[index].stem}_seed{seed}.png"
        Image.fromarray(image).save(out / path)
        records.append({"file": str(path), "setting": setting, "prompt": prompts[index], "seed": seed,
                        "conditions": [str(control.images[index]) for control in controls]})
    return records


def sample(cfg: DictConfig) -> dict:
    """Generate every (setting, seed, condition) image of the request; returns samples.json's content."""
    controls = control_inputs(cfg)
    check_sampling(cfg)
    out = Path(cfg.paths.output_dir)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    nets = [load_trained(control.ckpt) for control in controls]
    base, fingerprint = shared_base(nets)
    pipeline = load_base(base).to(device)
    pipeline.set_progress_bar_config(disable=True)
    resolution = pipeline.resolution
    conditions = [load_conditions(control, resolution, cfg) for control in controls]
    count = len(conditions[0])
    sets = prompt_sets(cfg, count, vocabulary_palette(pipeline))
    seeds = [int(s) for s in as_list(cfg.seeds)]
    controlnets = [net.controlnet.to(device) for net in nets]
    sampling = replace(Sampling.from_config(cfg.sampling), conditioning_scale=[control.scale for control in controls])
    generate = functools.partial(pipeline, controlnet=controlnets, **sampling.kwargs())
    scheduler = scheduler_class(cfg.scheduler) if cfg.scheduler is not None else pipeline.sampling_scheduler

    records, grids = [], {}
    progress = tqdm(total=len(sets) * len(seeds) * count, desc="sampling", unit="image")
    for setting, prompts in sets.items():
        rows = []
        for seed in seeds:
            images = []
            for start in range(0, count, cfg.batch_size):
                batch = slice(start, start + cfg.batch_size)
                generated = generate(prompts[batch], condition=[c[batch].to(device) for c in conditions],
                                     scheduler=scheduler.from_config(pipeline.scheduler.config),
                                     generator=[torch.Generator().manual_seed(seed) for _ in prompts[batch]])
                images.append(to_uint8(generated, -1.0, 1.0))
                progress.update(len(prompts[batch]))
            rows.append(np.concatenate(images))
            folder = Path("images") / setting if cfg.prompt_settings else Path("images")
            records += save_images(rows[-1], out, folder, setting, seed, prompts, controls)
        grids[setting] = f"grid_{setting}.png" if cfg.prompt_settings else "grid.png"
        save_grid([to_uint8(c, 0.0, 1.0) for c in conditions] + rows, out / grids[setting], upscale=max(1, 128 // resolution))
    progress.close()

    report = {
        "controlnets": [
            {"source": str(net.source), "class": type(net.controlnet).__name__, "conditioning_scale": control.scale,
             "detector": control.detector, "conditions": [str(p) for p in control.images]}
            for net, control in zip(nets, controls, strict=True)
        ],
        "base": {"path": str(base), "fingerprint": fingerprint},
        "sampling": {
            **sampling.kwargs(),
            **({} if is_transformer(pipeline.denoiser) else {  # a transformer's ControlNet has no residuals by resolution
                "resolution_weights": resolution_weights(sampling.resolution_weighting, residual_heights(pipeline.denoiser.config))}),
            "scheduler": scheduler.__name__,
            "batch_size": cfg.batch_size,
            "device": device,
            "resolution": resolution,
        },
        "seeds": seeds,
        "grids": grids,
        "images": records,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    (out / "samples.json").write_text(json.dumps(report, indent=2))
    return report
