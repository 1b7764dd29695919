"""The trainable copy: diffusers' ``ControlNetModel.from_unet`` on the locked UNet, joined by the chosen block.

The hint encoder has one stride-2 stage per entry of ``hint_channels`` after the
first: SD 1.5 (512 px conditions, 64 px latents) uses the released (16, 32, 96, 256);
the pixel-space tiny base uses a single stage, (16,), which keeps the size.
"""
from __future__ import annotations

from diffusers import ControlNetModel, UNet2DConditionModel

from controlnet_lab.blocks import apply_block


def build_controlnet(unet: UNet2DConditionModel, block: str, hint_channels: tuple[int, ...]) -> ControlNetModel:
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(hint_channels))
    return apply_block(controlnet, block)
