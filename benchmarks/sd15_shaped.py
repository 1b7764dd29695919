"""Stable Diffusion 1.5's architecture with random weights, for the benchmarks: nothing to download, and speed and memory
do not depend on the weights.

The shapes are those of stable-diffusion-v1-5's configs: the UNet is ``UNet2DConditionModel``'s defaults (320/640/1280/1280,
two layers a block, 8 heads) with 768-wide cross-attention (860 M parameters); the VAE has four levels of 128/256/512/512
channels (factor 8, 84 M); the text encoder is CLIP ViT-L/14's (12 layers, 768 wide, 77 tokens): 85 M parameters with
the word tokenizer over the benchmark's prompts standing in for CLIP's, 123 M with CLIP's 49,408-token table, the only
difference; the scheduler is SD's scaled-linear DDPM schedule.
"""
from __future__ import annotations

from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from controlnet_lab.bases.tiny import text_encoder_and_tokenizer

TEXT_ENCODER = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "max_position_embeddings": 77, "projection_dim": 768}
VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32,
       "scaling_factor": 0.18215}
VAE_FACTOR = 8
HINT_CHANNELS = (16, 32, 96, 256)  # conf/model/sd15.yaml: 512 px conditions -> 64 latent px


def sd15_unet(latent: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(sample_size=latent, cross_attention_dim=TEXT_ENCODER["hidden_size"])


def sd15_pipeline(resolution: int, prompts: list[str]) -> StableDiffusionPipeline:
    """The whole SD 1.5-shaped base at ``resolution`` px, its tokenizer built from ``prompts``."""
    text_encoder, tokenizer = text_encoder_and_tokenizer(TEXT_ENCODER, prompts)
    levels = len(VAE["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, sample_size=resolution, down_block_types=["DownEncoderBlock2D"] * levels,
                        up_block_types=["UpDecoderBlock2D"] * levels, **VAE)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="epsilon", steps_offset=1, clip_sample=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=sd15_unet(resolution // VAE_FACTOR),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
