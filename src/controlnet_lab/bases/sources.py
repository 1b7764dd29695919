"""Where a run's locked base comes from: the ``_target_`` of each ``model=`` option's ``model.base``.

Each source turns the run's settings into a folder that ``load_base`` reads, and is
asked before any training (training.py): ``tiny`` and ``tiny_sd`` pretrain their base
on the run's training split (or reuse it from the cache), or take a saved one from
``pretrained_model_name_or_path``; ``pretrained`` (``sd15``, ``sdxl`` and any folder or Hub
id of their families; ``sd3``) resolves the id to a local snapshot, downloading it when the Hub
is reachable, and fails with the key and the id when it is neither there nor reachable,
or when it holds a pipeline of another family than the option's.
"""
from __future__ import annotations

import functools
from pathlib import Path

from diffusers import DiffusionPipeline

from controlnet_lab.bases.tiny import pretrained_pixel_base
from controlnet_lab.bases.tiny_sd import pretrained_tiny_sd

KEY = "model.base.pretrained_model_name_or_path"
FAMILIES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}  # saved pipeline class: the model= option


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
    """A base from a Hub id or a ``save_pretrained`` folder of the family ``settings["pipeline"]`` names
    (``StableDiffusionPipeline``: SD 1.x, 2.x; ``StableDiffusionXLPipeline``: SDXL; ``StableDiffusion3Pipeline``: SD3)."""

    def check(self) -> None:
        expected = self.settings.get("pipeline", "StableDiffusionPipeline")
        if not self.name_or_path:
            raise BaseNotFoundError(f"{KEY} is empty: give a Hub id or a folder saved with {expected}.save_pretrained")
        found = DiffusionPipeline.load_config(str(self.saved))["_class_name"]
        if found != expected:
            fits = f" (model={FAMILIES[found]})" if found in FAMILIES else ""
            raise BaseNotFoundError(f"{KEY}={self.name_or_path} holds a {found}{fits}, not the {expected} that "
                                    f"model={FAMILIES.get(expected, expected)} trains on: choose the model= option of its family")

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
                                    "(save the base with its pipeline's save_pretrained)")
        return path
    if not is_hub_id(name_or_path):
        raise BaseNotFoundError(f"{KEY}={name_or_path}: no such folder, and not a Hub id of the form owner/name")
    try:
        return Path(DiffusionPipeline.download(name_or_path, safety_checker=None, feature_extractor=None))
    except Exception as err:  # the hub client raises many types (offline, not found, gated, network)
        raise BaseNotFoundError(
            f"{KEY}={name_or_path}: the base is not in the local Hugging Face cache and could not be fetched "
            f"({type(err).__name__}). Without network, download it elsewhere (hf download {name_or_path}) "
            f"and copy the cache, or set {KEY} to a local folder saved with save_pretrained."
        ) from None
