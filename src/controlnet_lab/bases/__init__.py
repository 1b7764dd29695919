"""The locked bases: pixel space (``tiny``), latent Stable Diffusion-family (``tiny_sd``, SD 1.x/2.x), SDXL and SD3.

Both kinds give the harness one interface (what module.py, evaluation/ and
generation.py use): ``encode_prompt``, ``image_encoding`` / ``latents`` (targets to the
denoiser's input), ``predict_noise`` with ControlNet residuals, ``denoiser`` (a UNet, SD3: a transformer), ``__call__`` to
generate images in [-1, 1], ``noise_scheduler`` (training) and ``scheduler``
(sampling), ``resolution``, ``vae_scale_factor``, ``locked_modules`` and ``save_pretrained``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from controlnet_lab.bases.fingerprint import base_fingerprint, check_same_base
from controlnet_lab.bases.latent import LatentBase
from controlnet_lab.bases.latent_sd3 import SD3Base
from controlnet_lab.bases.latent_xl import SDXLBase
from controlnet_lab.bases.pixel import TinyTextToImagePipeline
from controlnet_lab.bases.tiny import build_pixel_base
from controlnet_lab.bases.tiny_sd import build_tiny_sd

PIXEL_PIPELINES = {TinyTextToImagePipeline.__name__: TinyTextToImagePipeline}
LATENT_BASES = {"StableDiffusionXLPipeline": SDXLBase, "StableDiffusion3Pipeline": SD3Base}  # by the saved pipeline's class; any other: an SD-family LatentBase

__all__ = ["LatentBase", "SD3Base", "SDXLBase", "TinyTextToImagePipeline", "base_fingerprint", "build_pixel_base", "build_tiny_sd", "check_same_base", "load_base"]


def load_base(folder: str | Path, dtype: torch.dtype | None = None):
    """The base saved in ``folder``: the pipeline class its model_index.json names decides the kind."""
    name = DiffusionPipeline.load_config(str(folder))["_class_name"]
    if name in PIXEL_PIPELINES:
        return PIXEL_PIPELINES[name].from_pretrained(str(folder), dtype=dtype)
    return LATENT_BASES.get(name, LatentBase).from_pretrained(folder, dtype)
