"""``block=controlnet_xs``: ControlNet-XS (Zavadski et al. 2024), diffusers' ``ControlNetXSAdapter`` fused with the
locked UNet into a ``UNetControlNetXSModel``: a small control network (``block.xs.size_ratio`` of the base's channels)
that exchanges features with the base in both directions, block by block, through zero-initialised connections (so
step 0 predicts what the base predicts). The fused model holds its own copy of the base's weights, frozen
(``freeze_unet_params``): it replaces the locked UNet's call rather than adding residuals to it, and the locked UNet
itself stays as it was. diffusers' XS blocks take two ResNet layers per block and no class embedding (Stable
Diffusion's UNets); other bases are refused by key. The trained adapter is read back out of the fused model
(``trained_adapter``) for ``StableDiffusionControlNetXSPipeline``."""
from __future__ import annotations

import re

import torch
from diffusers import ControlNetXSAdapter, UNet2DConditionModel, UNetControlNetXSModel

from controlnet_lab.sampling import cast

KEY = "block.xs"
# The fused model's name of each part of the adapter (UNetControlNetXSModel.from_unet's loads, reversed).
ADAPTER_TO_FUSED = [(r"^conv_in\.", "ctrl_conv_in."), (r"^time_embedding\.", "ctrl_time_embedding."),
                    (r"^down_blocks\.(\d+)\.resnets\.", r"down_blocks.\1.ctrl_resnets."),
                    (r"^down_blocks\.(\d+)\.attentions\.", r"down_blocks.\1.ctrl_attentions."),
                    (r"^down_blocks\.(\d+)\.downsamplers\.", r"down_blocks.\1.ctrl_downsamplers."),
                    (r"^mid_block\.midblock\.", "mid_block.ctrl_midblock."), (r"^up_connections\.", "up_blocks.")]


def is_xs(net) -> bool:
    return isinstance(net, UNetControlNetXSModel)


def check_xs_settings(xs, unet_config=None) -> None:
    """Settings, and a base (its UNet's config where known), that diffusers' ControlNet-XS cannot build, refused by key."""
    if xs is None:
        raise ValueError(f"block=controlnet_xs needs {KEY} (size_ratio, learn_time_embedding, time_embedding_mix)")
    ratio = xs.get("size_ratio")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
        raise ValueError(f"{KEY}.size_ratio must be in (0, 1] (the control network's channels over the base's), got {ratio!r}")
    if not isinstance(xs.get("learn_time_embedding"), bool):
        raise ValueError(f"{KEY}.learn_time_embedding must be true or false, got {xs.get('learn_time_embedding')!r}")
    mix = xs.get("time_embedding_mix")
    if not isinstance(mix, (int, float)) or not 0 <= mix <= 1 or (mix < 1 and not xs["learn_time_embedding"]):
        raise ValueError(f"{KEY}.time_embedding_mix must be in [0, 1] (1: the base's time embedding only; below 1 needs "
                         f"{KEY}.learn_time_embedding=true), got {mix!r}")
    if unet_config is None:
        return
    layers_per_block, class_embed_type = unet_config.get("layers_per_block", 2), unet_config.get("class_embed_type")
    if layers_per_block != 2:
        raise ValueError(f"block=controlnet_xs: diffusers' ControlNet-XS blocks take 2 ResNet layers per block (Stable Diffusion's "
                         f"UNets); this base's UNet has layers_per_block={layers_per_block} (model.base.unet.layers_per_block)")
    if class_embed_type is not None:
        raise ValueError(f"block=controlnet_xs: diffusers' UNetControlNetXSModel has no class embedding, and this base's UNet "
                         f"takes its pooled prompt through one (model.base.unet.class_embed_type={class_embed_type}); use a latent base")
    # The control network keeps the base's attention heads (its attention_head_dim, in diffusers' naming): each needs a channel.
    heads = unet_config.get("attention_head_dim", 8)
    heads = max(heads) if isinstance(heads, (list, tuple)) else heads
    channels = [int(c * ratio) for c in unet_config["block_out_channels"]]
    if min(channels) < heads:
        raise ValueError(f"{KEY}.size_ratio={ratio} gives the control network {channels} channels, fewer than the base's {heads} "
                         f"attention heads; the smallest ratio this base allows is {heads / min(unet_config['block_out_channels']):g}")


def build_xs(unet: UNet2DConditionModel, hint_channels, xs) -> UNetControlNetXSModel:
    """The fused model: the base's weights frozen, the adapter trainable and float32 (as the other blocks' copies)."""
    check_xs_settings(xs, unet.config)
    adapter = ControlNetXSAdapter.from_unet(unet, size_ratio=xs["size_ratio"], learn_time_embedding=xs["learn_time_embedding"],
                                            time_embedding_mix=xs["time_embedding_mix"], conditioning_embedding_out_channels=tuple(hint_channels))
    return fused_xs(unet, adapter)


def fused_xs(unet: UNet2DConditionModel, adapter: ControlNetXSAdapter) -> UNetControlNetXSModel:
    fused = UNetControlNetXSModel.from_unet(unet, adapter).float()
    fused.freeze_unet_params()
    return fused


def trained_adapter(fused: UNetControlNetXSModel, unet: UNet2DConditionModel) -> ControlNetXSAdapter:
    """The ``ControlNetXSAdapter`` whose fusion with ``unet`` is ``fused``: every tensor of it read from the fused model
    (strict: a part left unread is an error)."""
    config = fused.config
    adapter = ControlNetXSAdapter.from_unet(unet, block_out_channels=list(config.ctrl_block_out_channels),
                                            num_attention_heads=config.ctrl_num_attention_heads, learn_time_embedding=config.ctrl_learn_time_embedding,
                                            time_embedding_mix=config.time_embedding_mix,
                                            conditioning_embedding_out_channels=tuple(config.ctrl_conditioning_embedding_out_channels))
    weights = fused.state_dict()

    def fused_name(name: str) -> str:
        for pattern, replacement in ADAPTER_TO_FUSED:
            name = re.sub(pattern, replacement, name)
        return name

    adapter.load_state_dict({name: weights[fused_name(name)] for name in adapter.state_dict()}, strict=True)
    return adapter.to(next(fused.parameters()).dtype)


def xs_prediction(fused: UNetControlNetXSModel, sample, timestep, hidden_states, unet_inputs: dict, condition, conditioning_scale,
                  resolution_weighting: str, guided: bool, dtype: torch.dtype) -> torch.Tensor:
    """The fused model's noise prediction (as ``StableDiffusionControlNetXSPipeline`` calls it: the condition for both
    halves of a CFG batch), computed in its dtype and returned in ``dtype``; ``unet_inputs``: what the base's UNet
    takes besides the text (SDXL's ``added_cond_kwargs``)."""
    check_xs_sampling(resolution_weighting)
    if isinstance(condition, (list, tuple)):
        raise ValueError("ControlNet-XS does not compose (diffusers has no multi-XS model): sample one block=controlnet_xs net at a time")
    net_dtype = fused.dtype
    condition = torch.cat([condition, condition]) if guided else condition
    return fused(sample.to(net_dtype), timestep, encoder_hidden_states=hidden_states.to(net_dtype), controlnet_cond=condition.to(net_dtype),
                 conditioning_scale=float(conditioning_scale), return_dict=False, **cast(unet_inputs, net_dtype))[0].to(dtype)


def check_xs_sampling(resolution_weighting: str, node: str = "") -> None:
    if resolution_weighting != "off":
        raise ValueError(f"{node}resolution_weighting={resolution_weighting} weights ControlNet residuals; ControlNet-XS exchanges "
                         "features inside the base and has no such weighting: sample block=controlnet_xs with resolution_weighting=off")
