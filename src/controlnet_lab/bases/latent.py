"""A Stable Diffusion-family base: VAE, 4-channel UNet with cross-attention, CLIP text encoder, scheduler.

Loaded from a Hub id or a folder written by ``StableDiffusionPipeline.save_pretrained``
(SD 1.x, SD 2.x, the harness's own ``tiny_sd``), with diffusers' own classes; it
generates with diffusers' ``StableDiffusionPipeline`` (base alone) and
``StableDiffusionControlNetPipeline`` (base + ControlNets), built from the same
components. Training works in latent space as diffusers' ControlNet script does:
latents are ``vae.encode(images).latent_dist.sample() * scaling_factor``, the noise
schedule is ``DDPMScheduler`` from the base's scheduler config and the regression
target follows its ``prediction_type``.
"""
from __future__ import annotations

import inspect
import logging

import torch
from diffusers import (ControlNetXSAdapter, DDIMScheduler, DDPMScheduler, SchedulerMixin, StableDiffusionAdapterPipeline,
                       StableDiffusionControlNetPipeline, StableDiffusionControlNetXSPipeline, StableDiffusionPipeline)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from controlnet_lab.controlnet_xs import check_xs_sampling, is_xs, xs_prediction
from controlnet_lab.sampling import WeightedControlNets, cast, check_resolution_weighting, compose, control_inputs, per_net
from controlnet_lab.t2i_adapter import check_adapter_sampling, is_adapter

log = logging.getLogger(__name__)


class LatentBase:
    """The locked parts of a latent text-to-image model, with the interface the harness trains and samples through."""

    caches_images = True  # the VAE's encoding of a target is worth caching
    # diffusers' pipelines of this family: the base alone, with ControlNets, a T2I-Adapter, a ControlNet-XS
    text_to_image = StableDiffusionPipeline
    with_controlnet = StableDiffusionControlNetPipeline
    with_adapter = StableDiffusionAdapterPipeline
    with_xs = StableDiffusionControlNetXSPipeline
    load_options = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}  # training runs no checker
    denoiser_name = "unet"               # the pipeline's denoising component (SD3: its transformer)
    training_scheduler = DDPMScheduler   # the noise training draws, from the base's scheduler config (objective.py)
    sampling_scheduler = DDIMScheduler   # what generates unless a scheduler is given
    call_options: dict = {}              # what this family's pipelines take besides the arguments all take

    def __init__(self, pipeline: StableDiffusionPipeline):
        self.pipeline = pipeline  # holds the same modules: encodes prompts and saves
        self.vae = pipeline.vae
        self.denoiser = getattr(pipeline, self.denoiser_name)
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self.scheduler = pipeline.scheduler
        if getattr(self.scheduler.config, "clip_sample", False):
            # Latents are not bounded to [-1, 1]: a sampler clipping its clean-sample estimate there washes every image
            # out. diffusers' StableDiffusionPipeline makes this correction for SD folders; its SDXL pipeline does not.
            log.warning("the base's scheduler config has clip_sample=True, which clips latents to [-1, 1] while sampling: "
                        f"sampling with clip_sample=False, as SD and SDXL ship (fix {type(self.scheduler).__name__}'s "
                        "scheduler_config.json to silence this)")
            self.scheduler.register_to_config(clip_sample=False)
        self.noise_scheduler = self.training_scheduler.from_config(pipeline.scheduler.config)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # The image size it generates: the denoiser's native size unless set (an SD base trained at 256 px, say).
        self.resolution = self.denoiser.config.sample_size * self.vae_scale_factor
        self.progress_bar_config: dict = {}

    @property
    def unet(self):
        """The UNet of an SD- or SDXL-family base (the denoiser)."""
        return self.denoiser

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype | None = None) -> "LatentBase":
        return cls(cls.text_to_image.from_pretrained(str(name_or_path), dtype=dtype, **cls.load_options))

    def components(self) -> dict:
        return {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer, "unet": self.unet,
                "scheduler": self.scheduler, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @staticmethod
    def build(pipeline_class, components: dict, **extra):
        """``pipeline_class`` from the components (and ``extra``) its constructor takes."""
        takes = inspect.signature(pipeline_class.__init__).parameters
        return pipeline_class(**{name: part for name, part in {**components, **extra}.items() if name in takes})

    def locked_modules(self) -> dict[str, torch.nn.Module]:
        return {"locked_unet": self.unet, "text_encoder": self.text_encoder, "vae": self.vae}

    def save_pretrained(self, folder, **kwargs) -> None:
        self.pipeline.save_pretrained(folder, **kwargs)

    def to(self, device) -> "LatentBase":
        for module in self.locked_modules().values():
            module.to(device)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        self.progress_bar_config = kwargs

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, None]:
        """(per-token hidden states, None): SD's UNet takes no pooled embedding."""
        hidden, _ = self.pipeline.encode_prompt(list(prompts), self.text_encoder.device, 1, do_classifier_free_guidance=False)
        return hidden, None

    def image_encoding(self, images: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters (mean and log-variance, channels concatenated) of images in [-1, 1]:
        what the latent cache stores, so that each use still draws its own latent sample."""
        images = images.to(self.vae.device, self.vae.dtype)
        return self.vae.encode(images).latent_dist.parameters

    def latents(self, encoding: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A scaled latent drawn from the posterior ``encoding`` (from ``image_encoding``)."""
        latents = DiagonalGaussianDistribution(encoding).sample(generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def unet_inputs(self, sample: torch.Tensor, pooled, geometry: torch.Tensor | None) -> dict:
        """What the UNet (and a ControlNet copied from it) takes besides the noisy sample, timestep and text: nothing
        on SD (SDXL: its pooled text and size conditioning)."""
        return {}

    def predict_noise(self, sample, timestep, hidden_states, pooled=None, controlnet=None, condition=None,
                      conditioning_scale=1.0, resolution_weighting: str = "off", guided: bool = False,
                      geometry: torch.Tensor | None = None) -> torch.Tensor:
        """The locked UNet's prediction, with what ``controlnet`` (a ControlNet, a T2I-Adapter) adds (sampling.py's
        ``control_inputs``); ``geometry``: each target's original size and crop (the data's ``crop_geometry``), read by
        a size-conditioned base (SDXL)."""
        dtype = self.unet.dtype
        extra = self.unet_inputs(sample, pooled, geometry)
        if is_xs(controlnet):  # the fused model predicts in place of the locked UNet
            return xs_prediction(controlnet, sample, timestep, hidden_states, extra, condition, conditioning_scale, resolution_weighting,
                                 guided, dtype)
        control = control_inputs(controlnet, sample, timestep, hidden_states, extra, condition, conditioning_scale, resolution_weighting,
                                 guided, dtype)
        return self.unet(sample.to(dtype), timestep, encoder_hidden_states=hidden_states.to(dtype), **cast(extra, dtype), **control,
                         return_dict=False)[0]

    def control_pipeline(self, components: dict, controlnet, condition, conditioning_scale, resolution_weighting: str):
        """(diffusers' pipeline for ``controlnet``, its control arguments), of this base's family (``StableDiffusion*`` on SD,
        ``StableDiffusionXL*`` on SDXL): the ControlNet pipeline with ``WeightedControlNets`` for ControlNets (one or a
        list, ``condition`` and ``conditioning_scale`` one per net), the adapter pipeline for T2I-Adapters
        (``MultiAdapter`` for a list), the ControlNet-XS pipeline for ControlNet-XS (a trained fused model, or an exported
        adapter that the pipeline fuses with the UNet)."""
        if is_xs(controlnet) or isinstance(controlnet, ControlNetXSAdapter):
            check_xs_sampling(resolution_weighting)
            fused = is_xs(controlnet)
            pipeline = self.build(self.with_xs, {**components, "unet": controlnet if fused else self.unet},
                                  controlnet=None if fused else controlnet)
            return pipeline, {"image": condition.to(self.unet.device), "controlnet_conditioning_scale": float(conditioning_scale)}
        if not isinstance(controlnet, (list, tuple)):
            controlnet, condition = [controlnet], [condition]
        if any(is_xs(net) or isinstance(net, ControlNetXSAdapter) for net in controlnet):
            raise ValueError("ControlNet-XS does not compose (diffusers has no multi-XS model): sample one block=controlnet_xs net at a time")
        nets, conditions, scales = per_net(controlnet, condition, conditioning_scale)
        conditions, scales = [c.to(self.unet.device) for c in conditions], [float(s) for s in scales]
        if any(is_adapter(net) for net in nets):
            check_adapter_sampling(resolution_weighting)
            net, condition, scale = compose(nets, conditions, scales)
            return self.build(self.with_adapter, components, adapter=net), {"image": condition, "adapter_conditioning_scale": scale}
        pipeline = self.build(self.with_controlnet, components, controlnet=WeightedControlNets(nets, resolution_weighting))
        return pipeline, {"image": conditions, "controlnet_conditioning_scale": scales, "guess_mode": resolution_weighting != "off"}

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
        """Images in [-1, 1], shape (len(prompt), 3, H, W), from diffusers' pipelines: ``StableDiffusionPipeline`` for the
        base alone, ``control_pipeline``'s with a ControlNet (or several, ``condition`` and ``conditioning_scale`` one
        per net), a T2I-Adapter or a ControlNet-XS; the family's sampler (``sampling_scheduler``: DDIM on SD and SDXL)
        from the base's config unless ``scheduler``."""
        resolution_weighting = check_resolution_weighting(resolution_weighting, guidance_scale)
        components = {**self.components(), "scheduler": scheduler or self.sampling_scheduler.from_config(self.scheduler.config)}
        arguments = {"prompt": list(prompt), "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                     "generator": generator, "output_type": "pt", "height": self.resolution, "width": self.resolution, **self.call_options}
        if controlnet is None:
            pipeline = self.build(self.text_to_image, components)
        else:
            pipeline, control = self.control_pipeline(components, controlnet, condition, conditioning_scale, resolution_weighting)
            arguments.update(control)
        pipeline.set_progress_bar_config(**self.progress_bar_config)
        images = pipeline(**arguments).images
        if not isinstance(images, torch.Tensor):  # StableDiffusionAdapterPipeline: NHWC numpy for every output_type but pil and latent
            images = torch.from_numpy(images).permute(0, 3, 1, 2).to(self.unet.device)
        return (images * 2.0 - 1.0).clamp(-1, 1)
