"""The embedded latent base ``tiny_sd``: Stable Diffusion's architecture at toy size, pretrained here.

Built from diffusers/transformers configs: an ``AutoencoderKL`` (downsampling factor
2^(levels-1)), a ``UNet2DConditionModel`` on its latents with cross-attention and no
class embedding, a ``CLIPTextModel`` with the offline word tokenizer, a DDPM schedule.
Pretrained in two stages as latent diffusion is: the autoencoder first (L1
reconstruction summed per image + a small KL term, the LDM recipe without the
perceptual and adversarial terms), its ``scaling_factor`` set to 1 / std of the
training latents (as SD's 0.18215 was), then the UNet and text encoder on latents of
the frozen autoencoder (pretraining.py). Saved with ``StableDiffusionPipeline.save_pretrained``,
so it loads exactly as SD 1.5 does. ``tiny_sdxl`` is SDXL's architecture the same way (a second text encoder with a
projection, the UNet's "text_time" added conditioning), saved with ``StableDiffusionXLPipeline.save_pretrained``;
``tiny_sd3`` SD3's (an ``SD3Transformer2DModel`` in place of the UNet, two CLIP encoders with projections and no T5,
flow matching, a VAE with a ``shift_factor``: the latents' mean, as SD3's), saved with
``StableDiffusion3Pipeline.save_pretrained``.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from diffusers import (AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from torch.utils.data import DataLoader
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from controlnet_lab.bases.latent import LatentBase
from controlnet_lab.bases.latent_sd3 import SD3Base
from controlnet_lab.bases.latent_xl import SDXLBase
from controlnet_lab.bases.pretraining import SAVED_SHARD_SIZE, DenoiserPretraining, build_once, cache_key, PretrainingData, pretraining_trainer
from controlnet_lab.bases.tiny import text_encoder_and_tokenizer
from controlnet_lab.data.datamodule import ControlDataModule
from controlnet_lab.data.encoded import LockedEncodings
from controlnet_lab.locked_encodings import image_encodings


# What SD and SDXL ship in their scheduler configs. DDPMScheduler's own defaults (clip_sample=True, right for a pixel
# base) would make the sampler clip the clean-latent estimate to [-1, 1]; StableDiffusionPipeline corrects that when
# it is built, the SDXL pipeline does not. The weights do not depend on these keys, so they are not in the recipe key.
LATENT_SCHEDULER = {"clip_sample": False, "steps_offset": 1}


def vae_scale_factor(vae_settings: dict) -> int:
    return 2 ** (len(vae_settings["block_out_channels"]) - 1)


def build_tiny_sd(settings: dict, resolution: int, prompts: list[str]) -> LatentBase:
    """An untrained tiny SD-shaped base from the ``model.base`` settings, its tokenizer built from ``prompts``; SDXL-shaped
    (``SDXLBase``) when the settings give a second text encoder (``text_encoder_2``, with a ``projection_dim``), SD3-shaped
    (``SD3Base``) when they give a ``transformer``."""
    text_encoder, tokenizer = text_encoder_and_tokenizer(dict(settings["text_encoder"]), prompts)
    vae_settings = dict(settings["vae"])
    levels = len(vae_settings["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, sample_size=resolution, down_block_types=["DownEncoderBlock2D"] * levels,
                        up_block_types=["UpDecoderBlock2D"] * levels, **vae_settings)
    if settings.get("transformer"):
        return build_tiny_sd3(settings, resolution, vae, text_encoder, tokenizer)
    unet_settings = dict(settings["unet"], sample_size=resolution // vae_scale_factor(vae_settings), in_channels=vae.config.latent_channels,
                         out_channels=vae.config.latent_channels)
    scheduler = DDPMScheduler(**{**LATENT_SCHEDULER, **settings["scheduler"]})
    if not settings.get("text_encoder_2"):
        unet = UNet2DConditionModel(cross_attention_dim=text_encoder.config.hidden_size, **unet_settings)
        return LatentBase(StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False))
    # SDXL: the UNet attends to both encoders' hidden states side by side and adds the second's pooled projection to
    # the six size ids' embeddings ("text_time").
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_encoder.config.to_dict(), **settings["text_encoder_2"]}))
    unet = UNet2DConditionModel(cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
                                addition_embed_type="text_time", projection_class_embeddings_input_dim=(
                                    6 * unet_settings["addition_time_embed_dim"] + text_encoder_2.config.projection_dim), **unet_settings)
    # force_zeros_for_empty_prompt off: CFG's unconditional branch is the encoded "" the prompt dropout trained on.
    return SDXLBase(StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                              tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=False,
                                              add_watermarker=False))


def build_tiny_sd3(settings: dict, resolution: int, vae: AutoencoderKL, text_encoder, tokenizer) -> SD3Base:
    """SD3's layout: the transformer attends jointly to its latent patches and the text (both CLIP encoders' hidden
    states side by side, ``joint_attention_dim`` wide) and adds both encoders' pooled projections to its timestep
    embedding; no T5 (its part of the text is zeros, as diffusers gives a pipeline without it)."""
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**{**text_encoder.config.to_dict(), **overrides}))
                for overrides in ({}, settings["text_encoder_2"])]
    transformer_settings = dict(settings["transformer"])
    side = resolution // vae_scale_factor(dict(settings["vae"]))
    transformer = SD3Transformer2DModel(sample_size=side, in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
                                        pos_embed_max_size=side // transformer_settings["patch_size"],
                                        joint_attention_dim=sum(encoder.config.hidden_size for encoder in encoders),
                                        pooled_projection_dim=sum(encoder.config.projection_dim for encoder in encoders), **transformer_settings)
    return SD3Base(StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**settings["scheduler"]),
                                            vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
                                            tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None))


class AutoencoderPretraining(L.LightningModule):
    def __init__(self, vae: AutoencoderKL, lr: float, kl_weight: float):
        super().__init__()
        self.vae = vae
        self.lr = lr
        self.kl_weight = kl_weight

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["target"]
        posterior = self.vae.encode(images).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        l1 = (reconstruction - images).abs().sum(dim=(1, 2, 3)).mean()
        kl = posterior.kl().mean()
        self.log("vae/l1_per_pixel", l1.detach() / images[0].numel(), prog_bar=True)
        return l1 + self.kl_weight * kl

    def configure_optimizers(self):
        return torch.optim.AdamW(self.vae.parameters(), lr=self.lr, fused=True)


@torch.no_grad()
def reconstruction_mae(vae: AutoencoderKL, loader: DataLoader) -> float:
    """Mean absolute error of the posterior mean's reconstruction, in 0-255 RGB units."""
    errors = [(vae.decode(vae.encode(b["target"]).latent_dist.mode()).sample.clamp(-1, 1) - b["target"]).abs().mean() for b in loader]
    return float(torch.stack(errors).mean() * 127.5)


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, loader: DataLoader, batches: int = 16) -> dict:
    """``scaling_factor`` 1 / std of the autoencoder's latents over training images, so the diffusion model sees
    unit-variance inputs; and, for a VAE that shifts its latents (SD3's), ``shift_factor`` their mean."""
    latents = torch.cat([vae.encode(b["target"]).latent_dist.sample() for _, b in zip(range(batches), loader)])
    statistics = {"scaling_factor": float(1.0 / latents.std())}
    if vae.config.shift_factor is not None:
        statistics["shift_factor"] = float(latents.mean())
    return statistics


def pretrained_tiny_sd(settings: dict, run_data: ControlDataModule, resolution: int, cache_dir: Path, trainer_kwargs: dict | None = None) -> Path:
    """The folder of the pretrained tiny SD base for these settings, pretraining it first if the cache lacks it."""
    def build(staging: Path) -> dict:
        pretrain = settings["pretrain"]
        L.seed_everything(pretrain["seed"], workers=True)
        data = PretrainingData(run_data, pretrain["batch_size"], pretrain["empty_prompt_rate"])
        base = build_tiny_sd(settings, resolution, data.prompts())

        vae = pretrain["vae"]
        autoencoder = AutoencoderPretraining(base.vae, lr=vae["lr"], kl_weight=vae["kl_weight"])
        pretraining_trainer(vae["max_steps"], Path(cache_dir) / "base", trainer_kwargs).fit(autoencoder, datamodule=data)
        base.vae.eval().requires_grad_(False)
        base.vae.register_to_config(**latent_statistics(base.vae, data.train_dataloader()))
        mae = reconstruction_mae(base.vae, data.val_dataloader())

        store = image_encodings(base, data.train_dataset(), cache_dir, settings["encode_batch_size"], settings["cache_dtype"])
        data.train_encodings = LockedEncodings(images=store.column("images"))
        denoiser = DenoiserPretraining(base, lr=pretrain["lr"], snr_gamma=pretrain["snr_gamma"], warmup_steps=pretrain["warmup_steps"],
                                       noise_offset=settings["noise_offset"], objective=settings.get("objective"))
        trainer = pretraining_trainer(pretrain["max_steps"], Path(cache_dir) / "base", trainer_kwargs)
        trainer.fit(denoiser, datamodule=data)
        base.save_pretrained(staging, max_shard_size=SAVED_SHARD_SIZE)
        return {"steps": {"vae": vae["max_steps"], "unet": trainer.global_step}, "data_root": run_data.origin,
                "resolution": resolution, "vae_reconstruction_mae_255": round(mae, 2),
                "vae_scaling_factor": base.vae.config.scaling_factor, "vae_shift_factor": base.vae.config.shift_factor, "model": settings}

    return build_once(Path(cache_dir) / "base" / f"base-{cache_key(settings, run_data.fingerprint(), resolution)}", build,
                      use_shipped=settings.get("shipped", False))
