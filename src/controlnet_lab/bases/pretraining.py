"""What pretraining a locked base needs, whatever the base: its data, the denoiser objective, the cache.

Locking an untrained model would make every ablation meaningless, so the embedded
bases (``tiny``, ``tiny_sd``) are pretrained by the harness on the training data
(targets and prompts of the training pool: never the held-out samples or their
duplicates) and cached under a key derived from the base's settings, the content of
the split and the resolution: a second run with the same settings reuses the folder.

The denoiser is pretrained with the Min-SNR-gamma loss weighting (Hang et al. 2023,
diffusers' ``compute_snr``), which shifts effort toward the high-noise steps where
the image's global colors are decided; with plain epsilon MSE the colors are learned
far more slowly.

The embedded default's base also ships with the project (``bases/shipped/base-<key>``, made by
``make base``): a run whose recipe has that key copies it into the cache, checked against the
fingerprint recorded when it was built, instead of pretraining (``model.base.shipped=false``
pretrains anyway).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from lightning.pytorch.callbacks import TQDMProgressBar

from torch.utils.data import DataLoader

from controlnet_lab.bases.fingerprint import base_fingerprint
from controlnet_lab.data.datamodule import ControlDataModule
from controlnet_lab.data.encoded import EncodedDataset, LockedEncodings
from controlnet_lab.files import build_published
from controlnet_lab.objective import objective_batch
from controlnet_lab.provenance import commit, machine

# Settings of model.base that do not change the pretrained weights.
log = logging.getLogger(__name__)
NOT_IN_KEY = ("_target_", "pretrained_model_name_or_path", "dtype", "cache_encodings", "cache_dtype", "encode_batch_size", "shipped")
# Pretrained bases committed with the project, one folder per recipe key (src/build_base.py writes them).
SHIPPED_BASES = Path(__file__).parent / "shipped"
# Pretrained bases are saved in weight files of at most this size (diffusers' sharded save_pretrained), so that a shipped
# one is stored as files git keeps well; the fingerprint hashes the files, so a rebuild is saved the same way.
SAVED_SHARD_SIZE = "1MB"


def cache_key(settings: dict, data_fingerprint: str, resolution: int) -> str:
    """Hash of everything that determines a pretrained base: its settings (seed included), the split's content
    (``ControlDataModule.fingerprint``), the resolution."""
    relevant = {k: v for k, v in settings.items() if k not in NOT_IN_KEY}
    payload = json.dumps({"model": relevant, "data": data_fingerprint, "resolution": resolution}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_once(folder: Path, build: Callable[[Path], dict], use_shipped: bool = False) -> Path:
    """``folder`` if it holds a saved pipeline; otherwise the shipped copy of this key (``use_shipped``), or
    ``build(staging)`` writes one into a staging folder, which is renamed to ``folder`` only when complete (an
    interrupted pretraining leaves no half-written base). The weights' fingerprint is recorded at build time, with the
    commit and machine that built them; a cached folder whose weights no longer match it (a file cut short or changed
    on disk) is reported by path, set aside and built again, never trained on."""
    if (folder / "model_index.json").is_file():
        if intact(folder):
            return folder
        shutil.rmtree(folder, ignore_errors=True)
    shipped = SHIPPED_BASES / folder.name
    if use_shipped and (shipped / "model_index.json").is_file():
        return copy_shipped(shipped, folder)

    def build_and_record(staging: Path) -> None:
        built_by = {**commit(), "machine": machine()}  # the code as the build starts: the tree may change while it runs
        report = {**build(staging), "fingerprint": base_fingerprint(staging), "built_by": built_by}
        (staging / "pretrain_config.json").write_text(json.dumps(report, indent=2))

    build_published(folder, "model_index.json", build_and_record)
    return folder


def copy_shipped(shipped: Path, folder: Path) -> Path:
    """The shipped base of this recipe copied to the cache ``folder``, refused (naming the file to restore and the key
    that pretrains instead) unless its weights still have the fingerprint recorded when it was built."""
    def copy_and_check(staging: Path) -> None:
        shutil.copytree(shipped, staging, dirs_exist_ok=True)
        report = json.loads((staging / "pretrain_config.json").read_text())
        found = base_fingerprint(staging)
        if found != report.get("fingerprint"):
            raise ValueError(f"the shipped base {shipped} has weights fingerprint {found}, not the {report.get('fingerprint')} recorded "
                             f"when it was built: restore it (git checkout -- {shipped}) or pretrain it here with model.base.shipped=false")
        (staging / "pretrain_config.json").write_text(json.dumps({**report, "shipped_from": str(shipped)}, indent=2))

    log.info(f"the pretrained base of this recipe ships with the project: {shipped} copied to {folder} "
             "(model.base.shipped=false pretrains it here instead)")
    build_published(folder, "model_index.json", copy_and_check)
    return folder


def intact(folder: Path) -> bool:
    """Whether a cached base's weights still have the fingerprint recorded when it was built (folders built before
    fingerprints were recorded are taken as they are)."""
    recorded = json.loads((folder / "pretrain_config.json").read_text()).get("fingerprint") if (folder / "pretrain_config.json").is_file() else None
    try:
        found = base_fingerprint(folder)
    except FileNotFoundError:
        found = None
    if found is not None and recorded in (None, found):
        return True
    log.warning(f"the cached base {folder} is corrupt (weights fingerprint {found}, {recorded} when it was built): building it again")
    return False


class PretrainingData(L.LightningDataModule):
    """The run's training pool (whatever ``data.size``; the held-out set stays unseen), prompts dropped at
    ``empty_prompt_rate`` so that classifier-free guidance has an unconditional model."""

    def __init__(self, data: ControlDataModule, batch_size: int, empty_prompt_rate: float):
        super().__init__()
        self.data, self.batch_size, self.empty_prompt_rate = data, batch_size, empty_prompt_rate
        self.train_encodings: LockedEncodings | None = None

    def prompts(self) -> list[str]:
        return self.data.prompts()

    def train_dataset(self):
        return self.data.pool_dataset(self.empty_prompt_rate)

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        return DataLoader(EncodedDataset(dataset, self.train_encodings) if self.train_encodings is not None else dataset,
                          batch_size=self.batch_size, shuffle=True, drop_last=len(dataset) >= self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data.val_dataset(), batch_size=self.batch_size)


def pretraining_trainer(max_steps: int, cache_dir: Path, trainer_kwargs: dict | None) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, logger=False, enable_checkpointing=False, limit_val_batches=0, default_root_dir=str(cache_dir),
        callbacks=[TQDMProgressBar(refresh_rate=10)], **(trainer_kwargs or {}),
    )


class DenoiserPretraining(L.LightningModule):
    """Trains a base's UNet and text encoder jointly on (target, prompt) pairs with its diffusion objective.

    ``base`` is a pixel or latent base: its ``image_encoding``/``latents`` map a batch's
    targets (or their cached encodings, ``batch["image_encoding"]``) to the denoiser's input.
    """

    def __init__(self, base, lr: float, snr_gamma: float | None, warmup_steps: int, noise_offset: float, objective: dict | None = None):
        super().__init__()
        self.base = base
        self.denoiser = base.denoiser
        # The text encoders train with the UNet (SDXL's two, SD's one): every locked part but the autoencoder.
        self.text_encoders = torch.nn.ModuleList(part for name, part in base.locked_modules().items() if name.startswith("text_encoder"))
        self.lr = lr
        self.snr_gamma = snr_gamma
        self.warmup_steps = warmup_steps
        self.noise_offset = noise_offset
        self.objective = objective  # a flow-matching base's (model.base.objective); DDPM bases take None
        if snr_gamma and objective is not None:
            raise ValueError(f"model.base.pretrain.snr_gamma={snr_gamma}: Min-SNR weighting is for DDPM schedules; a flow-matching "
                             "base weights its loss by model.base.objective.weighting_scheme: set snr_gamma to null")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        scheduler = self.base.noise_scheduler
        encoding = batch["image_encoding"] if "image_encoding" in batch else self.base.image_encoding(batch["target"])
        noisy, timesteps, target, weights = objective_batch(scheduler, self.base.latents(encoding), self.noise_offset, self.objective)
        hidden, pooled = self.base.encode_prompt(batch["prompt"])
        prediction = self.base.predict_noise(noisy, timesteps, hidden, pooled, geometry=batch.get("geometry"))
        loss = F.mse_loss(prediction, target, reduction="none")
        loss = (loss if weights is None else weights * loss).mean(dim=(1, 2, 3))
        if self.snr_gamma:
            snr = compute_snr(scheduler, timesteps)
            weight = torch.clamp(snr, max=self.snr_gamma)
            loss = loss * (weight / snr if scheduler.config.prediction_type == "epsilon" else weight / (snr + 1))
        loss = loss.mean()
        self.log("base/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # Fused: one kernel for the 288 tensors (2.2 ms an update against 9.8 ms for torch's per-tensor CPU default;
        # speed_options.json). Pretraining neither clips gradients nor mixes precision, which Lightning refuses with it.
        optimizer = torch.optim.AdamW(list(self.denoiser.parameters()) + list(self.text_encoders.parameters()), lr=self.lr, fused=True)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, self.warmup_steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}
