"""The connection between the trainable copy and the locked model (paper Sec. 3.1, ablation Sec. 4.2).

``zero``: every connection conv (the 1x1 convs on the copy's block outputs, the
middle-block conv, and the hint encoder's last conv) starts at weight 0 and bias 0,
so at step 0 base + ControlNet computes exactly what the locked base computes.
This is what diffusers' ``ControlNetModel`` builds; the function below checks it
rather than trusting it silently.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from diffusers import ControlNetModel

BLOCKS = ("zero",)


def connection_convs(controlnet: ControlNetModel) -> Iterator[torch.nn.Conv2d]:
    """The convs that join the trainable copy to the locked model."""
    yield from controlnet.controlnet_down_blocks
    yield controlnet.controlnet_mid_block
    yield controlnet.controlnet_cond_embedding.conv_out


def apply_block(controlnet: ControlNetModel, block: str) -> ControlNetModel:
    """Initialise the connection convs as the named block variant prescribes."""
    if block not in BLOCKS:
        raise ValueError(f"block={block!r} is not one of {', '.join(BLOCKS)}")
    for conv in connection_convs(controlnet):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    return controlnet
