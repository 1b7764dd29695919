"""``block=t2i_adapter``: T2I-Adapter (Mou et al. 2024), diffusers' ``T2IAdapter``: a light encoder of the condition
whose features are added inside the locked UNet's encoder (``down_intrablock_additional_residuals``), no copy of the
base and no zero convs, so unlike ControlNet it changes the base's prediction from step 0.

Its features must meet the UNet's down blocks at their resolutions: a block with cross-attention takes its feature
before it downsamples, a block without after. ``full_adapter`` and ``light_adapter`` fit Stable Diffusion's encoder,
every block but the last with cross-attention; ``full_adapter_xl`` fits SDXL's, three blocks of which the first has
none (its first feature meets that block's downsampled output, so its pixel unshuffle is twice the VAE factor, and
its last the middle block). Another layout (the pixel base's encoder) is refused by key (``block.adapter``).
Settings (``block.adapter``): ``adapter_type``, ``channels`` (null: fitted to the UNet's block_out_channels),
``num_res_blocks``, ``downscale_factor`` (null: fitted to the base's VAE factor)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import MultiAdapter, T2IAdapter, UNet2DConditionModel

KEY = "block.adapter"
ADAPTER_TYPES = ("full_adapter", "light_adapter", "full_adapter_xl")


def is_adapter(net) -> bool:
    return isinstance(net, (T2IAdapter, MultiAdapter))


def check_adapter_settings(adapter, down_block_types: Sequence[str] | None = None, vae_scale_factor: int | None = None) -> None:
    """Settings that cannot build an adapter fitting the base (``down_block_types``, ``vae_scale_factor``: the base's,
    where known), refused by key."""
    if adapter is None:
        raise ValueError(f"block=t2i_adapter needs {KEY} (adapter_type, channels, num_res_blocks, downscale_factor)")
    if adapter.get("adapter_type") not in ADAPTER_TYPES:
        raise ValueError(f"{KEY}.adapter_type={adapter.get('adapter_type')!r}: choose one of {', '.join(ADAPTER_TYPES)}")
    if not isinstance(adapter.get("num_res_blocks"), int) or adapter["num_res_blocks"] < 1:
        raise ValueError(f"{KEY}.num_res_blocks must be an integer >= 1, got {adapter.get('num_res_blocks')!r}")
    xl = adapter["adapter_type"] == "full_adapter_xl"
    if down_block_types is not None:
        if xl and not sdxl_layout(down_block_types):
            raise ValueError(f"{KEY}.adapter_type=full_adapter_xl fits SDXL's encoder (three down blocks, cross-attention in all but the "
                             f"first); the base UNet's are {list(down_block_types)}: use full_adapter or light_adapter")
        without = [i for i, kind in enumerate(down_block_types[:-1]) if "CrossAttn" not in kind]
        if not xl and without:
            hint = (f"set {KEY}.adapter_type=full_adapter_xl, which fits this SDXL-shaped encoder" if sdxl_layout(down_block_types) else
                    "use a Stable Diffusion- or SDXL-shaped base (model=tiny_sd, sd15, tiny_sdxl, sdxl) or another block")
            raise ValueError(f"block=t2i_adapter: the base UNet's down blocks {without} ({[down_block_types[i] for i in without]}) have no "
                             f"cross-attention, so they add an adapter feature after downsampling and no {adapter['adapter_type']}'s "
                             f"features fit them; {hint}")
    factor = adapter.get("downscale_factor")
    if factor is not None and vae_scale_factor is not None and factor != fitted_downscale(adapter, vae_scale_factor):
        raise ValueError(f"{KEY}.downscale_factor={factor}: the base's latents are {vae_scale_factor}x smaller than its images, so a "
                         f"{adapter['adapter_type']} unshuffles by {fitted_downscale(adapter, vae_scale_factor)}; set that (or null, which fits it)")


def sdxl_layout(down_block_types: Sequence[str]) -> bool:
    """SDXL's encoder: three down blocks, cross-attention in all but the first."""
    return len(down_block_types) == 3 and "CrossAttn" not in down_block_types[0] and all("CrossAttn" in kind for kind in down_block_types[1:])


def fitted_downscale(adapter, vae_scale_factor: int) -> int:
    """The pixel unshuffle that brings the condition to the adapter's first feature: the VAE factor (SD's layout), twice
    it for ``full_adapter_xl`` (its first feature meets SDXL's first block after that block downsamples)."""
    return vae_scale_factor * (2 if adapter["adapter_type"] == "full_adapter_xl" else 1)


def fitted_channels(adapter, unet: UNet2DConditionModel) -> list[int]:
    """The adapter's channels: given, or fitted to the UNet's down blocks. Its features must have the blocks'
    channels: a full adapter gives one per channel entry, a light adapter one more, repeating the last (so it fits a
    UNet whose last two blocks have the same channels, as SD's)."""
    light = adapter["adapter_type"] == "light_adapter"
    blocks = list(unet.config.block_out_channels)
    if adapter["adapter_type"] == "full_adapter_xl":  # a fourth feature, for the middle block, at the last block's channels
        blocks = blocks + blocks[-1:]
    channels = list(adapter.get("channels") or (blocks[:-1] if light else blocks))
    features = channels + channels[-1:] if light else channels
    if features != blocks:
        raise ValueError(f"{KEY}.channels={channels}: a {adapter['adapter_type']} gives features of {features} channels, but the UNet's "
                         f"down blocks have {blocks}" + (" (a light adapter repeats its last; use full_adapter here)" if light else ""))
    return channels


def build_adapter(unet: UNet2DConditionModel, vae_scale_factor: int, adapter) -> T2IAdapter:
    check_adapter_settings(adapter, unet.config.down_block_types, vae_scale_factor)
    return T2IAdapter(in_channels=3, channels=fitted_channels(adapter, unet), num_res_blocks=adapter["num_res_blocks"],
                      downscale_factor=adapter.get("downscale_factor") or fitted_downscale(adapter, vae_scale_factor),
                      adapter_type=adapter["adapter_type"])


def adapter_features(adapter, condition, conditioning_scale, resolution_weighting: str, guided: bool) -> list[torch.Tensor]:
    """The features for the UNet's encoder as ``StableDiffusionAdapterPipeline`` computes them: times the conditioning
    scale (a ``MultiAdapter``: each adapter's times its own, summed), the same for both halves of a CFG batch."""
    check_adapter_sampling(resolution_weighting)
    if isinstance(adapter, MultiAdapter):
        features = adapter([c.to(adapter.dtype) for c in condition], list(conditioning_scale))
    else:
        features = [f * conditioning_scale for f in adapter(condition.to(adapter.dtype))]
    return [torch.cat([f, f]) for f in features] if guided else features


def check_adapter_sampling(resolution_weighting: str, node: str = "") -> None:
    if resolution_weighting != "off":
        raise ValueError(f"{node}resolution_weighting={resolution_weighting} weights ControlNet residuals; a T2I-Adapter's features "
                         "have no such weighting: sample block=t2i_adapter with resolution_weighting=off")
