"""The connection between the trainable copy and the locked model, in the paper's three variants (Sec. 4.2).

- ``zero``: ControlNet as designed. Every connection conv (the 1x1 convs on the copy's
  block outputs, the middle-block conv, and the hint encoder's last conv) starts at
  weight 0 and bias 0, so at step 0 base + ControlNet computes exactly what the
  locked base computes, while gradients into those convs are non-zero.
- ``gauss``: the same architecture, the connection convs initialised with Gaussian
  weights (``block.std``) as standard layers are: random noise reaches the locked
  model from the first step.
- ``single`` (ControlNet-lite): each block of the trainable copy is one convolution
  (``ControlNetLiteModel``), joined by the same zero convs.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from controlnet_lab.controlnet_lite import ControlNetLiteModel

BLOCKS = ("zero", "gauss", "single")


def connection_convs(controlnet: ControlNetModel | ControlNetLiteModel) -> Iterator[torch.nn.Conv2d]:
    """The convs that join the trainable copy to the locked model."""
    yield from controlnet.controlnet_down_blocks
    yield controlnet.controlnet_mid_block
    yield controlnet.controlnet_cond_embedding.conv_out


def build_trainable_copy(unet: UNet2DConditionModel, block: str, hint_channels: tuple[int, ...], std: float | None = None):
    """The trainable copy for the named block variant, its connection convs initialised accordingly."""
    if block not in BLOCKS:
        raise ValueError(f"block={block!r} is not one of {', '.join(BLOCKS)}")
    if block == "gauss" and not (std and std > 0):
        raise ValueError(f"block.std must be > 0 for block=gauss, got {std}")
    hint_channels = tuple(hint_channels)
    if block == "single":
        copy = ControlNetLiteModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels)
    else:
        copy = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels)
    for conv in connection_convs(copy):
        if block == "gauss":
            torch.nn.init.normal_(conv.weight, mean=0.0, std=std)
        else:
            torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    return copy
