"""Trained ControlNets in diffusers' format, and loading a trained ControlNet from a checkpoint or an export.

An export is a folder with
- ``controlnet/``: ``save_pretrained`` of the trained ControlNet (safetensors). The zero,
  gauss and controlnet_lora (LoRA merged) variants are diffusers ``ControlNetModel``s (``SD3ControlNetModel`` on SD3); the
  single-conv variant is a ``ControlNetLiteModel`` with the same ``save_pretrained``/``from_pretrained``
  pair; t2i_adapter's is a diffusers ``T2IAdapter``, controlnet_xs's a ``ControlNetXSAdapter`` (read out of
  the fused model it trained as).
- ``controlnet_lora/`` (``block=controlnet_lora`` only, whose ``controlnet/`` has the LoRA merged in): the LoRA
  adapter alone and the connections trained in full (controlnet_lora.py's ``save_lora``/``load_lora``).
- ``base/``: the locked base it was trained on, unless the run named it
  (``model.base.pretrained_model_name_or_path``: SD 1.5's id, a folder), which is then
  named, not copied (``tiny``: the pixel pipeline; ``tiny_sd``: a ``StableDiffusionPipeline`` folder).
- ``README.md``: a model card as diffusers' training script writes one (``base_model`` when
  the base is a Hub id, ``library_name: diffusers``, tags), with how to load it (diffusers'
  own pipeline where it runs the export, the harness's loader otherwise), the training
  config and the run's sample grid.
- ``export.json``: where it came from and how to load it.
Loading reads safetensors only (``use_safetensors=True``): nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ControlNetModel, ControlNetXSAdapter, SD3ControlNetModel, T2IAdapter
from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
from huggingface_hub import ModelCard, ModelCardData

from controlnet_lab.bases import LatentBase, SD3Base, base_fingerprint
from controlnet_lab.bases.sources import is_hub_id
from controlnet_lab.controlnet_lite import ControlNetLiteModel
from controlnet_lab.controlnet_lora import save_lora
from controlnet_lab.controlnet_xs import is_xs, trained_adapter
from controlnet_lab.module import ControlNetModule

CONTROLNET_CLASSES = {cls.__name__: cls for cls in (ControlNetModel, ControlNetLiteModel, T2IAdapter, ControlNetXSAdapter, SD3ControlNetModel)}


@dataclass
class TrainedControlNet:
    controlnet: torch.nn.Module
    base: Path        # the folder of the locked base it was trained on
    source: Path      # the checkpoint or export it was read from


def checkpoint_path(ckpt: str | Path, key: str = "ckpt") -> Path:
    """A .ckpt file, or a run directory's checkpoints/last.ckpt; an error names ``key`` otherwise."""
    path = Path(ckpt)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"{key}={ckpt}: no checkpoint there (give a .ckpt file or a run directory holding checkpoints/last.ckpt)")
    return path


def is_export(path: str | Path) -> bool:
    return (Path(path) / "controlnet" / "config.json").is_file()


def load_controlnet(folder: str | Path) -> torch.nn.Module:
    """A ControlNet saved with ``save_pretrained``, of the class its config names."""
    config = json.loads((Path(folder) / "config.json").read_text())
    name = config.get("_class_name")
    if name not in CONTROLNET_CLASSES:
        raise ValueError(f"{folder}/config.json: _class_name={name!r} is not one of {', '.join(CONTROLNET_CLASSES)}")
    return CONTROLNET_CLASSES[name].from_pretrained(str(folder), use_safetensors=True)


def load_trained(path: str | Path, key: str = "ckpt") -> TrainedControlNet:
    """A trained ControlNet from an export folder, a .ckpt file or a run directory."""
    if is_export(path):
        base = Path(path) / "base"
        if not base.is_dir():
            base = Path(json.loads((Path(path) / "export.json").read_text())["base_source"])
        return TrainedControlNet(load_controlnet(Path(path) / "controlnet").eval(), base, Path(path))
    ckpt = checkpoint_path(path, key)
    module = ControlNetModule.for_inference(ckpt)
    return TrainedControlNet(module.controlnet.eval(), Path(module.hparams.base_path), ckpt)


def exported_net(module: ControlNetModule) -> torch.nn.Module:
    """What ``controlnet/`` holds: the trained net, or for ControlNet-XS the adapter read out of the fused model."""
    return trained_adapter(module.controlnet, module.base.unet) if is_xs(module.controlnet) else module.controlnet


def model_card(module: ControlNetModule, net: torch.nn.Module, base_model: str, run_dir: Path, out: Path, staging: Path) -> ModelCard:
    """diffusers' training model card for the export, with the run's config and evaluation grid when the run has them."""
    config = run_dir / ".hydra" / "config.yaml"
    grid = run_dir / "eval_samples.png"
    description = [f"# ControlNet ({module.hparams.block} connection) trained with controlnet-lab\n",
                   f"A `{type(net).__name__}` trained on the locked base `{base_model}`.\n", usage(module, net, base_model, out)]
    if grid.is_file():
        shutil.copyfile(grid, staging / "eval_samples.png")
        description.append("Held-out samples (rows: condition, target, base alone, then base + ControlNet under each prompt setting):\n\n"
                           "![held-out samples](./eval_samples.png)\n")
    if config.is_file():
        description.append(f"## Training config\n\n```yaml\n{config.read_text()}```\n")
    card = ModelCard.from_template(
        ModelCardData(library_name="diffusers", base_model=base_model if is_hub_id(base_model) else None, inference=True),
        template_path=MODEL_CARD_TEMPLATE_PATH, model_description="\n".join(description),
    )
    return populate_model_card(card, tags=["controlnet", "diffusers", "controlnet-lab", f"block-{module.hparams.block}", "diffusers-training"])


def usage(module: ControlNetModule, net: torch.nn.Module, base_model: str, out: Path) -> str:
    """How to load the export: in diffusers' own pipeline where one runs it on this base (the base family's ControlNet
    pipeline for a ``ControlNetModel``, its adapter pipeline for a ``T2IAdapter``, its ControlNet-XS pipeline for a
    ``ControlNetXSAdapter``, on a Stable Diffusion or SDXL base; SD3's for an ``SD3ControlNetModel``); with the harness
    otherwise (``ControlNetLiteModel``, the pixel base)."""
    base = module.base
    cls = type(net)
    if isinstance(base, LatentBase) and cls in (ControlNetModel, T2IAdapter, ControlNetXSAdapter, SD3ControlNetModel):
        pipeline, argument = {ControlNetModel: (base.with_controlnet.__name__, "controlnet"), T2IAdapter: (base.with_adapter.__name__, "adapter"),
                              ControlNetXSAdapter: (base.with_xs.__name__, "controlnet"),
                              SD3ControlNetModel: (base.with_controlnet.__name__, "controlnet")}[cls]
        # a base saved without T5 loads with it named as none, as diffusers documents
        without = "".join(f", {part}=None" for part, module in base.components().items()
                          if isinstance(base, SD3Base) and part.endswith("_3") and module is None)
        return (f"```python\nfrom diffusers import {cls.__name__}, {pipeline}\n"
                f"{argument} = {cls.__name__}.from_pretrained('{out}/controlnet')\n"
                f"pipe = {pipeline}.from_pretrained('{base_model}', {argument}={argument}{without})\n```\n")
    return (f"diffusers' pipelines do not run a `{cls.__name__}` on this base; the harness does:\n\n"
            f"```bash\npython src/sample.py ckpt={out} condition=<an image or a folder> prompt=\"...\"\n```\n\n"
            f"```python\nfrom controlnet_lab.export import load_trained\ntrained = load_trained('{out}')  # .controlnet, .base (its folder)\n```\n")


def export(ckpt: Path, out: Path) -> dict:
    """Write the checkpoint's ControlNet (and its base, when pretrained here) into ``out`` (which must not exist or be
    empty); returns export.json's content."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"out={out} exists and is not an empty folder: choose a new one (an export never overwrites)")
    module = ControlNetModule.for_inference(ckpt)
    net = exported_net(module)
    global_step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    base_path = Path(module.hparams.base_path)
    # A base the run was given by name (model.base.pretrained_model_name_or_path: SD 1.5's id, a folder) is named;
    # one the harness pretrained (small, and found nowhere else) is copied.
    base_name = module.hparams.get("base_name")
    copy_base = not base_name
    base_model = f"{out}/base" if copy_base else str(base_name)
    info = {
        "source_checkpoint": str(Path(ckpt).resolve()),
        "global_step": global_step,
        "block": module.hparams.block,
        "controlnet_class": type(net).__name__,
        "base_source": str(base_path),
        "base_fingerprint": base_fingerprint(base_path),
        "base_copied": copy_base,
        "load": {
            "controlnet": f"{type(net).__name__}.from_pretrained('{out}/controlnet')",
            "base": f"controlnet_lab.bases.load_base('{base_model}')",
        },
    }
    if module.hparams.block == "controlnet_lora":
        info["load"]["lora"] = (f"controlnet_lab.controlnet_lora.load_lora(<the base's UNet>, '{out}/controlnet_lora', "
                                f"hint_channels={list(module.hparams.hint_channels)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if module.hparams.block == "controlnet_lora":  # merged into a ControlNetModel, and as the LoRA adapter alone
            save_lora(module.controlnet, staging / "controlnet", staging / "controlnet_lora")
        else:
            net.save_pretrained(staging / "controlnet", safe_serialization=True)
        if copy_base:
            module.base.save_pretrained(staging / "base", safe_serialization=True)
        model_card(module, net, base_model, Path(ckpt).resolve().parent.parent, out, staging).save(staging / "README.md")
        (staging / "export.json").write_text(json.dumps(info, indent=2))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info
