"""A transformer base of the SD3 family: VAE, ``SD3Transformer2DModel``, two CLIP text encoders and T5 (optional),
flow matching.

Loaded from a Hub id or a folder written by ``StableDiffusion3Pipeline.save_pretrained`` (SD3 medium, SD3.5, the
harness's own ``tiny_sd3``; a folder without T5, whose model_index.json names none, loads without it and its T5 part
of the text is zeros, as diffusers' pipelines do), and generating with ``StableDiffusion3Pipeline`` and
``StableDiffusion3ControlNetPipeline``. As in diffusers' ``train_controlnet_sd3.py``: the text is both CLIP encoders'
penultimate hidden states side by side (padded to T5's width) followed by T5's (77 tokens), the pooled text both CLIP
projections; the objective is flow matching on the scheduler's training sigmas (objective.py); the ControlNet
(controlnet_sd3.py) takes the condition as VAE latents. The condition goes into the VAE in [-1, 1], as
``StableDiffusion3ControlNetPipeline`` prepares a condition image (PIL) when sampling: the harness trains on what the
pipeline gives the net from a user's image, and hands the pipeline its [0, 1] tensors mapped to [-1, 1] (the pipeline
passes a tensor to the VAE unchanged). diffusers' script feeds [0, 1] when training, which its own pipeline then
meets only for tensors.
"""
from __future__ import annotations

import torch
from diffusers import (DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3ControlNetModel, SD3MultiControlNetModel,
                       StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline)

from controlnet_lab.bases.latent import LatentBase
from controlnet_lab.sampling import per_net

MAX_SEQUENCE_LENGTH = 77  # T5 tokens (diffusers' train_controlnet_sd3.py default); training and sampling use the same
TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


class SD3Base(LatentBase):
    text_to_image = StableDiffusion3Pipeline
    with_controlnet = StableDiffusion3ControlNetPipeline
    load_options = {}
    denoiser_name = "transformer"
    training_scheduler = FlowMatchEulerDiscreteScheduler
    sampling_scheduler = FlowMatchEulerDiscreteScheduler
    call_options = {"max_sequence_length": MAX_SEQUENCE_LENGTH}

    def __init__(self, pipeline: StableDiffusion3Pipeline):
        super().__init__(pipeline)
        self.text_encoder_2, self.text_encoder_3 = pipeline.text_encoder_2, pipeline.text_encoder_3
        self.tokenizer_2, self.tokenizer_3 = pipeline.tokenizer_2, pipeline.tokenizer_3

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype | None = None) -> "SD3Base":
        """The base in ``name_or_path``; a text part its model_index.json names as none (a base saved without T5) is none."""
        index = DiffusionPipeline.load_config(str(name_or_path))
        absent = {part: None for part in TEXT_PARTS if index.get(part, [None])[0] is None}
        return cls(cls.text_to_image.from_pretrained(str(name_or_path), dtype=dtype, **absent))

    @property
    def transformer(self):
        return self.denoiser

    def components(self) -> dict:
        return {"transformer": self.denoiser, "vae": self.vae, "scheduler": self.scheduler, "text_encoder": self.text_encoder,
                "text_encoder_2": self.text_encoder_2, "text_encoder_3": self.text_encoder_3, "tokenizer": self.tokenizer,
                "tokenizer_2": self.tokenizer_2, "tokenizer_3": self.tokenizer_3}

    def locked_modules(self) -> dict[str, torch.nn.Module]:
        encoders = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2, "text_encoder_3": self.text_encoder_3}
        return {"locked_transformer": self.denoiser, **{name: e for name, e in encoders.items() if e is not None}, "vae": self.vae}

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the CLIP and T5 per-token hidden states, one sequence; both CLIP encoders' pooled projections)."""
        hidden, _, pooled, _ = self.pipeline.encode_prompt(list(prompts), None, None, device=self.text_encoder.device,
                                                           do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH)
        return hidden, pooled

    @torch.no_grad()
    def condition_latents(self, condition: torch.Tensor) -> torch.Tensor:
        """The ControlNet's input: the condition (in [0, 1]) through the VAE, as the ControlNet pipeline encodes it."""
        return self.latents(self.image_encoding(condition * 2.0 - 1.0).float())

    def predict_noise(self, sample, timestep, hidden_states, pooled=None, controlnet=None, condition=None,
                      conditioning_scale=1.0, resolution_weighting: str = "off", guided: bool = False,
                      geometry: torch.Tensor | None = None) -> torch.Tensor:
        """The locked transformer's velocity prediction, with the residuals an ``SD3ControlNetModel`` adds to its first
        blocks' outputs. ``resolution_weighting`` is a UNet notion (residuals of several resolutions): only off."""
        check_transformer_sampling(resolution_weighting)
        dtype = self.denoiser.dtype
        control = {}
        if controlnet is not None:
            net_dtype = controlnet.dtype
            residuals = controlnet(hidden_states=sample.to(net_dtype), controlnet_cond=self.condition_latents(condition).to(net_dtype),
                                   conditioning_scale=conditioning_scale, encoder_hidden_states=hidden_states.to(net_dtype),
                                   pooled_projections=pooled.to(net_dtype), timestep=timestep, return_dict=False)[0]
            control["block_controlnet_hidden_states"] = [residual.to(dtype) for residual in residuals]
        return self.denoiser(hidden_states=sample.to(dtype), timestep=timestep, encoder_hidden_states=hidden_states.to(dtype),
                             pooled_projections=pooled.to(dtype), **control, return_dict=False)[0]

    def control_pipeline(self, components: dict, controlnet, condition, conditioning_scale, resolution_weighting: str):
        """(``StableDiffusion3ControlNetPipeline`` with the net, or ``SD3MultiControlNetModel`` for a list, its control
        arguments)."""
        check_transformer_sampling(resolution_weighting)
        if isinstance(controlnet, (list, tuple)):
            nets, condition, scales = per_net(controlnet, condition, conditioning_scale)
            controlnet, conditioning_scale = SD3MultiControlNetModel(nets), [float(scale) for scale in scales]
        elif not isinstance(controlnet, SD3ControlNetModel):
            raise ValueError(f"a transformer base samples with an SD3ControlNetModel, not a {type(controlnet).__name__}")
        pipeline = self.build(self.with_controlnet, components, controlnet=controlnet)
        # in [-1, 1], as the pipeline prepares a condition image; a tensor it passes to the VAE as it is
        images = [c * 2.0 - 1.0 for c in condition] if isinstance(condition, list) else condition * 2.0 - 1.0
        return pipeline, {"control_image": images, "controlnet_conditioning_scale": conditioning_scale}


def check_transformer_sampling(resolution_weighting: str, key: str = "") -> None:
    """Resolution weighting (``<key>resolution_weighting``) is a UNet notion: off only."""
    if resolution_weighting != "off":
        raise ValueError(f"{key}resolution_weighting={resolution_weighting}: a transformer's ControlNet has no residuals of several "
                         "resolutions to weight: set it to off")
