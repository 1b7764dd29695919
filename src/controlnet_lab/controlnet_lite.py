"""ControlNet-lite (paper Sec. 4.2, ablation (c)): each block of the trainable copy is one convolution.

It produces residuals of exactly the shapes ``ControlNetModel`` produces for the same
UNet (conv_in, every resnet and downsampler output, the middle block) and names its
connection convs as ``ControlNetModel`` does, so the LightningModule, the sampling
code and ``blocks.connection_convs`` treat both alike. It sees neither the timestep
nor the text: a single convolution per block has nowhere to put them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from torch import nn


class ControlNetLiteModel(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        in_channels: int = 3,
        conditioning_channels: int = 3,
        conditioning_embedding_out_channels: tuple[int, ...] = (16,),
        global_pool_conditions: bool = False,  # read by diffusers' ControlNet pipelines; always off here
    ):
        super().__init__()
        width = block_out_channels[0]
        self.conv_in = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(width, conditioning_channels, tuple(conditioning_embedding_out_channels))
        self.blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(width, width, kernel_size=1)])
        for level, channels in enumerate(block_out_channels):
            for _ in range(layers_per_block):
                self.blocks.append(nn.Conv2d(width, channels, kernel_size=3, padding=1))
                self.controlnet_down_blocks.append(nn.Conv2d(channels, channels, kernel_size=1))
                width = channels
            if level < len(block_out_channels) - 1:
                self.blocks.append(nn.Conv2d(width, width, kernel_size=3, padding=1, stride=2))
                self.controlnet_down_blocks.append(nn.Conv2d(width, width, kernel_size=1))
        self.mid_block = nn.Conv2d(width, width, kernel_size=3, padding=1)
        self.controlnet_mid_block = nn.Conv2d(width, width, kernel_size=1)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, conditioning_embedding_out_channels: tuple[int, ...] = (16,)) -> "ControlNetLiteModel":
        """Sized for ``unet``; no weights are copied (the lite variant has no copy to initialise)."""
        return cls(
            block_out_channels=tuple(unet.config.block_out_channels),
            layers_per_block=unet.config.layers_per_block,
            in_channels=unet.config.in_channels,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        )

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict | None = None,
        cross_attention_kwargs: dict | None = None,
        guess_mode: bool = False,
        return_dict: bool = False,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``ControlNetModel.forward``'s signature, so diffusers' ``MultiControlNetModel`` composes it;
        the timestep and text inputs are unused (see the module docstring)."""
        if guess_mode:
            raise NotImplementedError("ControlNetLiteModel has no guess mode: use resolution_weighting (controlnet_lab.sampling)")
        hidden = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        features = [hidden]
        for conv in self.blocks:
            hidden = F.silu(conv(hidden))
            features.append(hidden)
        mid = F.silu(self.mid_block(hidden))
        down = [connect(feature) * conditioning_scale for connect, feature in zip(self.controlnet_down_blocks, features, strict=True)]
        return down, self.controlnet_mid_block(mid) * conditioning_scale
