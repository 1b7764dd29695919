"""``block=controlnet_lora``: the trainable copy adapted with low-rank updates instead of trained in full (Stability's
Control-LoRA). The copy starts as ``block=zero``'s (the base's encoder, zero-initialised connections); its weights stay
frozen and learn through peft LoRA layers (``ControlNetModel.add_adapter``, diffusers' own peft integration) on the
modules ``block.lora.target_modules`` names. With ``block.lora.connections_in_full`` (the default, as Control-LoRA) the
zero convs and the hint encoder train in full; otherwise they are LoRA targets too.

peft is imported only here, when the block is used."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from diffusers import ControlNetModel

KEY = "block.lora"


def connection_module_names(copy: ControlNetModel) -> list[str]:
    """The zero convs and the hint encoder's convs, by module name."""
    hint = [f"controlnet_cond_embedding.{name}" for name, m in copy.controlnet_cond_embedding.named_modules() if isinstance(m, torch.nn.Conv2d)]
    return [*(f"controlnet_down_blocks.{i}" for i in range(len(copy.controlnet_down_blocks))), "controlnet_mid_block", *hint]


@functools.cache
def _copy_module_names() -> frozenset[str]:
    """The module names of a small ControlNetModel of SD's block types: what a LoRA target must end with."""
    copy = ControlNetModel(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), layers_per_block=1,
                           cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4, conditioning_embedding_out_channels=(4,))
    return frozenset(name for name, _ in copy.named_modules() if name)


def check_lora_settings(lora) -> None:
    """Refuse settings peft would reject late (or a target that adapts nothing), naming the key."""
    if lora is None:
        raise ValueError(f"block=controlnet_lora needs {KEY} (rank, alpha, target_modules, connections_in_full)")
    for key in ("rank", "alpha"):
        if not isinstance(lora.get(key), (int, float)) or isinstance(lora.get(key), bool) or lora[key] <= 0 or (key == "rank" and int(lora[key]) != lora[key]):
            raise ValueError(f"{KEY}.{key} must be a positive {'integer' if key == 'rank' else 'number'}, got {lora.get(key)!r}")
    targets = list(lora.get("target_modules") or [])
    if not targets:
        raise ValueError(f"{KEY}.target_modules must name at least one module of the ControlNet (e.g. to_q, conv1)")
    names = _copy_module_names()
    unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unknown:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
        raise ValueError(f"{KEY}.target_modules: {unknown} name no module of a ControlNet; module names end in e.g. {', '.join(suffixes)}")
    if not isinstance(lora.get("connections_in_full", True), bool):
        raise ValueError(f"{KEY}.connections_in_full must be true or false, got {lora.get('connections_in_full')!r}")


def add_lora(copy: ControlNetModel, lora) -> ControlNetModel:
    """Freeze ``copy`` and add the LoRA layers (B starts at zero, so step 0 computes what the copy computes)."""
    from peft import LoraConfig

    check_lora_settings(lora)
    copy.requires_grad_(False)
    targets = list(lora["target_modules"])
    in_full = lora.get("connections_in_full", True)
    if not in_full:
        targets += connection_module_names(copy)
    try:
        copy.add_adapter(LoraConfig(r=int(lora["rank"]), lora_alpha=lora["alpha"], target_modules=targets))
    except ValueError as err:  # peft: a target that matches no module of this base's ControlNet
        raise ValueError(f"{KEY}.target_modules={list(lora['target_modules'])}: {err}") from None
    if in_full:
        for name in connection_module_names(copy):
            copy.get_submodule(name).requires_grad_(True)
    return copy


def save_lora(copy: ControlNetModel, merged_folder: Path, adapter_folder: Path) -> None:
    """The adapted copy two ways: ``merged_folder`` a ``ControlNetModel`` with the LoRA merged in (usable by
    ``StableDiffusionControlNetPipeline``), and ``adapter_folder`` the LoRA layers alone (``save_lora_adapter``: what
    ``load_lora_adapter`` reads onto ``ControlNetModel.from_unet`` of the same base), with the connections trained in
    full or adapted beside them (``connections.safetensors``: not the base's weights). Leaves ``copy`` unchanged."""
    import copy as copying

    from safetensors.torch import save_file

    copy.save_lora_adapter(str(adapter_folder))
    # The connections are not the base's: their weights (trained in full, or the frozen ones LoRA adapts) go beside.
    connections = tuple(f"{name}." for name in connection_module_names(copy))
    save_file({k.replace(".base_layer.", "."): v.contiguous() for k, v in copy.state_dict().items() if k.startswith(connections) and "lora_" not in k},
              str(Path(adapter_folder) / "connections.safetensors"))
    merged = copying.deepcopy(copy)
    merged.fuse_lora()
    merged.unload_lora()
    merged.save_pretrained(str(merged_folder), safe_serialization=True)


def load_lora(unet, adapter_folder: Path, hint_channels) -> ControlNetModel:
    """The adapted copy from ``save_lora``'s adapter folder, on the base ``unet`` it was trained on."""
    from safetensors.torch import load_file

    copy = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(hint_channels))
    connections = Path(adapter_folder) / "connections.safetensors"
    weights = load_file(str(connections))
    unknown = set(weights) - set(copy.state_dict())
    if unknown:
        raise ValueError(f"{connections}: holds {sorted(unknown)[:3]}, which this base's ControlNet lacks: it was trained on another base")
    copy.load_state_dict(weights, strict=False)
    copy.load_lora_adapter(str(adapter_folder), prefix=None, use_safetensors=True)
    return copy
