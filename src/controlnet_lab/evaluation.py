"""Oracle evaluation on held-out conditions: the locked base alone vs base + ControlNet, same prompts, same noise."""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from controlnet_lab.data.colors import parse_prompt
from controlnet_lab.data.fill50k import Fill50kDataset
from controlnet_lab.images import to_uint8
from controlnet_lab.metrics.oracle import random_placement_iou, score_images
from controlnet_lab.pipeline import TinyTextToImagePipeline


def palette_of(prompts: list[str]) -> list[str]:
    """The colors a dataset's prompts name: the candidates for nearest-color matching."""
    names = set()
    for prompt in prompts:
        named = parse_prompt(prompt)
        if named:
            names.update(named)
    return sorted(names)


@torch.no_grad()
def generate(pipeline: TinyTextToImagePipeline, controlnet, dataset: Fill50kDataset, count: int, batch_size: int,
             seed: int, num_inference_steps: int, guidance_scale: float, desc: str) -> np.ndarray:
    """uint8 images for the first ``count`` samples of ``dataset``; batch b always gets the same noise."""
    images = []
    for start in tqdm(range(0, count, batch_size), desc=desc, unit="batch"):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        condition = torch.stack([item["condition"] for item in items]).to(pipeline.unet.device)
        generated = pipeline(
            [item["prompt"] for item in items],
            condition=condition if controlnet is not None else None,
            controlnet=controlnet,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed + start),
        )
        images.append(to_uint8(generated, -1.0, 1.0))
    return np.concatenate(images)


def evaluate_oracle(pipeline: TinyTextToImagePipeline, controlnet, dataset: Fill50kDataset, palette: list[str],
                    count: int, batch_size: int, seed: int, num_inference_steps: int, guidance_scale: float) -> dict:
    """Oracle scores of base alone and of base + ControlNet, plus the random-placement reference IoU."""
    count = min(count, len(dataset))
    conditions = np.stack([to_uint8(dataset[i]["condition"][None], 0.0, 1.0)[0] for i in range(count)])
    prompts = [dataset.records[i].prompt for i in range(count)]
    settings = dict(count=count, batch_size=batch_size, seed=seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    base_images = generate(pipeline, None, dataset, desc="evaluating base alone", **settings)
    control_images = generate(pipeline, controlnet, dataset, desc="evaluating base + ControlNet", **settings)
    base = score_images(base_images, conditions, prompts, palette)
    control = score_images(control_images, conditions, prompts, palette)
    return {
        "mask_iou": control["mask_iou"],
        "color_accuracy": control["color_accuracy"],
        "base_mask_iou": base["mask_iou"],
        "base_color_accuracy": base["color_accuracy"],
        "random_placement_mask_iou": random_placement_iou(conditions),
        "eval_images": count,
        "palette_size": len(palette),
        "samples": {"conditions": conditions, "base": base_images, "controlnet": control_images},
    }
