"""Where a run's locked base comes from: the ``_target_`` of each ``model=`` option's ``model.base``.

Each source turns the run's settings into a folder that ``load_base`` reads, and is
asked before any training (training.py): ``tiny`` and ``tiny_sd`` pretrain their base
on the run's training split (or reuse it from the cache), or take a saved one from
``pretrained_model_name_or_path``; ``pretrained`` (``sd15`` and any Stable Diffusion
folder or Hub id) resolves the id to a local snapshot, downloading it when the Hub is
reachable, and fails with the key and the id when it is neither there nor reachable.
"""
from __future__ import annotations

import functools
from pathlib import Path

from diffusers import StableDiffusionPipeline

from controlnet_lab.bases.tiny import pretrained_pixel_base
from controlnet_lab.bases.tiny_sd import pretrained_tiny_sd

KEY = "model.base.pretrained_model_name_or_path"


class BaseNotFoundError(FileNotFoundError):
    """The configured base is neither a saved pipeline folder nor a Hub id that can be fetched."""


class BaseSource:
    """A ``model.base`` config: ``settings`` are its values (resolved), used by ``folder``."""

    def __init__(self, **settings):
        self.settings = settings

    @property
    def name_or_path(self) -> str | None:
        return self.settings.get("pretrained_model_name_or_path")

    @functools.cached_property
    def saved(self) -> Path | None:
        """The local folder of the named base (fetched once), None when none is named."""
        return saved_folder(self.name_or_path) if self.name_or_path else None

    def check(self) -> None:
        """Fail now, before any data or training work, if a named base cannot be had."""
        self.saved

    def folder(self, data, resolution: int, cache_dir: Path, trainer_kwargs: dict | None = None) -> Path:
        """The base's folder; ``data`` is the run's set-up ControlDataModule (an embedded base pretrains on its training pool);
        ``cache_dir`` the run's cache (pretrained bases in base/, the locked encodings in encodings/)."""
        raise NotImplementedError


class EmbeddedBaseSource(BaseSource):
    """A base the harness pretrains itself (``pretrain`` is its function), unless a saved one is named."""

    pretrain = None

    def folder(self, data, resolution, cache_dir, trainer_kwargs=None) -> Path:
        if self.saved:
            return self.saved
        return self.pretrain(self.settings, data, resolution, Path(cache_dir), trainer_kwargs)


class PixelBaseSource(EmbeddedBaseSource):
    pretrain = staticmethod(pretrained_pixel_base)


class TinySDBaseSource(EmbeddedBaseSource):
    pretrain = staticmethod(pretrained_tiny_sd)


class PretrainedBaseSource(BaseSource):
    """A Stable Diffusion-family base from a Hub id or a ``save_pretrained`` folder (SD 1.x, 2.x)."""

    def check(self) -> None:
        if not self.name_or_path:
            raise BaseNotFoundError(f"{KEY} is empty: give a Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or a folder "
                                    "saved with StableDiffusionPipeline.save_pretrained")
        super().check()

    def folder(self, data=None, resolution=None, cache_dir=None, trainer_kwargs=None) -> Path:
        self.check()
        return self.saved


def is_hub_id(name_or_path: str) -> bool:
    """Whether ``name_or_path`` names a Hub model (owner/name) rather than a local folder."""
    return not (Path(name_or_path).expanduser().exists() or Path(name_or_path).suffix
                or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1)


def saved_folder(name_or_path: str) -> Path:
    """The local folder of a saved pipeline: ``name_or_path`` itself, or the Hub snapshot of that id (fetched if needed,
    without the safety checker, which training never runs)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseNotFoundError(f"{KEY}={name_or_path}: the folder has no model_index.json "
                                    "(save the base with StableDiffusionPipeline.save_pretrained)")
        return path
    if not is_hub_id(name_or_path):
        raise BaseNotFoundError(f"{KEY}={name_or_path}: no such folder, and not a Hub id of the form owner/name")
    try:
        return Path(StableDiffusionPipeline.download(name_or_path, safety_checker=None, feature_extractor=None))
    except Exception as err:  # the hub client raises many types (offline, not found, gated, network)
        raise BaseNotFoundError(
            f"{KEY}={name_or_path}: the base is not in the local Hugging Face cache and could not be fetched "
            f"({type(err).__name__}). Without network, download it elsewhere (hf download {name_or_path}) "
            f"and copy the cache, or set {KEY} to a local folder saved with save_pretrained."
        ) from None
