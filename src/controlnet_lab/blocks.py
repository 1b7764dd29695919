"""The connection between the trainable copy and the locked model, in the paper's three variants (Sec. 4.2).

- ``zero``: ControlNet as designed. Every connection conv (the 1x1 convs on the copy's
  block outputs, the middle-block conv, and the hint encoder's last conv) starts at
  weight 0 and bias 0, so at step 0 base + ControlNet computes exactly what the
  locked base computes, while gradients into those convs are non-zero.
- ``gauss``: the same architecture, the connection convs made standard conv layers
  initialised with Gaussian weights (paper Sec. 4.2, Fig. 8b): random noise reaches
  the locked model from the first step. ``block.std: standard`` gives each conv the
  std of PyTorch's default init of that layer: ``Conv2d`` draws its weight from
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5)), whose std is
  1/sqrt(3 fan_in), fan_in = in_channels x kernel height x kernel width (0.144, 0.102,
  0.072 for the tiny base's 16/32/64-channel 1x1 convs; 0.048 for its hint encoder's
  3x3 conv_out on 16 channels). ``standard_x3`` (any factor after ``_x``) scales each of
  those stds; a number sets one std for all. Biases start at 0.
- ``single`` (ControlNet-lite): each block of the trainable copy is one convolution
  (``ControlNetLiteModel``), joined by the same zero convs.

The architectures since ControlNet, on the same axis: ``controlnet_lora`` (``zero``'s copy adapted by LoRA;
controlnet_lora.py), ``t2i_adapter`` (a condition encoder whose features enter the locked encoder, no copy and no
connection convs; t2i_adapter.py) and ``controlnet_xs`` (a small control network fused with the base, exchanging
features both ways; controlnet_xs.py).

On a transformer base (SD3) the copy is diffusers' ``SD3ControlNetModel``, its connections linear layers and the
condition's patch embedding; ``zero`` and ``gauss`` initialise those as above (controlnet_sd3.py).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator

import torch
from diffusers import ControlNetModel, ControlNetXSAdapter, SD3ControlNetModel, T2IAdapter, UNet2DConditionModel

from controlnet_lab.controlnet_lite import ControlNetLiteModel
from controlnet_lab.controlnet_lora import add_lora
from controlnet_lab.controlnet_sd3 import check_transformer_block, is_transformer, transformer_copy
from controlnet_lab.controlnet_xs import build_xs, fused_xs
from controlnet_lab.t2i_adapter import build_adapter

BLOCKS = ("zero", "gauss", "single", "controlnet_lora", "t2i_adapter", "controlnet_xs")
WITHOUT_CONNECTION_CONVS = ("t2i_adapter", "controlnet_xs")  # no ControlNet-style connection convs (XS's are its own, zero-initialised)


STANDARD_STD = "standard"
SCALED_STANDARD = re.compile(r"standard_x(\d+(?:\.\d*)?)")  # e.g. standard_x3: 3 times each conv's standard std


def standard_factor(std: float | str | None) -> float | None:
    """The factor on each conv's standard std that ``block.std`` asks for (1 for "standard"); None when it is a number
    (or not a valid setting)."""
    if std == STANDARD_STD:
        return 1.0
    scaled = SCALED_STANDARD.fullmatch(std) if isinstance(std, str) else None
    return float(scaled.group(1)) if scaled else None


def connection_convs(controlnet) -> Iterator[tuple[str, torch.nn.Conv2d | torch.nn.Linear]]:
    """The layers that join the trainable copy to the locked model, by parameter name: convs on a UNet's copy, linear
    layers and the condition's patch-embedding conv on a transformer's."""
    if isinstance(controlnet, SD3ControlNetModel):
        for i, linear in enumerate(controlnet.controlnet_blocks):
            yield f"controlnet_blocks.{i}", linear
        yield "pos_embed_input.proj", controlnet.pos_embed_input.proj
        return
    for i, conv in enumerate(controlnet.controlnet_down_blocks):
        yield f"controlnet_down_blocks.{i}", conv
    yield "controlnet_mid_block", controlnet.controlnet_mid_block
    yield "controlnet_cond_embedding.conv_out", controlnet.controlnet_cond_embedding.conv_out


def standard_init_std(layer: torch.nn.Conv2d | torch.nn.Linear) -> float:
    """The std of PyTorch's default weight init of this conv or linear layer: 1/sqrt(3 fan_in), fan_in the inputs of
    one output (in_channels / groups x kernel area; in_features)."""
    return 1.0 / math.sqrt(3 * layer.weight[0].numel())


def connection_init_stds(controlnet, block: str, std: float | str | None) -> dict[str, float]:
    """The std each connection conv's weight is drawn with (0: zero-initialised); none for a block without them."""
    check_block_std(block, std)
    if block in WITHOUT_CONNECTION_CONVS:
        return {}
    if block != "gauss":
        return {name: 0.0 for name, _ in connection_convs(controlnet)}
    factor = standard_factor(std)
    if factor is not None:
        return {name: factor * standard_init_std(conv) for name, conv in connection_convs(controlnet)}
    return {name: float(std) for name, _ in connection_convs(controlnet)}


def check_block_std(block: str, std: float | str | None) -> None:
    factor = standard_factor(std)
    valid = factor > 0 if factor is not None else not isinstance(std, str) and bool(std) and std > 0
    if block == "gauss" and not valid:
        raise ValueError(f"block.std must be '{STANDARD_STD}', 'standard_x<factor>' (e.g. standard_x3) or a number > 0 "
                         f"for block=gauss, got {std!r}")


PAPER_HINT_CHANNELS = (16, 32, 96, 256)  # the paper's condition encoder: 512 px conditions to SD's 64 latent px


def resolve_hint_channels(hint_channels, vae_scale_factor: int) -> tuple[int, ...]:
    """The condition encoder's channels for a base whose latents are ``vae_scale_factor`` times smaller than its images.

    ``None``: the paper's encoder with one entry per halving plus one, its last width repeated past SD's factor 8
    ((16,) on a pixel base, (16, 32, 96, 256) on SD, SDXL and SD3). A given list must bring the full-resolution
    condition to the denoiser's resolution: its stride-2 stages (one fewer than its entries) halve it log2(factor) times."""
    if vae_scale_factor < 1 or vae_scale_factor & (vae_scale_factor - 1):
        raise ValueError(f"the base's VAE factor must be a power of 2 for its condition encoder "
                         f"(model.controlnet.hint_channels), got {vae_scale_factor}")
    stages = vae_scale_factor.bit_length()
    paper = (PAPER_HINT_CHANNELS + PAPER_HINT_CHANNELS[-1:] * stages)[:stages]
    if hint_channels is None:
        return paper
    if 2 ** (len(hint_channels) - 1) != vae_scale_factor:
        raise ValueError(f"model.controlnet.hint_channels={list(hint_channels)} downsamples the condition {2 ** (len(hint_channels) - 1)}x, "
                         f"but the base's latents are {vae_scale_factor}x smaller than its images: give {stages} entries "
                         f"(e.g. {list(paper)}) or null for the paper's encoder")
    return tuple(hint_channels)


def load_pretrained_copy(name_or_path: str, block: str, unet: UNet2DConditionModel):
    """An existing ControlNet (folder or Hub id) to train on from, instead of a fresh copy of the UNet's encoder."""
    key = "model.controlnet.pretrained_model_name_or_path"
    if is_transformer(unet):
        return load_pretrained_transformer_copy(name_or_path, unet)
    cls = {"single": ControlNetLiteModel, "t2i_adapter": T2IAdapter, "controlnet_xs": ControlNetXSAdapter}.get(block, ControlNetModel)
    try:
        copy = cls.from_pretrained(str(name_or_path))
    except Exception as err:  # the hub client raises many types (offline, not found, network)
        raise FileNotFoundError(f"{key}={name_or_path}: cannot load a {cls.__name__} from it ({type(err).__name__}: {err})") from None
    if cls is ControlNetXSAdapter:
        return fused_xs(unet, copy)
    if cls is not T2IAdapter and tuple(copy.config.block_out_channels) != tuple(unet.config.block_out_channels):
        raise ValueError(f"{key}={name_or_path}: its block_out_channels {list(copy.config.block_out_channels)} do not match "
                         f"the base UNet's {list(unet.config.block_out_channels)}: it was trained for another base")
    return copy


def load_pretrained_transformer_copy(name_or_path: str, transformer):
    key = "model.controlnet.pretrained_model_name_or_path"
    try:
        copy = SD3ControlNetModel.from_pretrained(str(name_or_path))
    except Exception as err:  # the hub client raises many types (offline, not found, network)
        raise FileNotFoundError(f"{key}={name_or_path}: cannot load an SD3ControlNetModel from it ({type(err).__name__}: {err})") from None
    if copy.inner_dim != transformer.inner_dim:
        raise ValueError(f"{key}={name_or_path}: its width {copy.inner_dim} does not match the base transformer's "
                         f"{transformer.inner_dim}: it was trained for another base")
    return copy


def build_trainable_copy(unet, block: str, hint_channels: tuple[int, ...], std: float | str | None = STANDARD_STD,
                         pretrained: str | None = None, lora: dict | None = None, adapter: dict | None = None, vae_scale_factor: int = 1,
                         xs: dict | None = None, num_layers: int | None = None):
    """The trainable copy for the named block variant of the base's denoiser ``unet`` (a UNet, or SD3's transformer),
    its connection convs initialised accordingly; or, with ``pretrained``, an existing ControlNet of the block's class,
    its trained connections kept. ``lora``, ``adapter``, ``xs``: the settings of ``block=controlnet_lora``,
    ``t2i_adapter`` and ``controlnet_xs`` (conf/block/); ``vae_scale_factor``: the base's, which a T2I-Adapter's
    downscaling matches; ``num_layers``: the transformer blocks an SD3 ControlNet copies."""
    if block not in BLOCKS:
        raise ValueError(f"block={block!r} is not one of {', '.join(BLOCKS)}")
    if is_transformer(unet):
        check_transformer_block(block)
    if pretrained:
        copy = load_pretrained_copy(pretrained, block, unet)
        return add_lora(copy, lora) if block == "controlnet_lora" else copy
    if block == "t2i_adapter":
        return build_adapter(unet, vae_scale_factor, adapter)
    if block == "controlnet_xs":
        return build_xs(unet, hint_channels, xs)
    if is_transformer(unet):
        copy = transformer_copy(unet, block, num_layers)
    elif block == "single":
        copy = ControlNetLiteModel.from_unet(unet, conditioning_embedding_out_channels=tuple(hint_channels))
    else:
        copy = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(hint_channels))
    stds = connection_init_stds(copy, block, std)
    for name, conv in connection_convs(copy):
        if stds[name]:
            torch.nn.init.normal_(conv.weight, mean=0.0, std=stds[name])
        else:
            torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    return add_lora(copy, lora) if block == "controlnet_lora" else copy
