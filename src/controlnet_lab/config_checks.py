"""Checks of config values that would otherwise fail late or silently; each error names its Hydra key."""
from __future__ import annotations

import hydra
from diffusers.optimization import SchedulerType
from omegaconf import DictConfig, OmegaConf

from controlnet_lab.bases.sources import EmbeddedBaseSource
from controlnet_lab.blocks import BLOCKS, check_block_std, resolve_hint_channels
from controlnet_lab.controlnet_lora import check_lora_settings
from controlnet_lab.bases.latent_sd3 import check_transformer_sampling
from controlnet_lab.controlnet_sd3 import check_no_hint_channels, check_num_layers, check_transformer_block
from controlnet_lab.controlnet_xs import check_xs_sampling, check_xs_settings
from controlnet_lab.t2i_adapter import check_adapter_sampling, check_adapter_settings
from controlnet_lab.data.conditions import CONDITIONS, DETECTORS, detector_device_for
from controlnet_lab.evaluation.prompts import check_prompt_settings
from controlnet_lab.locked_encodings import CACHE_DTYPES
from controlnet_lab.objective import check_flow_matching, check_no_noise_offset
from controlnet_lab.sampling import check_resolution_weighting


class ConfigError(ValueError):
    pass


def check_train_config(cfg: DictConfig) -> None:
    if cfg.block.name not in BLOCKS:
        raise ConfigError(f"block.name={cfg.block.name!r} is unknown; choose one of {', '.join(BLOCKS)}")
    try:
        if transformer_base(cfg.model.base):
            check_transformer_block(cfg.block.name)
            check_flow_matching(OmegaConf.to_container(cfg.model.base.get("objective"), resolve=True) if cfg.model.base.get("objective") else None)
        check_block_std(cfg.block.name, cfg.block.get("std"))
        if cfg.block.name == "controlnet_lora":
            check_lora_settings(cfg.block.get("lora"))
        unet = cfg.model.base.get("unet")  # the base's layout where its config has it (a base from a folder: checked when loaded)
        if cfg.block.name == "t2i_adapter":
            check_adapter_settings(cfg.block.get("adapter"), unet.down_block_types if unet else None,
                                   configured_vae_factor(cfg.model.base) if unet else None)
            check_adapter_sampling(check_resolution_weighting(cfg.model.sampling.resolution_weighting), "model.sampling.")
        if cfg.block.name == "controlnet_xs":
            check_xs_settings(cfg.block.get("xs"), OmegaConf.to_container(unet, resolve=True) if unet else None)
            check_xs_sampling(check_resolution_weighting(cfg.model.sampling.resolution_weighting), "model.sampling.")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    data = cfg.data
    if data.size is not None and data.size < 1:
        raise ConfigError(f"data.size must be a positive number of training samples (or null for all), got {data.size}")
    if not 0.0 <= data.prompt_dropout <= 1.0:
        raise ConfigError(f"data.prompt_dropout must be in [0, 1], got {data.prompt_dropout}")
    if data.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {data.batch_size}")
    if data.held_out.exclude_near_duplicates and not 0.0 < data.held_out.max_distance <= 1.0:
        raise ConfigError(f"data.held_out.max_distance must be in (0, 1] (the fraction of two outlines' ink that differs), got {data.held_out.max_distance}")
    if data.condition not in CONDITIONS:
        raise ConfigError(f"data.condition={data.condition!r} is unknown; choose one of {', '.join(CONDITIONS)}")
    if DETECTORS.get(data.condition, (None, False))[1] and not data.detector_weights:
        raise ConfigError(f"data.condition={data.condition} needs detector weights: set data.detector_weights to a local folder "
                          "holding the lllyasviel/Annotators files")
    try:
        detector_device_for(data.condition, data.detector_device)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_model_shape(cfg.model, data.resolution)
    if cfg.trainer.max_steps is None or cfg.trainer.max_steps < 1:
        raise ConfigError(f"trainer.max_steps must be >= 1, got {cfg.trainer.max_steps}")
    check_sampling_config(cfg.model.sampling, "model.sampling")
    check_optimization(cfg)
    if compile_options(cfg.model.compile) is not None and sharded(cfg.trainer):
        raise ConfigError("model.compile cannot be used with trainer=fsdp (the compiled call would trace the sharded "
                          "ControlNet; not supported here); use trainer=ddp or model.compile=false")
    base = cfg.model.base
    if base.get("cache_dtype", "auto") not in ("auto", *CACHE_DTYPES):
        raise ConfigError(f"model.base.cache_dtype={base.cache_dtype!r}: choose auto or one of {', '.join(CACHE_DTYPES)}")
    if base.get("encode_batch_size", 1) < 1:
        raise ConfigError(f"model.base.encode_batch_size must be >= 1, got {base.encode_batch_size}")
    if not isinstance(base.get("shipped", False), bool):
        raise ConfigError(f"model.base.shipped must be true or false, got {base.shipped!r}")
    for key in ("batch_size", "curve_batch_size", "curve_images", "every_n_steps"):
        if cfg.eval.get(key) is not None and cfg.eval[key] < 1:
            raise ConfigError(f"eval.{key} must be >= 1, got {cfg.eval[key]}")
    if data.get("num_proc") is not None and data.num_proc < 1:
        raise ConfigError(f"data.num_proc must be >= 1 (or null: all the machine's cores), got {data.num_proc}")
    if cfg.eval.num_images < 1:
        raise ConfigError(f"eval.num_images must be >= 1 (the final evaluation scores that many held-out conditions), got {cfg.eval.num_images}")
    check_eval_prompt_settings(cfg.eval)
    if data.get("streaming"):
        check_streaming(cfg)


def check_streaming(cfg: DictConfig) -> None:
    """What a stream cannot give (data/streaming.py): the whole training pool before training."""
    base = cfg.model.base
    if issubclass(hydra.utils.get_class(base._target_), EmbeddedBaseSource) and not base.get("pretrained_model_name_or_path"):
        raise ConfigError(f"data.streaming=true: model={cfg.model.name} pretrains its base on the whole training pool, which a stream does "
                          "not hold; stream onto a saved base (model=sd15, or model.base.pretrained_model_name_or_path=<folder>)")
    if cfg.eval.get("train_images"):
        raise ConfigError("eval.train_images > 0 scores training conditions, which data.streaming=true does not hold in advance: set it to 0")
    if cfg.data.held_out.exclude_near_duplicates:
        raise ConfigError("data.held_out.exclude_near_duplicates=true compares every training condition with the held-out ones before "
                          "training, which data.streaming=true does not read in advance: set it to false")


def check_eval_prompt_settings(eval_cfg: DictConfig) -> None:
    try:
        check_prompt_settings(eval_cfg.get("prompt_settings"))
    except ValueError as err:
        raise ConfigError(f"eval.prompt_settings: {err}") from None


def check_optimization(cfg: DictConfig) -> None:
    """An optimizer class that can be imported and a learning-rate schedule diffusers knows."""
    target = cfg.optimizer._target_
    try:
        hydra.utils.get_class(target)
    except Exception as err:  # Hydra wraps the ImportError
        cause = err.__cause__ or err
        raise ConfigError(f"optimizer._target_={target} cannot be imported ({type(cause).__name__}: {cause}); "
                          + ("install bitsandbytes (pip install bitsandbytes), or " if target.startswith("bitsandbytes") else "")
                          + "choose optimizer=adamw") from None
    names = [t.value for t in SchedulerType]
    if cfg.lr_scheduler.name not in names:
        raise ConfigError(f"lr_scheduler.name={cfg.lr_scheduler.name!r} is not a diffusers schedule; choose one of {', '.join(names)}")
    if cfg.lr_scheduler.warmup_steps < 0:
        raise ConfigError(f"lr_scheduler.warmup_steps must be >= 0, got {cfg.lr_scheduler.warmup_steps}")
    ema = cfg.model.ema
    if ema.enabled:
        if not 0.0 < ema.decay <= 1.0:
            raise ConfigError(f"model.ema.decay must be in (0, 1], got {ema.decay}")
        if sharded(cfg.trainer):
            raise ConfigError("model.ema.enabled=true cannot be used with trainer=fsdp: the average would need the whole "
                              "ControlNet on every device, which FSDP shards; use trainer=ddp or model.ema.enabled=false")


def ema_settings(ema: DictConfig) -> dict | None:
    """``model.ema`` as EMAModel's keyword arguments, or None when it is off."""
    if not ema.enabled:
        return None
    return {k: v for k, v in OmegaConf.to_container(ema, resolve=True).items() if k != "enabled"}


def compile_options(setting) -> dict | None:
    """``model.compile`` as torch.compile's keyword arguments: None for false, {} for true, a mapping as given."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return {}
    if isinstance(setting, DictConfig):
        return OmegaConf.to_container(setting, resolve=True)
    raise ConfigError(f"model.compile must be true, false or torch.compile's keyword arguments (e.g. {{mode: max-autotune}}), got {setting!r}")


def sharded(trainer: DictConfig) -> bool:
    """Whether ``trainer.strategy`` is FSDP (by name or as a configured strategy)."""
    strategy = trainer.get("strategy")
    if isinstance(strategy, DictConfig):
        return "FSDP" in strategy.get("_target_", "")
    return str(strategy).startswith("fsdp")


def transformer_base(base: DictConfig) -> bool:
    """Whether the configured base is a transformer (SD3 family): built with a ``transformer`` or named as one."""
    return bool(base.get("transformer")) or base.get("pipeline") == "StableDiffusion3Pipeline"


def check_model_shape(model: DictConfig, resolution: int) -> None:
    """For a base built from its config: the resolution its UNet and VAE can halve, and a condition encoder that
    reaches the latent resolution (a base loaded from a folder or id is checked when it is loaded); on a transformer
    base, no condition encoder, a resolution its VAE and patches divide, and the blocks its ControlNet copies."""
    base = model.base
    if transformer_base(base):
        check_transformer_shape(model, resolution)
        return
    if not base.get("unet"):
        return
    factor = configured_vae_factor(base)
    try:
        resolve_hint_channels(model.controlnet.hint_channels, factor)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    multiple = factor * 2 ** (len(base.unet.block_out_channels) - 1)
    if resolution < 8 or resolution % multiple:
        raise ConfigError(
            f"data.resolution={resolution} is not supported by the model: it must be a multiple of {multiple} (the VAE's factor "
            f"{factor} times 2 to the number of downsamplings of model.base.unet.block_out_channels={list(base.unet.block_out_channels)})"
        )


def check_transformer_shape(model: DictConfig, resolution: int) -> None:
    try:
        check_no_hint_channels(model.controlnet.hint_channels)
        check_no_noise_offset(model.base.noise_offset)
        check_transformer_sampling(check_resolution_weighting(model.sampling.resolution_weighting), "model.sampling.")
        transformer = model.base.get("transformer")
        if not transformer:  # a base from a folder or id: its transformer is checked when it is loaded
            return
        check_num_layers(model.controlnet.get("num_layers"), transformer.num_layers)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    multiple = configured_vae_factor(model.base) * transformer.patch_size
    if resolution % multiple:
        raise ConfigError(f"data.resolution={resolution} is not supported by the model: it must be a multiple of {multiple} "
                          f"(the VAE's factor times model.base.transformer.patch_size={transformer.patch_size})")


def configured_vae_factor(base: DictConfig) -> int:
    """The VAE factor of a base built from its config (1: the pixel base, which has no VAE)."""
    return 2 ** (len(base.vae.block_out_channels) - 1) if base.get("vae") else 1


def check_sampling_config(sampling: DictConfig, key: str) -> None:
    """Resolution weighting and guidance scale (``<key>.resolution_weighting``, ``<key>.guidance_scale``) that can sample."""
    try:
        check_resolution_weighting(sampling.resolution_weighting, sampling.guidance_scale)
    except ValueError as err:
        raise ConfigError(f"{key}.{err}") from None
