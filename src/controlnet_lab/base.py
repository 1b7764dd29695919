"""The locked base of the embedded default: a tiny pixel-space text-to-image model, pretrained here.

Locking an untrained model would make every ablation meaningless, so the harness
pretrains the base on the training data (targets and prompts) and caches the
result under a key derived from the model config, the pretraining config and the
dataset's content: a second run with the same settings reuses it.

Pretraining uses the Min-SNR-gamma loss weighting (Hang et al. 2023, diffusers'
``compute_snr``), which shifts effort toward the high-noise steps where the
image's global colors are decided; with plain epsilon MSE the colors are learned
far more slowly (DESIGN.md's first attempt).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from omegaconf import DictConfig, OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel

from controlnet_lab.data.datamodule import Fill50kDataModule
from controlnet_lab.objective import noisy_batch
from controlnet_lab.pipeline import TinyTextToImagePipeline
from controlnet_lab.tokenizer import build_word_tokenizer


def build_base(model_cfg: DictConfig, resolution: int, prompts: list[str]) -> TinyTextToImagePipeline:
    """An untrained base from the ``model.base`` config, its tokenizer built from ``prompts``."""
    tokenizer = build_word_tokenizer(prompts, max_length=model_cfg.text_encoder.max_position_embeddings)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **OmegaConf.to_container(model_cfg.text_encoder),
    )
    text_encoder = CLIPTextModel(text_config)
    unet_kwargs = OmegaConf.to_container(model_cfg.unet)
    if unet_kwargs.get("class_embed_type") == "projection":
        unet_kwargs["projection_class_embeddings_input_dim"] = text_config.hidden_size
    unet = UNet2DConditionModel(
        sample_size=resolution, in_channels=3, out_channels=3, cross_attention_dim=text_config.hidden_size, **unet_kwargs
    )
    scheduler = DDPMScheduler(**OmegaConf.to_container(model_cfg.scheduler))
    return TinyTextToImagePipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


class BasePretraining(L.LightningModule):
    """Trains UNet and text encoder jointly on (target, prompt) pairs with the epsilon objective."""

    def __init__(self, pipeline: TinyTextToImagePipeline, lr: float, snr_gamma: float | None, warmup_steps: int, noise_offset: float):
        super().__init__()
        self.pipeline = pipeline
        self.unet = pipeline.unet
        self.text_encoder = pipeline.text_encoder
        self.noise_scheduler = pipeline.scheduler
        self.lr = lr
        self.snr_gamma = snr_gamma
        self.warmup_steps = warmup_steps
        self.noise_offset = noise_offset

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        noisy, timesteps, target = noisy_batch(self.noise_scheduler, batch["target"], self.noise_offset)
        hidden, pooled = self.pipeline.encode_prompt(batch["prompt"])
        prediction = self.pipeline.predict_noise(noisy, timesteps, hidden, pooled)
        loss = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma:
            snr = compute_snr(self.noise_scheduler, timesteps)
            weight = torch.clamp(snr, max=self.snr_gamma)
            loss = loss * (weight / snr if self.noise_scheduler.config.prediction_type == "epsilon" else weight / (snr + 1))
        loss = loss.mean()
        self.log("base/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(list(self.unet.parameters()) + list(self.text_encoder.parameters()), lr=self.lr)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, self.warmup_steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def base_cache_key(model_cfg: DictConfig, data_root: Path, resolution: int) -> str:
    """Hash of everything that determines the pretrained base: its config (seed included), dataset content, resolution."""
    dataset_hash = hashlib.sha256((Path(data_root) / "prompt.json").read_bytes()).hexdigest()
    payload = json.dumps(
        {"model": OmegaConf.to_container(model_cfg, resolve=True), "data": dataset_hash, "resolution": resolution},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def pretrained_base(model_cfg: DictConfig, data_root: Path, resolution: int, cache_dir: Path, trainer_kwargs: dict | None = None) -> Path:
    """The folder of the pretrained base for these settings, pretraining it first if the cache lacks it.

    Its seed is ``model.base.pretrain.seed``, not the run's: runs that differ only in
    their seed train ControlNets on the same locked base.
    """
    folder = Path(cache_dir) / f"base-{base_cache_key(model_cfg, data_root, resolution)}"
    if (folder / "model_index.json").is_file():
        return folder
    pretrain = model_cfg.pretrain
    L.seed_everything(pretrain.seed, workers=True)
    data = Fill50kDataModule(
        data_root, resolution, batch_size=pretrain.batch_size, val_size=pretrain.val_size, prompt_dropout=pretrain.empty_prompt_rate, split_seed=pretrain.split_seed,
        exclude_near_duplicates=pretrain.held_out.exclude_near_duplicates, max_distance=pretrain.held_out.max_distance,
    )
    data.setup()  # reads the index once; the tokenizer's vocabulary comes from every prompt
    pipeline = build_base(model_cfg, resolution, [r.prompt for r in data.train_records + data.val_records])
    module = BasePretraining(pipeline, lr=pretrain.lr, snr_gamma=pretrain.snr_gamma, warmup_steps=pretrain.warmup_steps, noise_offset=model_cfg.noise_offset)
    trainer = L.Trainer(
        max_steps=pretrain.max_steps,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=str(cache_dir),
        callbacks=[TQDMProgressBar(refresh_rate=10)],
        **(trainer_kwargs or {}),
    )
    trainer.fit(module, datamodule=data)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipeline.save_pretrained(staging)
        (staging / "pretrain_config.json").write_text(
            json.dumps({"steps": trainer.global_step, "data_root": str(data_root), "resolution": resolution,
                        "model": OmegaConf.to_container(model_cfg, resolve=True)}, indent=2)
        )
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load_base(folder: Path) -> TinyTextToImagePipeline:
    return TinyTextToImagePipeline.from_pretrained(str(folder))
