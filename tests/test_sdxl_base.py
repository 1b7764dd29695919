"""The SDXL path, on a tiny random SDXL-shaped pipeline built here and saved with ``save_pretrained``: the loading code
a Hub id such as stabilityai/stable-diffusion-xl-base-1.0 takes."""
from __future__ import annotations

import json
import logging
import shutil

import lightning as L
import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler, DDPMScheduler, StableDiffusionXLAdapterPipeline, StableDiffusionXLControlNetPipeline
from torch.utils.data import DataLoader

from conftest import compose_train, fill50k_dataset, run_train
from controlnet_lab.bases import SDXLBase, load_base
from controlnet_lab.bases.sources import BaseNotFoundError, PretrainedBaseSource
from controlnet_lab.config_checks import ConfigError, check_train_config
from controlnet_lab.export import export
from controlnet_lab.module import ControlNetModule

PROMPTS = ["red circle with blue background", ""]
LORA = dict(rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"], connections_in_full=True)
XS = dict(size_ratio=0.25, learn_time_embedding=False, time_embedding_mix=1.0)
ADAPTER = dict(adapter_type="full_adapter", channels=None, num_res_blocks=1, downscale_factor=None)


def sdxl_module(folder, **kwargs) -> ControlNetModule:
    return ControlNetModule(str(folder), hint_channels=None, num_val_images=0, resolution=32, **kwargs)


def test_loads_as_sdxl_with_both_text_encoders_and_the_pooled_text(sdxl_folder):
    base = load_base(sdxl_folder)
    assert isinstance(base, SDXLBase) and base.vae_scale_factor == 8 and base.resolution == 32
    hidden, pooled = base.encode_prompt(PROMPTS)
    assert hidden.shape == (2, 24, 64) and pooled.shape == (2, 16)  # 32 + 32 hidden channels side by side; the projection
    assert set(base.locked_modules()) == {"locked_unet", "text_encoder", "text_encoder_2", "vae"}


def test_a_folder_whose_scheduler_clips_latents_samples_without_clipping_and_says_so(sdxl_folder, tmp_path, caplog):
    """DDPMScheduler's default clip_sample=True clips the clean-latent estimate to [-1, 1] at every step (it washed the
    tiny_sdxl base's images out: its base color accuracy 0.32 clipped, 0.94 not); diffusers' SD pipeline corrects such
    a folder, its SDXL pipeline does not, so the harness does, saying so."""
    folder = tmp_path / "clipping"
    shutil.copytree(sdxl_folder, folder)
    DDPMScheduler(clip_sample=True).save_pretrained(folder / "scheduler")
    with caplog.at_level(logging.WARNING):
        base = load_base(folder)
    assert "clip_sample=True" in caplog.text
    assert not base.scheduler.config.clip_sample and not base.sampling_scheduler.from_config(base.scheduler.config).config.clip_sample
    assert not load_base(sdxl_folder).scheduler.config.get("clip_sample", False)  # a folder that does not clip is left as it is


def test_a_float16_vae_that_overflows_there_encodes_in_float32_as_the_pipelines_decode(sdxl_folder):
    base = load_base(sdxl_folder, torch.float16)
    base.vae.register_to_config(force_upcast=True)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    encoding = base.image_encoding(images)
    assert encoding.dtype == torch.float32 and base.vae.dtype == torch.float16  # computed in float32, the VAE left as it was
    assert torch.allclose(encoding, load_base(sdxl_folder).image_encoding(images), atol=2e-3)  # the float16 weights' rounding


def test_zero_blocks_reproduce_the_base_prediction_at_step_zero(sdxl_folder):
    module = sdxl_module(sdxl_folder, block="zero")
    assert module.hparams.hint_channels == [16, 32, 96, 256]  # derived from the VAE factor 8
    hidden, pooled = module.base.encode_prompt(PROMPTS)
    latents, t, condition = torch.randn(2, 4, 4, 4), torch.tensor([10, 700]), torch.rand(2, 3, 32, 32)
    alone = module.base.predict_noise(latents, t, hidden, pooled)
    assert torch.equal(alone, module.base.predict_noise(latents, t, hidden, pooled, module.controlnet, condition))
    gauss = sdxl_module(sdxl_folder, block="gauss", block_std=0.1)
    assert not torch.equal(alone, gauss.base.predict_noise(latents, t, hidden, pooled, gauss.controlnet, condition))


@pytest.mark.parametrize("block, settings, step_zero_equal", [
    ("single", {}, True), ("controlnet_lora", {"lora": LORA}, True), ("controlnet_xs", {"xs": XS}, False)])
def test_the_other_blocks_train_and_sample_on_sdxl(sdxl_folder, block, settings, step_zero_equal):
    module = sdxl_module(sdxl_folder, block=block, **settings)
    hidden, pooled = module.base.encode_prompt(PROMPTS)
    latents, t, condition = torch.randn(2, 4, 4, 4), torch.tensor([10, 700]), torch.rand(2, 3, 32, 32)
    alone, controlled = module.base.predict_noise(latents, t, hidden, pooled), module.base.predict_noise(latents, t, hidden, pooled,
                                                                                                         module.controlnet, condition)
    # ControlNet-XS's fused model recomputes the base: equal to float rounding at step 0, as on SD (test_architectures.py)
    assert torch.equal(alone, controlled) if step_zero_equal else torch.allclose(alone, controlled, atol=1e-3)
    images = module.base(PROMPTS, condition, module.controlnet, num_inference_steps=2, guidance_scale=2.0)
    assert images.shape == (2, 3, 32, 32) and images.isfinite().all()


def test_two_controlnets_compose_on_sdxl_each_with_its_scale(sdxl_folder):
    first, second = sdxl_module(sdxl_folder, block="gauss", block_std=0.05), sdxl_module(sdxl_folder, block="gauss", block_std=0.05)
    conditions = [torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)]

    def sample(nets, condition, scale):
        return first.base(PROMPTS, condition, nets, num_inference_steps=2, guidance_scale=2.0, conditioning_scale=scale,
                          generator=torch.Generator().manual_seed(0))

    alone = sample(first.controlnet, conditions[0], 1.0)
    assert torch.equal(alone, sample([first.controlnet, second.controlnet], conditions, [1.0, 0.0]))  # the second scaled away
    assert not torch.equal(alone, sample([first.controlnet, second.controlnet], conditions, [1.0, 1.0]))


def test_full_adapter_xl_trains_and_samples_on_sdxls_encoder_as_diffusers_sdxl_adapter_pipeline(tiny_sdxl_folder):
    module = ControlNetModule(str(tiny_sdxl_folder), block="t2i_adapter", adapter=dict(ADAPTER, adapter_type="full_adapter_xl"),
                              hint_channels=None, num_val_images=0)
    assert module.controlnet.config.downscale_factor == 8  # twice the VAE factor 4: its first feature meets block 0 downsampled
    hidden, pooled = module.base.encode_prompt(PROMPTS)
    latents, t, condition = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.rand(2, 3, 32, 32)
    prediction = module.base.predict_noise(latents, t, hidden, pooled, module.controlnet, condition)
    prediction.pow(2).mean().backward()  # every feature reaches the UNet: each adapter block gets a gradient
    assert all(block.resnets[0].block1.weight.grad.abs().sum() > 0 for block in module.controlnet.adapter.body)
    harness = module.base(PROMPTS, condition, module.controlnet, num_inference_steps=2, guidance_scale=2.0,
                          generator=torch.Generator().manual_seed(0))
    pipeline = StableDiffusionXLAdapterPipeline.from_pretrained(str(tiny_sdxl_folder), adapter=module.controlnet)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    images = pipeline(PROMPTS, image=condition, num_inference_steps=2, guidance_scale=2.0, height=32, width=32, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    assert torch.allclose(harness, images * 2 - 1, atol=1e-4)  # the SDXL adapter pipeline returns NCHW tensors (SD's: NHWC numpy)


@pytest.mark.bad_input
def test_an_adapter_that_does_not_fit_the_encoder_is_refused_naming_the_key(tiny_sdxl_folder, sd_folder):
    with pytest.raises(ValueError, match=r"set block\.adapter\.adapter_type=full_adapter_xl, which fits this SDXL-shaped encoder"):
        ControlNetModule(str(tiny_sdxl_folder), block="t2i_adapter", adapter=ADAPTER, hint_channels=None, num_val_images=0)
    with pytest.raises(ValueError, match=r"block\.adapter\.adapter_type=full_adapter_xl fits SDXL's encoder"):
        ControlNetModule(str(sd_folder), block="t2i_adapter", adapter=dict(ADAPTER, adapter_type="full_adapter_xl"), hint_channels=None,
                         num_val_images=0)
    with pytest.raises(ConfigError, match=r"block\.adapter\.downscale_factor=4: .* a full_adapter_xl unshuffles by 8"):
        check_train_config(compose_train(["model=tiny_sdxl", "block=t2i_adapter", "block.adapter.adapter_type=full_adapter_xl",
                                          "block.adapter.downscale_factor=4"]))
    check_train_config(compose_train(["model=tiny_sdxl", "block=t2i_adapter", "block.adapter.adapter_type=full_adapter_xl"]))


def test_each_targets_original_size_and_crop_reach_the_size_conditioning(sdxl_folder):
    base = load_base(sdxl_folder)
    hidden, pooled = base.encode_prompt(PROMPTS)
    latents, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 700])
    geometry = torch.tensor([[48, 64, 0, 5], [32, 32, 0, 0]])  # (original height, width, crop top, left): crop_geometry's
    assert base.unet_inputs(latents, pooled, geometry)["added_cond_kwargs"]["time_ids"].tolist() == [[48, 64, 0, 5, 32, 32],
                                                                                                    [32, 32, 0, 0, 32, 32]]
    # Without (when generating): the target's size, uncropped, as the pipelines pass it.
    assert base.unet_inputs(torch.zeros(2, 4, 4, 8), pooled, None)["added_cond_kwargs"]["time_ids"].tolist() == [[32, 64, 0, 0, 32, 64]] * 2
    with_sizes = base.predict_noise(latents, t, hidden, pooled, geometry=geometry)
    assert not torch.equal(with_sizes[0], base.predict_noise(latents, t, hidden, pooled)[0])
    assert torch.equal(with_sizes[1], base.predict_noise(latents, t, hidden, pooled)[1])


def test_the_export_runs_in_diffusers_sdxl_controlnet_pipeline_as_in_the_harness(sdxl_folder, sd_data, tmp_path):
    module = sdxl_module(sdxl_folder, block="gauss", block_std=0.05)  # non-zero residuals: the ControlNet shows in the images
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=DataLoader(fill50k_dataset(sd_data, 32), batch_size=4))
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    export(ckpt, tmp_path / "export")
    assert "StableDiffusionXLControlNetPipeline.from_pretrained" in (tmp_path / "export" / "README.md").read_text()
    condition = torch.rand(2, 3, 32, 32)
    harness = module.base(PROMPTS, condition, module.controlnet, num_inference_steps=3, guidance_scale=5.0,
                          generator=torch.Generator().manual_seed(0))
    pipeline = StableDiffusionXLControlNetPipeline.from_pretrained(
        str(sdxl_folder), controlnet=ControlNetModel.from_pretrained(tmp_path / "export" / "controlnet"), add_watermarker=False)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    images = pipeline(PROMPTS, image=condition, num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    assert torch.allclose(harness, images * 2 - 1, atol=1e-4), (harness - (images * 2 - 1)).abs().max()


@pytest.mark.bad_input
def test_a_folder_of_another_family_is_refused_naming_the_key_and_what_was_found(sd_folder, sdxl_folder):
    with pytest.raises(BaseNotFoundError, match=r"model\.base\.pretrained_model_name_or_path=.*StableDiffusionPipeline.*model=sdxl"):
        PretrainedBaseSource(pretrained_model_name_or_path=str(sd_folder), pipeline="StableDiffusionXLPipeline").check()
    with pytest.raises(BaseNotFoundError, match=r"StableDiffusionXLPipeline.*model=sd15"):
        PretrainedBaseSource(pretrained_model_name_or_path=str(sdxl_folder), pipeline="StableDiffusionPipeline").check()
    PretrainedBaseSource(pretrained_model_name_or_path=str(sdxl_folder), pipeline="StableDiffusionXLPipeline").check()


@pytest.mark.bad_input
def test_sdxl_offline_without_weights_is_refused_naming_the_key():
    source = compose_train(["model=sdxl"]).model.base
    with pytest.raises(BaseNotFoundError, match=r"model\.base\.pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1\.0"):
        PretrainedBaseSource(**{key: value for key, value in source.items() if key != "_target_"}).check()


@pytest.mark.slow
def test_smoke_on_the_embedded_sdxl_base_pretrains_it_and_saves_it_as_sdxl(tmp_path):
    result = run_train(["model=tiny_sdxl", "experiment=smoke", "eval.fid_domain.enabled=false"], tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next((tmp_path / "outputs").rglob("results.json")).read_text())
    assert results["model"] == "tiny_sdxl" and results["global_step"] == 6 and results["base"]["pretraining"]["steps"] == {"vae": 20, "unet": 20}
    (folder,) = (tmp_path / "cache" / "base").glob("base-*")
    base = load_base(folder)
    assert isinstance(base, SDXLBase) and base.unet.config.addition_embed_type == "text_time" and base.vae_scale_factor == 4
    assert not base.pipeline.config.force_zeros_for_empty_prompt  # CFG's unconditional branch: the "" that prompt dropout trained
    saved_scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert not saved_scheduler["clip_sample"] and saved_scheduler["steps_offset"] == 1  # as SD and SDXL ship: latents are not clipped
