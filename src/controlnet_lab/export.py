"""Trained ControlNets in diffusers' format, and loading a trained ControlNet from a checkpoint or an export.

An export is a folder with
- ``controlnet/``: ``save_pretrained`` of the trained ControlNet (safetensors). The zero
  and gauss variants are diffusers ``ControlNetModel``s; the single-conv variant is a
  ``ControlNetLiteModel`` with the same ``save_pretrained``/``from_pretrained`` pair.
- ``base/``: the locked base it was trained on, ``save_pretrained`` of the harness's
  tiny pipeline (UNet, CLIP text encoder, tokenizer, scheduler).
- ``export.json``: where it came from and how to load it.
Loading reads safetensors only (``use_safetensors=True``): nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ControlNetModel

from controlnet_lab.controlnet_lite import ControlNetLiteModel
from controlnet_lab.module import ControlNetModule

CONTROLNET_CLASSES = {cls.__name__: cls for cls in (ControlNetModel, ControlNetLiteModel)}


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
        return TrainedControlNet(load_controlnet(Path(path) / "controlnet").eval(), Path(path) / "base", Path(path))
    ckpt = checkpoint_path(path, key)
    module = ControlNetModule.load_from_checkpoint(ckpt, map_location="cpu")
    return TrainedControlNet(module.controlnet.eval(), Path(module.hparams.base_path), ckpt)


def base_fingerprint(folder: Path) -> str:
    """sha256 over the base's UNet and text-encoder weights: the same locked model wherever it is stored."""
    digest = hashlib.sha256()
    files = sorted(p for sub in ("unet", "text_encoder") for p in (Path(folder) / sub).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no unet/ or text_encoder/ safetensors weights (not a saved base)")
    for path in files:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def export(ckpt: Path, out: Path) -> dict:
    """Write the checkpoint's ControlNet and its base into ``out`` (which must not exist or be empty); returns export.json's content."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"out={out} exists and is not an empty folder: choose a new one (an export never overwrites)")
    module = ControlNetModule.load_from_checkpoint(ckpt, map_location="cpu")
    global_step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    info = {
        "source_checkpoint": str(Path(ckpt).resolve()),
        "global_step": global_step,
        "block": module.hparams.block,
        "controlnet_class": type(module.controlnet).__name__,
        "base_source": module.hparams.base_path,
        "base_fingerprint": base_fingerprint(Path(module.hparams.base_path)),
        "load": {
            "controlnet": f"{type(module.controlnet).__name__}.from_pretrained('{out}/controlnet')",
            "base": f"controlnet_lab.pipeline.TinyTextToImagePipeline.from_pretrained('{out}/base')",
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        module.controlnet.save_pretrained(staging / "controlnet", safe_serialization=True)
        module.pipeline.save_pretrained(staging / "base", safe_serialization=True)
        (staging / "export.json").write_text(json.dumps(info, indent=2))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info
