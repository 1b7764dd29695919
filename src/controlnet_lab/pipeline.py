"""The tiny text-to-image model as a diffusers pipeline: pixel space, CLIP text encoder, optional ControlNet.

diffusers' Stable Diffusion pipelines assume a VAE and latents; the embedded default
works in pixel space (a VAE would cost most of the CPU budget), so this pipeline is
the pixel-space counterpart of ``StableDiffusionControlNetPipeline``: the same
classifier-free guidance and ControlNet residual plumbing, with diffusers' own
UNet, ControlNet and scheduler objects. ``save_pretrained``/``from_pretrained``
come from ``DiffusionPipeline``.
"""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, PreTrainedTokenizerFast


class TinyTextToImagePipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: PreTrainedTokenizerFast, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

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
        condition: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
    ) -> torch.Tensor:
        """The locked UNet's noise prediction, with a ControlNet's residuals added when one is given."""
        class_labels = pooled if self.uses_pooled_text else None
        down_residuals = mid_residual = None
        if controlnet is not None:
            down_residuals, mid_residual = controlnet(
                sample,
                timestep,
                encoder_hidden_states=hidden_states,
                controlnet_cond=condition,
                conditioning_scale=conditioning_scale,
                class_labels=class_labels,
                return_dict=False,
            )
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=hidden_states,
            class_labels=class_labels,
            down_block_additional_residuals=down_residuals,
            mid_block_additional_residual=mid_residual,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: list[str],
        condition: torch.Tensor | None = None,
        controlnet=None,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        conditioning_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1], shape (len(prompt), C, H, W). CFG: eps_u + w (eps_c - eps_u)."""
        batch = len(prompt)
        size = self.unet.config.sample_size
        device = self.unet.device
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        use_cfg = guidance_scale != 1.0
        hidden, pooled = self.encode_prompt(([""] * batch if use_cfg else []) + list(prompt))
        if condition is not None and use_cfg:
            condition = torch.cat([condition, condition])
        sample = torch.randn((batch, self.unet.config.in_channels, size, size), generator=generator).to(device)
        sample = sample * scheduler.init_noise_sigma
        for t in self.progress_bar(scheduler.timesteps):
            model_input = torch.cat([sample, sample]) if use_cfg else sample
            model_input = scheduler.scale_model_input(model_input, t)
            noise = self.predict_noise(model_input, t, hidden, pooled, controlnet, condition, conditioning_scale)
            if use_cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            sample = scheduler.step(noise, t, sample).prev_sample
        return sample.clamp(-1, 1)
