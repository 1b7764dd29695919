"""CLIP score with torchmetrics' ``CLIPScore`` (100 x max(cosine, 0), averaged), CLIP from a Hub id or a local folder.

torchmetrics accepts only a few Hub ids by name, but any loader callable; this passes
one that loads ``CLIPModel`` and ``CLIPProcessor`` with ``from_pretrained`` from the
configured id or folder (e.g. ``openai/clip-vit-base-patch16``, as ControlNet++ uses).
"""
from __future__ import annotations

import numpy as np
import torch
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor


class _TensorFeaturesCLIP(CLIPModel):
    """transformers 5 returns the projected features as ``pooler_output`` of an output object;
    torchmetrics 1.9's CLIPScore expects the tensor itself."""

    def get_image_features(self, *args, **kwargs):
        return _projected(super().get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _projected(super().get_text_features(*args, **kwargs))


def _projected(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_scorer(model_name_or_path: str, device: str = "cpu") -> CLIPScore:
    def load():
        try:
            return _TensorFeaturesCLIP.from_pretrained(model_name_or_path), CLIPProcessor.from_pretrained(model_name_or_path)
        except OSError as err:
            raise FileNotFoundError(
                f"eval.clip.model={model_name_or_path}: CLIP score needs a CLIP model and processor there ({err}). Give a "
                "local folder written with CLIPModel/CLIPProcessor.save_pretrained, or a Hub id where the network "
                "allows, or set eval.clip.enabled=false."
            ) from None

    return CLIPScore(model_name_or_path=load).to(device)


@torch.no_grad()
def clip_score(scorer: CLIPScore, images: np.ndarray, prompts: list[str], batch_size: int = 64) -> float:
    """Mean CLIP score of (N, H, W, 3) uint8 images against their prompts."""
    scorer.reset()
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).to(scorer.device)
        scorer.update(batch, prompts[start : start + batch_size])
    return float(scorer.compute())
