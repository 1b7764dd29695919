"""The tiny text-to-image model as a diffusers pipeline: pixel space, CLIP text encoder, optional ControlNet.

diffusers' Stable Diffusion pipelines assume a VAE and latents; the embedded default
works in pixel space (a VAE would cost most of the CPU budget), so this pipeline is
the pixel-space counterpart of ``StableDiffusionControlNetPipeline``: the same
classifier-free guidance and ControlNet residual plumbing (one ControlNet or several
composed, CFG resolution weighting: sampling.py), with diffusers' own
UNet, ControlNet and scheduler objects. ``save_pretrained``/``from_pretrained``
come from ``DiffusionPipeline``.
"""
from __future__ import annotations

import inspect

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, SchedulerMixin, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, PreTrainedTokenizerFast

from controlnet_lab.sampling import cast, check_resolution_weighting, compose, control_inputs


class TinyTextToImagePipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: PreTrainedTokenizerFast, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    caches_images = False  # the denoiser works on the images themselves: nothing to cache
    sampling_scheduler = DDIMScheduler  # what generates unless a scheduler is given
    vae_scale_factor = 1

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size

    @resolution.setter
    def resolution(self, value: int) -> None:
        if value != self.unet.config.sample_size:
            raise ValueError(f"this pixel base generates {self.unet.config.sample_size} px images only; data.resolution={value} "
                             "needs a base pretrained at that resolution")

    @property
    def noise_scheduler(self):
        return self.scheduler

    @property
    def denoiser(self) -> UNet2DConditionModel:
        return self.unet

    def locked_modules(self) -> dict[str, torch.nn.Module]:
        return {"locked_unet": self.unet, "text_encoder": self.text_encoder}

    def image_encoding(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel space: the images in [-1, 1] themselves."""
        return images

    def latents(self, encoding: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The denoiser's input: the images (pixel space)."""
        return encoding

    @property
    def uses_pooled_text(self) -> bool:
        """The UNet also takes the pooled prompt embedding through its class embedding."""
        return self.unet.config.class_embed_type == "projection"

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token hidden states, pooled embedding) of the prompts."""
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length, return_tensors="pt"
        ).to(self.text_encoder.device)
        output = self.text_encoder(input_ids=tokens.input_ids)
        return output.last_hidden_state, output.pooler_output

    def predict_noise(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        hidden_states: torch.Tensor,
        pooled: torch.Tensor,
        controlnet=None,
        condition: torch.Tensor | list[torch.Tensor] | None = None,
        conditioning_scale: float | list[float] = 1.0,
        resolution_weighting: str = "off",
        guided: bool = False,
        geometry: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The locked UNet's noise prediction, with what a ControlNet (or a ``MultiControlNetModel``, a T2I-Adapter) adds when one is given.

        ``guided``: the batch is classifier-free guidance's [unconditional; conditional]; ``geometry`` (the targets'
        original size and crop) is not read: this UNet has no size conditioning.
        With resolution weighting on, the condition then reaches only the conditional half.
        """
        class_labels = pooled if self.uses_pooled_text else None
        dtype = self.unet.dtype
        control = control_inputs(controlnet, sample, timestep, hidden_states, {"class_labels": class_labels}, condition, conditioning_scale,
                                 resolution_weighting, guided, dtype)
        return self.unet(sample.to(dtype), timestep, encoder_hidden_states=hidden_states.to(dtype), class_labels=cast(class_labels, dtype),
                         **control, return_dict=False)[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: list[str],
        condition: torch.Tensor | list[torch.Tensor] | None = None,
        controlnet=None,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        conditioning_scale: float | list[float] = 1.0,
        resolution_weighting: str = "off",
        scheduler: SchedulerMixin | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1], shape (len(prompt), C, H, W). CFG: eps_u + w (eps_c - eps_u).

        ``controlnet``: one ControlNet, or a list composed by summing residuals, with
        ``condition`` and ``conditioning_scale`` one per net (a single scale applies to all).
        ``scheduler``: a fresh diffusers scheduler to sample with; DDIM from the base's
        config when None. ``generator``: one for the batch, or one per image, so that
        each image's noise depends only on its own seed.
        """
        batch = len(prompt)
        size = self.unet.config.sample_size
        device = self.unet.device
        resolution_weighting = check_resolution_weighting(resolution_weighting, guidance_scale)
        if isinstance(controlnet, (list, tuple)):
            controlnet, condition, conditioning_scale = compose(controlnet, condition, conditioning_scale)
        scheduler = scheduler or self.sampling_scheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        use_cfg = guidance_scale != 1.0
        hidden, pooled = self.encode_prompt(([""] * batch if use_cfg else []) + list(prompt))
        sample = randn_tensor((batch, self.unet.config.in_channels, size, size), generator=generator, device=device)
        sample = sample * scheduler.init_noise_sigma
        for t in self.progress_bar(scheduler.timesteps):
            model_input = torch.cat([sample, sample]) if use_cfg else sample
            model_input = scheduler.scale_model_input(model_input, t)
            noise = self.predict_noise(
                model_input, t, hidden, pooled, controlnet, condition, conditioning_scale, resolution_weighting, guided=use_cfg
            )
            if use_cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            sample = scheduler.step(noise, t, sample, **step_kwargs).prev_sample
        return sample.clamp(-1, 1)

