"""The denoising objective shared by base pretraining and ControlNet training.

``noise_offset`` adds a per-image, per-channel constant to the noise (the
"offset noise" of diffusers' training scripts). Without it a noise schedule whose
final step keeps a little signal lets the model read an image's mean color off
its noisy input instead of from the prompt; at sampling time, starting from pure
noise, colors then come out at random. At 32x32 the effect is large, since the
noise's own mean over few pixels is small.
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def noisy_batch(scheduler: DDPMScheduler, images: torch.Tensor, noise_offset: float, generator: torch.Generator | None = None):
    """(noisy images, timesteps, regression target) for one batch."""
    batch, channels = images.shape[:2]
    # Draw where the generator lives (a seeded CPU generator gives the same draws on any device).
    device = generator.device if generator is not None else images.device
    noise = torch.randn(images.shape, generator=generator, device=device).to(images)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((batch, channels, 1, 1), generator=generator, device=device).to(images)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=device).to(images.device)
    noisy = scheduler.add_noise(images, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(images, noise, timesteps)
    else:
        raise ValueError(f"model.base.scheduler.prediction_type={scheduler.config.prediction_type!r} is not supported (epsilon, v_prediction)")
    return noisy, timesteps, target
