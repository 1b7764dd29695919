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
def generate(pipeline: TinyTextToImagePipeline, controlnet, conditions: torch.Tensor, prompts: list[str], batch_size: int,
             seed: int, num_inference_steps: int, guidance_scale: float, desc: str) -> np.ndarray:
    """uint8 images, one per (condition, prompt); batch b always gets the same noise."""
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        generated = pipeline(
            prompts[start : start + batch_size],
            condition=conditions[start : start + batch_size].to(pipeline.unet.device) if controlnet is not None else None,
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
    items = [dataset[i] for i in range(min(count, len(dataset)))]  # read once, used by both generations
    condition_tensor = torch.stack([item["condition"] for item in items])
    conditions = to_uint8(condition_tensor, 0.0, 1.0)
    prompts = [item["true_prompt"] for item in items]
    settings = dict(batch_size=batch_size, seed=seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    base_images = generate(pipeline, None, condition_tensor, prompts, desc="evaluating base alone", **settings)
    control_images = generate(pipeline, controlnet, condition_tensor, prompts, desc="evaluating base + ControlNet", **settings)
    base = score_images(base_images, conditions, prompts, palette)
    control = score_images(control_images, conditions, prompts, palette)
    return {
        "mask_iou": control["mask_iou"],
        "color_accuracy": control["color_accuracy"],
        "base_mask_iou": base["mask_iou"],
        "base_color_accuracy": base["color_accuracy"],
        "random_placement_mask_iou": random_placement_iou(conditions),
        "eval_images": len(items),
        "palette_size": len(palette),
        "samples": {"conditions": conditions, "base": base_images, "controlnet": control_images},
    }
