"""The locked base of the embedded default: a tiny pixel-space text-to-image model, pretrained here (pretraining.py)."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from controlnet_lab.bases.pixel import TinyTextToImagePipeline
from controlnet_lab.bases.pretraining import SAVED_SHARD_SIZE, DenoiserPretraining, build_once, cache_key, PretrainingData, pretraining_trainer
from controlnet_lab.data.datamodule import ControlDataModule
from controlnet_lab.tokenizer import build_word_tokenizer


def text_encoder_and_tokenizer(text_settings: dict, prompts: list[str]):
    """An untrained CLIP text encoder with a word tokenizer over ``prompts`` (no download)."""
    tokenizer = build_word_tokenizer(prompts, max_length=text_settings["max_position_embeddings"])
    config = CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, **text_settings)
    return CLIPTextModel(config), tokenizer


def build_pixel_base(settings: dict, resolution: int, prompts: list[str]) -> TinyTextToImagePipeline:
    """An untrained pixel base from the ``model.base`` settings, its tokenizer built from ``prompts``."""
    text_encoder, tokenizer = text_encoder_and_tokenizer(dict(settings["text_encoder"]), prompts)
    unet_kwargs = dict(settings["unet"])
    if unet_kwargs.get("class_embed_type") == "projection":
        unet_kwargs["projection_class_embeddings_input_dim"] = text_encoder.config.hidden_size
    unet = UNet2DConditionModel(sample_size=resolution, in_channels=3, out_channels=3,
                                cross_attention_dim=text_encoder.config.hidden_size, **unet_kwargs)
    scheduler = DDPMScheduler(**settings["scheduler"])
    return TinyTextToImagePipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def pretrained_pixel_base(settings: dict, data: ControlDataModule, resolution: int, cache_dir: Path, trainer_kwargs: dict | None = None) -> Path:
    """The folder of the pretrained pixel base for these settings, pretraining it first if the cache lacks it.

    Its seed is ``model.base.pretrain.seed``, not the run's: runs that differ only in
    their seed train ControlNets on the same locked base.
    """
    def build(staging: Path) -> dict:
        pretrain = settings["pretrain"]
        L.seed_everything(pretrain["seed"], workers=True)
        pool = PretrainingData(data, pretrain["batch_size"], pretrain["empty_prompt_rate"])
        pipeline = build_pixel_base(settings, resolution, pool.prompts())
        module = DenoiserPretraining(pipeline, lr=pretrain["lr"], snr_gamma=pretrain["snr_gamma"],
                                     warmup_steps=pretrain["warmup_steps"], noise_offset=settings["noise_offset"])
        trainer = pretraining_trainer(pretrain["max_steps"], Path(cache_dir) / "base", trainer_kwargs)
        trainer.fit(module, train_dataloaders=pool.train_dataloader())
        pipeline.save_pretrained(staging, max_shard_size=SAVED_SHARD_SIZE)
        return {"steps": trainer.global_step, "data_root": data.origin, "resolution": resolution, "model": settings}

    return build_once(Path(cache_dir) / "base" / f"base-{cache_key(settings, data.fingerprint(), resolution)}", build,
                      use_shipped=settings.get("shipped", False))
