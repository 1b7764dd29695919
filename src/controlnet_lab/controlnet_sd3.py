"""The trainable copy on a transformer base (SD3): diffusers' ``SD3ControlNetModel``.

As diffusers' ``train_controlnet_sd3.py`` builds it: ``from_transformer`` copies the patch and
text embedders and the first ``num_layers`` transformer blocks, and joins the copy to the locked
transformer through zero-initialised linear layers (``controlnet_blocks``, one per copied block,
added to the locked blocks' outputs) and a zero-initialised patch embedding of the condition
(``pos_embed_input``), which enters as VAE latents, not pixels.

The paper's block ablation on it: ``zero`` is that model; ``gauss`` draws the same joins (the
linear layers and the condition's patch embedding) from a Gaussian instead of zeros, with the
std rules of blocks.py (``standard``: PyTorch's default init of each layer). ``single``
(ControlNet-lite: each copied block one convolution) has no faithful translation: a copied
transformer block attends across all tokens and to the text, and one layer in its place is not
the paper's ablation but a different one, so it is refused, as are the UNet-only architectures
(``t2i_adapter``, ``controlnet_xs``, ``controlnet_lora``).
"""
from __future__ import annotations

from diffusers import SD3ControlNetModel, SD3Transformer2DModel
from diffusers.configuration_utils import FrozenDict

TRANSFORMER_BLOCKS = ("zero", "gauss")
NUM_LAYERS_KEY = "model.controlnet.num_layers"


def is_transformer(denoiser) -> bool:
    return isinstance(denoiser, SD3Transformer2DModel)


def check_transformer_block(block: str) -> None:
    if block not in TRANSFORMER_BLOCKS:
        raise ValueError(f"block={block} is not defined on a transformer base (model=sd3, tiny_sd3): choose one of "
                         f"{', '.join(TRANSFORMER_BLOCKS)} (controlnet_sd3.py says why single has no faithful translation)")


def check_no_hint_channels(hint_channels) -> None:
    if hint_channels is not None:
        raise ValueError(f"model.controlnet.hint_channels={list(hint_channels)}: a transformer base's ControlNet takes the "
                         "condition through the VAE and has no condition encoder: set it to null")


def check_num_layers(num_layers, transformer_layers: int) -> int:
    """The copied blocks: at least one, and fewer than the transformer has (its last block updates the image tokens
    only, so a ControlNet block, which updates both streams, cannot copy it)."""
    if not isinstance(num_layers, int) or not 1 <= num_layers < transformer_layers:
        raise ValueError(f"{NUM_LAYERS_KEY}={num_layers}: copy 1 to {transformer_layers - 1} of the base transformer's "
                         f"{transformer_layers} blocks (diffusers' SD3 script copies 12 of SD3's 24)")
    return num_layers


def transformer_copy(transformer: SD3Transformer2DModel, block: str, num_layers: int) -> SD3ControlNetModel:
    """``SD3ControlNetModel.from_transformer`` with zero-initialised joins; the pooled text reaches it as it reaches
    the transformer (``force_zeros_for_pooled_projection`` off), as diffusers' SD3 script trains it."""
    check_transformer_block(block)
    num_layers = check_num_layers(num_layers, transformer.config.num_layers)
    config = dict(transformer.config)
    copy = SD3ControlNetModel.from_transformer(transformer, num_layers=num_layers, num_extra_conditioning_channels=0)
    # from_transformer (diffusers 0.42) writes num_layers and extra_conditioning_channels into the transformer's own
    # config; put it back, or the locked base would be saved (exported) as a num_layers-block transformer.
    transformer._internal_dict = FrozenDict(config)
    copy.register_to_config(force_zeros_for_pooled_projection=False)
    return copy
