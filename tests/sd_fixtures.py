"""A tiny random SD-shaped pipeline built here and saved with ``save_pretrained`` (the loading code a Hub id such as SD 1.5
takes) and fill50k-format data for it: session fixtures (registered in conftest.py) and helpers of the latent-path tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from controlnet_lab.module import ControlNetModule

SD_HINT_CHANNELS = (16, 32, 96, 256)  # the paper's condition encoder for VAE factor 8 (sd15's null derives it)
# model.base.objective of model=sd3 and tiny_sd3: diffusers' train_controlnet_sd3.py defaults
SD3_OBJECTIVE = dict(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, precondition_outputs=True)


def clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer over single characters (no merges): no download needed."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("-,.'")
    vocab = {token: i for i, token in enumerate(["<|startoftext|>", "<|endoftext|>", *letters, *[c + "</w>" for c in letters]])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=24, pad_token="<|endoftext|>")


def save_sd(root: Path, layers_per_block: int = 1) -> Path:
    """SD 1.5's layout at toy size: VAE factor 8, a 2-level UNet with cross-attention, CLIP text, PNDM (as SD 1.5 ships)."""
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(root / "tokenizer_src")
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=24, pad_token_id=1, bos_token_id=0, eos_token_id=1))
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=32)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=layers_per_block,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(root / "sd")
    return root / "sd"


def save_sdxl(root: Path) -> Path:
    """SDXL's layout at toy size (as diffusers' SDXL tests build it): two CLIP text encoders, the second with a
    projection (the pooled text), a UNet with "text_time" added conditioning on both encoders' hidden states side by
    side and SDXL's two ResNet layers per block (which ControlNet-XS needs), VAE factor 8, Euler (as SDXL ships)."""
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(root / "tokenizer_src")
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=24, pad_token_id=1, bos_token_id=0, eos_token_id=1, projection_dim=16)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=32)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tokenizer,
                                         text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)), tokenizer_2=tokenizer,
                                         unet=unet, scheduler=scheduler, add_watermarker=False)
    pipeline.save_pretrained(root / "sdxl")
    return root / "sdxl"


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory) -> Path:
    return save_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory, sd_data) -> Path:
    """model=tiny_sdxl's base untrained, at 32 px: SDXL's three-level encoder (which full_adapter_xl fits), VAE factor 4."""
    from conftest import compose_train
    from controlnet_lab.bases import build_tiny_sd
    from controlnet_lab.data.fill50k import read_index

    settings = OmegaConf.to_container(compose_train(["model=tiny_sdxl"]).model.base, resolve=True)
    folder = tmp_path_factory.mktemp("tiny_sdxl") / "base"
    build_tiny_sd(settings, 32, [record.prompt for record in read_index(sd_data)]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd3_folder(tmp_path_factory, sd_data) -> Path:
    """model=tiny_sd3's base untrained, at 32 px: SD3's transformer (6 blocks) on VAE-factor-4 latents, no T5."""
    from conftest import compose_train
    from controlnet_lab.bases import build_tiny_sd
    from controlnet_lab.data.fill50k import read_index

    settings = OmegaConf.to_container(compose_train(["model=tiny_sd3"]).model.base, resolve=True)
    folder = tmp_path_factory.mktemp("tiny_sd3") / "base"
    torch.manual_seed(0)
    build_tiny_sd(settings, 32, [record.prompt for record in read_index(sd_data)]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory) -> Path:
    return save_sd(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="session")
def sd_folder_two_layers(tmp_path_factory) -> Path:
    """The same with SD's two ResNet layers per UNet block: what diffusers' ControlNet-XS needs."""
    return save_sd(tmp_path_factory.mktemp("sd2"), layers_per_block=2)


@pytest.fixture(scope="session")
def sd_data(tmp_path_factory) -> Path:
    from controlnet_lab.data.synthetic import SyntheticFill50kSpec, write_fill50k

    spec = SyntheticFill50kSpec(count=24, resolution=32, palette=("red", "green", "blue", "yellow"), radius_range=(0.2, 0.35),
                                outline_thickness=1, seed=0)
    return write_fill50k(spec, tmp_path_factory.mktemp("sd_data") / "fill")


def sd_module(sd_folder: Path, **kwargs) -> ControlNetModule:
    return ControlNetModule(str(sd_folder), hint_channels=SD_HINT_CHANNELS, num_val_images=0, resolution=32, **kwargs)
