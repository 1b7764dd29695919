"""An SDXL-family base: VAE, a UNet with SDXL's "text_time" added conditioning, two CLIP text encoders.

Loaded from a Hub id or a folder written by ``StableDiffusionXLPipeline.save_pretrained`` (SDXL base 1.0, the
harness's own ``tiny_sdxl``) and generating with diffusers' SDXL pipelines (``StableDiffusionXLPipeline``,
``StableDiffusionXLControlNetPipeline``, ``StableDiffusionXLAdapterPipeline``, ``StableDiffusionXLControlNetXSPipeline``);
everything else is ``LatentBase``'s. As in diffusers' ``train_controlnet_sdxl.py``: the text is both encoders'
penultimate hidden states side by side, the pooled text the second encoder's projection, and the UNet's size
conditioning ``add_time_ids`` = (original size, crop top-left, target size) with the original size the target's and
no crop, which is also what the pipelines pass when generating.
"""
from __future__ import annotations

import torch
from diffusers import (StableDiffusionXLAdapterPipeline, StableDiffusionXLControlNetPipeline, StableDiffusionXLControlNetXSPipeline,
                       StableDiffusionXLPipeline)

from controlnet_lab.bases.latent import LatentBase


class SDXLBase(LatentBase):
    text_to_image = StableDiffusionXLPipeline
    with_controlnet = StableDiffusionXLControlNetPipeline
    with_adapter = StableDiffusionXLAdapterPipeline
    with_xs = StableDiffusionXLControlNetXSPipeline
    load_options = {"add_watermarker": False}  # no invisible watermark: it would change every generated image the metrics score

    def __init__(self, pipeline: StableDiffusionXLPipeline):
        super().__init__(pipeline)
        self.text_encoder_2 = pipeline.text_encoder_2
        self.tokenizer_2 = pipeline.tokenizer_2

    def components(self) -> dict:
        return {"vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2, "tokenizer": self.tokenizer,
                "tokenizer_2": self.tokenizer_2, "unet": self.unet, "scheduler": self.scheduler, "add_watermarker": False,
                "force_zeros_for_empty_prompt": self.pipeline.config.force_zeros_for_empty_prompt}

    def locked_modules(self) -> dict[str, torch.nn.Module]:
        return {**super().locked_modules(), "text_encoder_2": self.text_encoder_2}

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(both encoders' per-token hidden states, concatenated; the second encoder's pooled projection)."""
        hidden, _, pooled, _ = self.pipeline.encode_prompt(list(prompts), device=self.text_encoder_2.device, num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False)
        return hidden, pooled

    def image_encoding(self, images: torch.Tensor) -> torch.Tensor:
        """``LatentBase``'s, in float32 when the VAE is float16 and its config says it overflows there (SDXL's
        ``force_upcast``), as diffusers' pipelines decode."""
        if self.vae.dtype == torch.float16 and self.vae.config.force_upcast:
            self.vae.to(torch.float32)
            try:
                return super().image_encoding(images)
            finally:
                self.vae.to(torch.float16)
        return super().image_encoding(images)

    def unet_inputs(self, sample: torch.Tensor, pooled: torch.Tensor, geometry: torch.Tensor | None) -> dict:
        """SDXL's added conditioning: the pooled text and the size ids (original size, crop top-left, target size) of
        each target, its original size and crop from ``geometry`` (a row per target) or, without, the target's size
        uncropped (what the pipelines pass when generating)."""
        height, width = (side * self.vae_scale_factor for side in sample.shape[-2:])
        target = torch.tensor([height, width], device=sample.device).repeat(len(sample), 1)
        original = torch.cat([target, torch.zeros_like(target)], dim=1) if geometry is None else geometry.to(sample.device)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": torch.cat([original, target], dim=1)}}
