"""The LightningModule: a locked base and its trainable copy, trained with the base's own objective.

The same module trains on every base (bases/: pixel or latent). The locked denoiser (a UNet, or SD3's transformer), text
encoders and VAE are frozen (``requires_grad=False``), kept in ``eval()`` even while
Lightning switches the module to training, left out of the optimizer, and left out
of checkpoints: a checkpoint holds the ControlNet and the path of the base it was
trained on, and the base is loaded from that folder. A batch may carry what the
locked parts compute, cached (data/encoded.py); otherwise the module computes it.
The loss is the MSE against the base's ``prediction_type`` target (epsilon or v), in
the denoiser's space (latents scaled by the VAE's ``scaling_factor`` on a latent base); on a flow-matching base
(SD3) the weighted MSE against the velocity (objective.py, ``model.base.objective``).

With ``ema`` settings the module keeps diffusers' ``EMAModel`` of the ControlNet's weights,
stepped once per optimizer step and stored in every checkpoint; ``for_inference`` loads a
checkpoint with those averaged weights in the ControlNet (what evaluation and export use),
while resuming from it trains on the raw weights.
"""
from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import wrap

from controlnet_lab.bases import check_same_base, load_base
from controlnet_lab.blocks import build_trainable_copy, resolve_hint_channels
from controlnet_lab.controlnet_sd3 import check_no_hint_channels, is_transformer
from controlnet_lab.objective import objective_batch, weighted_mse
from controlnet_lab.sampling import Sampling
from controlnet_lab.images import save_grid, to_uint8


class ControlNetModule(L.LightningModule):
    flops_per_batch = None  # not counted: Lightning's ThroughputMonitor then reports samples/s without FLOPs

    def __init__(
        self,
        base_path: str,
        block: str = "zero",
        block_std: float | str | None = "standard",
        lora: dict | None = None,  # block=controlnet_lora's settings (conf: block.lora)
        adapter: dict | None = None,  # block=t2i_adapter's settings (conf: block.adapter)
        xs: dict | None = None,  # block=controlnet_xs's settings (conf: block.xs)
        hint_channels: tuple[int, ...] | None = None,  # None: the paper's encoder for the base's VAE factor
        lr: float = 1e-5,
        noise_offset: float = 0.0,
        objective: dict | None = None,  # a flow-matching base's timestep density and loss weighting (model.base.objective)
        num_layers: int | None = None,  # the transformer blocks an SD3 ControlNet copies (model.controlnet.num_layers)
        sampling: dict | None = None,  # how validation images are sampled (Sampling's fields; conf: model.sampling)
        num_val_images: int = 8,
        sample_dir: str | None = None,
        base_dtype: str = "float32",
        controlnet_path: str | None = None,
        base_name: str | None = None,  # the configured folder or Hub id of the base (None: pretrained here)
        resolution: int | None = None,  # of the training images, which the base then generates (None: its own)
        gradient_checkpointing: bool = False,
        optimizer: dict | None = None,  # a Hydra partial config of the optimizer (conf/optimizer); None: AdamW(lr, foreach)
        lr_scheduler: dict | None = None,  # diffusers get_scheduler settings (conf/lr_scheduler); None: constant
        max_steps: int | None = None,  # the training length a decaying schedule spans
        ema: dict | None = None,  # EMAModel settings (decay, ...) for an average of the ControlNet's weights; None: no EMA
        base_fingerprint: str | None = None,  # of the locked base's folder, checked when the checkpoint is loaded again
        skip_nonfinite: bool = False,  # skip (and count) a step whose loss is not finite, instead of stopping the run
        compile: dict | None = None,  # torch.compile's keyword arguments for the training step's denoiser call; None: eager
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["compile"])  # how to run the step, not what the checkpoint holds
        self.base = load_base(Path(base_path), getattr(torch, base_dtype))
        if resolution:
            self.base.resolution = resolution
        self.base.set_progress_bar_config(disable=True)  # Lightning's bar and the eval bar report progress
        locked = self.base.locked_modules()
        self.locked_names = list(locked)
        self.locked_prefixes = tuple(f"{name}." for name in locked)  # their weights come from the base folder, not checkpoints
        for name, part in locked.items():
            setattr(self, name, part.requires_grad_(False).eval())
        if is_transformer(self.base.denoiser):  # SD3's ControlNet takes the condition as VAE latents: no condition encoder
            check_no_hint_channels(hint_channels)
        else:
            hint_channels = resolve_hint_channels(hint_channels, self.base.vae_scale_factor)
            self.hparams.hint_channels = list(hint_channels)  # the checkpoint (and the export) name the encoder built
        self.controlnet = build_trainable_copy(self.base.denoiser, block, hint_channels, block_std, controlnet_path, lora, adapter,
                                               self.base.vae_scale_factor, xs, num_layers)
        if gradient_checkpointing:
            if not self.controlnet._supports_gradient_checkpointing:
                raise ValueError(f"model.controlnet.gradient_checkpointing=true: {type(self.controlnet).__name__} (block={block}) does not support it")
            self.controlnet.enable_gradient_checkpointing()
        self.ema = EMAModel(self.controlnet.parameters(), **ema) if ema else None
        # Only the training step runs compiled: validation, sampling and evaluation call with other shapes and without
        # gradients, each of which would compile again.
        self.training_denoiser = self.base.predict_noise if compile is None else torch.compile(self.base.predict_noise, **compile)
        self.nonfinite_skips = 0
        self.last_finite: tuple[int, torch.Tensor] | None = None  # (step, loss) of the last step with a finite loss

    @classmethod
    def for_inference(cls, ckpt: str | Path) -> "ControlNetModule":
        """A checkpoint's module on the CPU for evaluation or export: with EMA on, its ControlNet holds the EMA weights.
        The file is read with ``weights_only=True`` (nothing is unpickled), and refused when the locked base it was
        trained on has changed since."""
        module = cls.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
        check_same_base(ckpt, module.hparams.get("base_fingerprint"), module.hparams.base_path)
        module.use_ema_weights()
        return module

    def use_ema_weights(self) -> None:
        """Put the EMA weights into the ControlNet (nothing without EMA); training from here on would lose the raw ones."""
        if self.ema is not None:
            self.ema.copy_to(self.controlnet.parameters())

    def configure_model(self) -> None:
        """Under trainer=fsdp only the ControlNet is sharded: ``wrap`` applies the strategy's FSDP settings inside
        Lightning's sharded context and returns the module unchanged under every other strategy. The locked parts have no
        gradients or optimizer state to shard: each device holds them whole, moved there here because FSDP moves only
        what it wraps."""
        if isinstance(self.controlnet, FullyShardedDataParallel):
            return
        self.controlnet = wrap(self.controlnet)
        if isinstance(self.controlnet, FullyShardedDataParallel):
            device = self.trainer.strategy.root_device
            for name in self.locked_names:
                getattr(self, name).to(device)

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)

    def optimizer_step(self, *args, **kwargs) -> None:
        # The average follows each optimizer step (not each batch, which gradient accumulation groups), and is
        # updated before the step's checkpoint is written.
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.step(self.controlnet.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.locked_names:
            getattr(self, name).eval()
        return self

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @torch.no_grad()
    def noisy_inputs(self, batch: dict, generator: torch.Generator | None = None) -> tuple:
        """(noisy latents, timesteps, regression target, loss weights or None, text hidden states, pooled text) of a
        batch: what the locked parts compute (or the cache holds) and the noise drawn for it."""
        encoding = batch["image_encoding"] if "image_encoding" in batch else self.base.image_encoding(batch["target"])
        latents = self.base.latents(encoding.float(), generator).float()
        if "text_hidden" in batch:
            hidden, pooled = batch["text_hidden"], batch.get("text_pooled")
        else:
            hidden, pooled = self.base.encode_prompt(batch["prompt"])
        return (*objective_batch(self.base.noise_scheduler, latents, self.hparams.noise_offset, self.hparams.objective, generator),
                hidden, pooled)

    def diffusion_loss(self, batch: dict, generator: torch.Generator | None = None, denoiser=None) -> torch.Tensor:
        """The objective on a batch; ``denoiser``: the call that predicts (``base.predict_noise`` or a compiled one)."""
        noisy, timesteps, target, weights, hidden, pooled = self.noisy_inputs(batch, generator)
        prediction = (denoiser or self.base.predict_noise)(noisy, timesteps, hidden, pooled, self.controlnet, batch["condition"],
                                                           geometry=batch.get("geometry"))
        return weighted_mse(prediction, target, weights)

    @torch.no_grad()
    def output_change(self, batch: dict, generator: torch.Generator) -> dict:
        """How much the ControlNet changes the locked base's noise prediction on a batch (the same noise, timesteps and
        prompts with and without it): the mean absolute change, and that over the prediction's mean magnitude."""
        noisy, timesteps, _, _, hidden, pooled = self.noisy_inputs(batch, generator)
        geometry = batch.get("geometry")
        alone = self.base.predict_noise(noisy, timesteps, hidden, pooled, geometry=geometry).float()
        controlled = self.base.predict_noise(noisy, timesteps, hidden, pooled, self.controlnet, batch["condition"], geometry=geometry).float()
        change = (controlled - alone).abs().mean()
        return {"mean_abs_change": float(change), "relative": float(change / alone.abs().mean()), "images": len(noisy)}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss = self.diffusion_loss(batch, denoiser=self.training_denoiser)
        if not torch.isfinite(loss):
            if self.hparams.skip_nonfinite:  # returning None skips the optimizer step (Lightning's automatic optimization)
                self.nonfinite_skips += 1
                self.log("train/nonfinite_skips", float(self.nonfinite_skips), batch_size=len(batch["prompt"]))
                return None
            last = "none before it" if self.last_finite is None else f"{self.last_finite[1].item():.6g} at step {self.last_finite[0]}"
            raise FloatingPointError(f"training loss is {loss.item()} at step {self.global_step} (the last finite loss: {last}); "
                                     "the run stops here and its last checkpoint is the last good one; lower "
                                     "model.controlnet.lr, or set skip_nonfinite=true to skip such steps")
        self.last_finite = (self.global_step, loss.detach())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Fixed noise and timesteps per batch, so validation losses are comparable across steps.
        loss = self.diffusion_loss(batch, generator=torch.Generator().manual_seed(batch_idx))
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]), sync_dist=True)
        # Rank 0's grid only: under DDP every rank wrote the same file, one while the W&B logger read it.
        if batch_idx == 0 and self.global_rank == 0 and self.hparams.num_val_images > 0 and self.hparams.sample_dir is not None:
            self.log_sample_grid(batch)

    def log_sample_grid(self, batch: dict) -> None:
        """Condition | generated | target rows for the first held-out conditions, saved and sent to the loggers."""
        count = min(self.hparams.num_val_images, len(batch["prompt"]))
        generated = self.base(
            batch["prompt"][:count],
            condition=batch["condition"][:count],
            controlnet=self.controlnet,
            **Sampling.from_config(self.hparams.sampling or {}).kwargs(),
            generator=torch.Generator().manual_seed(0),
        )
        rows = [to_uint8(batch["condition"][:count], 0.0, 1.0), to_uint8(generated, -1.0, 1.0), to_uint8(batch["target"][:count], -1.0, 1.0)]
        path = save_grid(rows, Path(self.hparams.sample_dir) / f"step_{self.global_step:06d}.png")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("val/samples", images=[str(path)], step=self.global_step, caption=["condition | generated | target"])

    def configure_optimizers(self):
        """The configured optimizer over the ControlNet's trainable parameters, and diffusers' learning-rate schedule
        stepped per optimizer step."""
        parameters = [p for p in self.controlnet.parameters() if p.requires_grad]
        if self.hparams.optimizer is None:
            optimizer = torch.optim.AdamW(parameters, lr=self.hparams.lr, foreach=True)
        else:
            optimizer = hydra.utils.instantiate(self.hparams.optimizer)(parameters)
        schedule = self.hparams.lr_scheduler or {"name": "constant"}
        scheduler = get_scheduler(schedule["name"], optimizer, num_warmup_steps=schedule.get("warmup_steps", 0),
                                  num_training_steps=self.hparams.max_steps, num_cycles=schedule.get("num_cycles", 1),
                                  power=schedule.get("power", 1.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(self.locked_prefixes)]:
            del state[key]
        if self.ema is not None:
            checkpoint["controlnet_ema"] = self.ema.state_dict()
        checkpoint["nonfinite_skips"] = self.nonfinite_skips

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite_skips = checkpoint.get("nonfinite_skips", 0)
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint["controlnet_ema"])
        # The locked weights come from the base folder; put them back so loading stays strict for the rest.
        for key, value in self.state_dict().items():
            if key.startswith(self.locked_prefixes):
                checkpoint["state_dict"].setdefault(key, value)
