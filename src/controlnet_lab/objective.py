"""The training objectives shared by base pretraining and ControlNet training: DDPM noise (SD, SDXL, the pixel base)
and flow matching (SD3).

``noise_offset`` adds a per-image, per-channel constant to the noise (the
"offset noise" of diffusers' training scripts). Without it a noise schedule whose
final step keeps a little signal lets the model read an image's mean color off
its noisy input instead of from the prompt; at sampling time, starting from pure
noise, colors then come out at random. At 32x32 the effect is large, since the
noise's own mean over few pixels is small. Flow matching's last step is pure noise, so
it takes none.

``objective_batch`` gives (noisy inputs, timesteps, regression target, per-sample loss weights or None) for either,
chosen by the base's training scheduler.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

# diffusers' SD3 timestep densities (logit_normal, mode) and loss weightings (sigma_sqrt, cosmap); none: uniform, unweighted
WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")
OBJECTIVE_KEY = "model.base.objective"


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


def check_flow_matching(settings: dict | None) -> dict:
    """``model.base.objective``'s settings, complete and valid."""
    keys = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs")
    if not settings or any(key not in settings for key in keys):
        raise ValueError(f"{OBJECTIVE_KEY} must give {', '.join(keys)} for a flow-matching base (conf/model/sd3.yaml), got {settings}")
    if settings["weighting_scheme"] not in WEIGHTING_SCHEMES:
        raise ValueError(f"{OBJECTIVE_KEY}.weighting_scheme={settings['weighting_scheme']!r} is not one of {', '.join(WEIGHTING_SCHEMES)}")
    if settings["logit_std"] <= 0:
        raise ValueError(f"{OBJECTIVE_KEY}.logit_std must be > 0, got {settings['logit_std']}")
    return dict(settings)


def check_no_noise_offset(noise_offset: float) -> None:
    if noise_offset:
        raise ValueError(f"model.base.noise_offset={noise_offset}: offset noise is for DDPM schedules, whose last step keeps "
                         "signal; a flow-matching base's last step is pure noise: set it to 0")


def flow_matching_batch(scheduler: FlowMatchEulerDiscreteScheduler, latents: torch.Tensor, settings: dict,
                        generator: torch.Generator | None = None):
    """(noisy latents, timesteps, target, loss weights) as diffusers' ``train_controlnet_sd3.py`` draws them: timesteps
    from the weighting scheme's density over the scheduler's training schedule, ``(1 - sigma) x + sigma noise``, the
    velocity ``noise - x`` as target. Its ``precondition_outputs`` (the loss on ``noisy - sigma * prediction`` against
    ``x``) is the same loss with the weight ``sigma**2``, which is how it is applied here."""
    settings = check_flow_matching(settings)
    device = generator.device if generator is not None else latents.device
    u = compute_density_for_timestep_sampling(settings["weighting_scheme"], len(latents), settings["logit_mean"], settings["logit_std"],
                                              settings["mode_scale"], device=device, generator=generator)
    indices = (u * scheduler.config.num_train_timesteps).long().clamp(0, len(scheduler.timesteps) - 1).cpu()
    timesteps = scheduler.timesteps[indices].to(latents.device)
    sigmas = scheduler.sigmas[indices].to(latents).view(-1, *[1] * (latents.ndim - 1))
    noise = torch.randn(latents.shape, generator=generator, device=device).to(latents)
    weights = compute_loss_weighting_for_sd3(settings["weighting_scheme"], sigmas).to(latents)
    if settings["precondition_outputs"]:
        weights = weights * sigmas ** 2
    return (1.0 - sigmas) * latents + sigmas * noise, timesteps, noise - latents, weights


def objective_batch(scheduler, latents: torch.Tensor, noise_offset: float, flow_matching: dict | None = None,
                    generator: torch.Generator | None = None):
    """(noisy inputs, timesteps, target, per-element loss weights or None) under the base's objective: flow matching
    for a ``FlowMatchEulerDiscreteScheduler`` (``flow_matching``: ``model.base.objective``), DDPM noise otherwise."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        check_no_noise_offset(noise_offset)
        return flow_matching_batch(scheduler, latents, flow_matching, generator)
    return (*noisy_batch(scheduler, latents, noise_offset, generator), None)


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean squared error, each element times its weight when the objective gives weights."""
    if weights is None:
        return F.mse_loss(prediction.float(), target.float())
    return (weights.float() * (prediction.float() - target.float()) ** 2).mean()
