"""CFG resolution weighting and the composition of several ControlNets (paper Sec. 3.4, "Inference").

Resolution weighting puts the condition on the conditional branch of classifier-free
guidance only and multiplies the residual of connection i (the down-block residuals,
then the middle block's) by a weight:

- ``off``: every weight 1, the condition on both branches (diffusers' default).
- ``uniform``: the condition on the conditional branch only, every weight 1: the baseline
  the paper's Fig. 5 starts from ("too strong" guidance), before it weights by resolution.
- ``paper``: w_i = H / h_i, with h_i the residual's height and H the largest one (the
  paper's 64 / h_i for SD at 512 px, whose residuals are 64 ... 8 latent pixels high),
  so deeper connections get more weight (1 ... 8 on SD).
- ``code``: the released code's "guess mode" scales 0.825 ** (n - 1 - i), i = 0 .. n-1
  (0.825 ** (12 - i) for SD's n = 13: 0.0994 ... 1). diffusers' ``guess_mode`` uses
  ``torch.logspace(-1, 0, n)``, the same numbers to 1e-3 when n = 13; for other
  residual counts the two differ, and this option keeps the released code's ratio.

Several ControlNets are composed with diffusers' ``MultiControlNetModel``: each net's
residuals times its own conditioning scale, summed (several T2I-Adapters: ``MultiAdapter``).
``control_inputs`` gives the locked UNet what a ControlNet or a T2I-Adapter contributes.

``Sampling`` holds how images are sampled (steps, guidance, resolution weighting,
conditioning scale), built once from a config node and passed whole to the callbacks
and the evaluation.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
from diffusers import MultiAdapter
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from controlnet_lab.t2i_adapter import adapter_features, is_adapter

RESOLUTION_WEIGHTINGS = ("off", "uniform", "paper", "code")
CODE_RATIO = 0.825


@dataclass(frozen=True)
class Sampling:
    """How images are sampled: built from one config node (``model.sampling``) by ``from_config`` and passed whole."""

    num_inference_steps: int = 20
    guidance_scale: float = 1.0
    resolution_weighting: str = "off"
    conditioning_scale: float | Sequence[float] = 1.0  # one per ControlNet where several are composed

    @classmethod
    def from_config(cls, node) -> Sampling:
        """From a config node (or dict) holding these keys; one it lacks or leaves null keeps its default."""
        given = {f.name: node.get(f.name) for f in fields(cls) if node.get(f.name) is not None}
        if "resolution_weighting" in given:
            given["resolution_weighting"] = check_resolution_weighting(given["resolution_weighting"])
        return cls(**given)

    def kwargs(self) -> dict:
        """As the bases' ``__call__`` takes them."""
        return asdict(self)


def check_resolution_weighting(mode, guidance_scale: float | None = None) -> str:
    """The mode's name; YAML reads an unquoted ``off`` as false, which means ``off``.

    Resolution weighting is a classifier-free guidance technique: it puts the condition
    on the conditional branch only. Without guidance (``guidance_scale`` 1) there is one
    branch, and weighting it would only rescale the residuals (``paper`` x4 on the
    deepest ones here), so a mode other than ``off`` is refused there.
    """
    if mode is False:
        mode = "off"
    if mode not in RESOLUTION_WEIGHTINGS:
        raise ValueError(f"resolution_weighting={mode!r} is not one of {', '.join(RESOLUTION_WEIGHTINGS)}")
    if mode != "off" and guidance_scale == 1.0:
        raise ValueError(f"resolution_weighting={mode} needs classifier-free guidance (guidance_scale other than 1, e.g. 2): "
                         "it applies the condition to the conditional branch only; with guidance_scale=1 use resolution_weighting=off")
    return mode


def resolution_weights(mode: str, heights: Sequence[int]) -> list[float]:
    """The weight of each connection, given the heights of its residuals (down residuals, then the middle block's)."""
    mode = check_resolution_weighting(mode)
    count = len(heights)
    if mode == "paper":
        top = max(heights)
        return [top / height for height in heights]
    if mode == "code":
        return [CODE_RATIO ** (count - 1 - i) for i in range(count)]
    return [1.0] * count


def per_net(controlnets: Sequence, conditions: Sequence[torch.Tensor], scales: float | Sequence[float]):
    """(nets, conditions, scales) as lists of one per ControlNet; one scale may apply to all."""
    scales = list(scales) if isinstance(scales, (list, tuple)) else [scales] * len(controlnets)
    if not isinstance(conditions, (list, tuple)) or not len(controlnets) == len(conditions) == len(scales):
        raise ValueError("several ControlNets need a list of conditions and of scales, one per net "
                         f"(got {len(controlnets)} nets, {len(conditions) if isinstance(conditions, (list, tuple)) else 'a single'} condition(s), {len(scales)} scale(s))")
    return list(controlnets), list(conditions), scales


def compose(controlnets: Sequence, conditions: Sequence[torch.Tensor], scales: float | Sequence[float]):
    """(model, condition, scale) for a list of ControlNets with one condition each and one scale each (or one
    for all): a single net as is, several as diffusers' ``MultiControlNetModel`` (T2I-Adapters: ``MultiAdapter``) with lists."""
    controlnets, conditions, scales = per_net(controlnets, conditions, scales)
    if len(controlnets) == 1:
        return controlnets[0], conditions[0], scales[0]
    adapters = [is_adapter(net) for net in controlnets]
    if any(adapters) and not all(adapters):
        raise ValueError("ControlNets and T2I-Adapters do not compose (diffusers has no pipeline for both): compose one kind")
    return (MultiAdapter if all(adapters) else MultiControlNetModel)(controlnets), conditions, scales


def control_inputs(controlnet, sample, timestep, hidden_states, net_kwargs: dict, condition, conditioning_scale,
                   resolution_weighting: str, guided: bool, dtype: torch.dtype) -> dict:
    """The locked UNet's keyword arguments for what ``controlnet`` contributes (nothing when None): a ControlNet's
    residuals (``down_block_additional_residuals``, ``mid_block_additional_residual``) or a T2I-Adapter's features
    (``down_intrablock_additional_residuals``), computed in the net's dtype (float32 beside a bf16/fp16 base) and
    returned in ``dtype``, the UNet's. ``net_kwargs``: what the net takes besides the text, as the UNet does
    (the pixel base's ``class_labels``, SDXL's ``added_cond_kwargs``)."""
    if controlnet is None:
        return {}
    if is_adapter(controlnet):
        features = adapter_features(controlnet, condition, conditioning_scale, resolution_weighting, guided)
        return {"down_intrablock_additional_residuals": [f.to(dtype) for f in features]}
    net_dtype = controlnet.dtype
    down, mid = control_residuals(controlnet, sample.to(net_dtype), timestep, hidden_states.to(net_dtype), cast(net_kwargs, net_dtype),
                                  condition, conditioning_scale, resolution_weighting, guided)
    return {"down_block_additional_residuals": [r.to(dtype) for r in down], "mid_block_additional_residual": mid.to(dtype)}


def cast(value, dtype: torch.dtype):
    """``value`` (a tensor, None, or a dict of them such as ``added_cond_kwargs``) in ``dtype``."""
    if isinstance(value, dict):
        return {key: cast(item, dtype) for key, item in value.items()}
    return None if value is None else value.to(dtype)


def second_half(value):
    """The conditional half of a CFG batch's tensor (or of each tensor of a dict); None stays None."""
    if isinstance(value, dict):
        return {key: second_half(item) for key, item in value.items()}
    return None if value is None else value[value.shape[0] // 2 :]


def weighted_residuals(down: list[torch.Tensor], mid: torch.Tensor, mode: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The residuals multiplied by their resolution weights."""
    if mode == "off":
        return down, mid
    weights = resolution_weights(mode, [r.shape[-2] for r in [*down, mid]])
    return [r * w for r, w in zip(down, weights[:-1], strict=True)], mid * weights[-1]


def residual_heights(unet_config) -> list[int]:
    """Heights of a ControlNet's residuals for this UNet config at its sample size: conv_in, each
    resnet and downsampler of the down blocks, then the middle block (13 on SD 1.5: 64 ... 8)."""
    height = unet_config.sample_size
    layers = unet_config.layers_per_block
    levels = len(unet_config.block_out_channels)
    heights = [height]
    for level in range(levels):
        heights += [height] * (layers[level] if isinstance(layers, (list, tuple)) else layers)
        if level < levels - 1:
            height //= 2
            heights.append(height)
    return heights + [height]


def control_residuals(controlnet, sample, timestep, hidden_states, net_kwargs: dict, condition, conditioning_scale,
                      resolution_weighting: str, guided: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A ControlNet's (or a ``MultiControlNetModel``'s) weighted residuals for a denoiser input.

    ``guided``: the batch is classifier-free guidance's [unconditional; conditional]; with
    resolution weighting on, the condition then reaches only the conditional half and the
    unconditional half gets zero residuals (as diffusers' guess mode).
    """
    conditional_only = guided and resolution_weighting != "off"
    if conditional_only:
        sample, hidden_states, net_kwargs = second_half(sample), second_half(hidden_states), second_half(net_kwargs)
    elif guided:
        condition = [torch.cat([c, c]) for c in condition] if isinstance(condition, list) else torch.cat([condition, condition])
    down, mid = controlnet(
        sample,
        timestep,
        encoder_hidden_states=hidden_states,
        controlnet_cond=condition,
        conditioning_scale=conditioning_scale,
        return_dict=False,
        **net_kwargs,
    )
    if conditional_only:
        down = [torch.cat([torch.zeros_like(r), r]) for r in down]
        mid = torch.cat([torch.zeros_like(mid), mid])
    return weighted_residuals(down, mid, resolution_weighting)


class WeightedControlNets(MultiControlNetModel):
    """diffusers' ``MultiControlNetModel`` (one net or several, summed) with CFG resolution weighting,
    for ``StableDiffusionControlNetPipeline``.

    The pipeline, called with ``guess_mode=True``, already runs the nets on the conditional
    half only and gives the unconditional half zero residuals; this forward then applies
    the resolution weights of ``resolution_weighting`` instead of guess mode's own scales.
    The nets run in their own dtype (fp32 ControlNets on a bf16/fp16 base); their residuals
    are returned in the dtype of the denoiser's input.
    """

    def __init__(self, controlnets: Sequence, resolution_weighting: str = "off"):
        super().__init__(list(controlnets))
        self.resolution_weighting = check_resolution_weighting(resolution_weighting)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, class_labels=None,
                timestep_cond=None, attention_mask=None, added_cond_kwargs=None, cross_attention_kwargs=None,
                guess_mode: bool = False, return_dict: bool = True):
        dtype, net_dtype = sample.dtype, self.nets[0].dtype
        down, mid = super().forward(
            sample.to(net_dtype), timestep, encoder_hidden_states.to(net_dtype), [c.to(net_dtype) for c in controlnet_cond],
            conditioning_scale, class_labels, timestep_cond, attention_mask, cast(added_cond_kwargs, net_dtype), cross_attention_kwargs,
            guess_mode=False, return_dict=False,
        )
        down, mid = weighted_residuals(down, mid, self.resolution_weighting)
        return [r.to(dtype) for r in down], mid.to(dtype)
