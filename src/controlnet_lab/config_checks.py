"""Checks of config values that would otherwise fail late or silently; each error names its Hydra key."""
from __future__ import annotations

from omegaconf import DictConfig

from controlnet_lab.blocks import BLOCKS
from controlnet_lab.data.conditions import CONDITIONS, DETECTORS
from controlnet_lab.sampling import RESOLUTION_WEIGHTINGS


class ConfigError(ValueError):
    pass


def check_train_config(cfg: DictConfig) -> None:
    if cfg.block.name not in BLOCKS:
        raise ConfigError(f"block.name={cfg.block.name!r} is unknown; choose one of {', '.join(BLOCKS)}")
    data = cfg.data
    if data.size is not None and data.size < 1:
        raise ConfigError(f"data.size must be a positive number of training samples (or null for all), got {data.size}")
    if not 0.0 <= data.prompt_dropout <= 1.0:
        raise ConfigError(f"data.prompt_dropout must be in [0, 1], got {data.prompt_dropout}")
    if data.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {data.batch_size}")
    if data.condition not in CONDITIONS:
        raise ConfigError(f"data.condition={data.condition!r} is unknown; choose one of {', '.join(CONDITIONS)}")
    if DETECTORS.get(data.condition, (None, False))[1] and not data.detector_weights:
        raise ConfigError(f"data.condition={data.condition} needs detector weights: set data.detector_weights to a local folder "
                          "holding the lllyasviel/Annotators files")
    if data.generator is None and data.root is None:
        raise ConfigError("data.root must name a fill50k-format folder when data.generator is null")
    levels = len(cfg.model.base.unet.block_out_channels) - 1
    if data.resolution < 8 or data.resolution % (2**levels):
        raise ConfigError(
            f"data.resolution={data.resolution} is not supported by the model: it must be a multiple of {2**levels} "
            f"(2 to the number of downsamplings of model.base.unet.block_out_channels={list(cfg.model.base.unet.block_out_channels)})"
        )
    if cfg.trainer.max_steps is None or cfg.trainer.max_steps < 1:
        raise ConfigError(f"trainer.max_steps must be >= 1, got {cfg.trainer.max_steps}")
    weighting = cfg.model.sampling.resolution_weighting
    if weighting is not False and weighting not in RESOLUTION_WEIGHTINGS:
        raise ConfigError(f"model.sampling.resolution_weighting={weighting!r} is not one of {', '.join(RESOLUTION_WEIGHTINGS)}")
    if cfg.eval.num_images < 0:
        raise ConfigError(f"eval.num_images must be >= 0, got {cfg.eval.num_images}")
