"""The transformer (SD3) path, on model=tiny_sd3's base untrained and saved with ``StableDiffusion3Pipeline.save_pretrained``
(the loading code a Hub id such as stabilityai/stable-diffusion-3-medium-diffusers takes), without T5."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler, SD3ControlNetModel, StableDiffusion3ControlNetPipeline
from torch.utils.data import DataLoader
from torchvision.transforms.functional import to_pil_image

from conftest import compose_train, fill50k_dataset, run_train
from sd_fixtures import SD3_OBJECTIVE as OBJECTIVE
from controlnet_lab.bases import SD3Base, load_base
from controlnet_lab.bases.sources import BaseNotFoundError, PretrainedBaseSource
from controlnet_lab.blocks import connection_init_stds
from controlnet_lab.config_checks import ConfigError, check_train_config
from controlnet_lab.export import export
from controlnet_lab.module import ControlNetModule
from controlnet_lab.objective import objective_batch

PROMPTS = ["red circle with blue background", ""]


def sd3_module(folder, **kwargs) -> ControlNetModule:
    return ControlNetModule(str(folder), hint_channels=None, num_val_images=0, resolution=32, objective=OBJECTIVE, num_layers=3, **kwargs)


def inputs(base):
    hidden, pooled = base.encode_prompt(PROMPTS)
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10.0, 700.0]), hidden, pooled


def test_loads_as_sd3_without_t5_whose_part_of_the_text_is_zeros(tiny_sd3_folder):
    base = load_base(tiny_sd3_folder)
    assert isinstance(base, SD3Base) and base.text_encoder_3 is None and base.vae_scale_factor == 4 and base.resolution == 32
    hidden, pooled = base.encode_prompt(PROMPTS)
    # 12 CLIP tokens (both encoders' 64 channels side by side), then T5's 77 tokens: zeros without it, as diffusers gives
    assert hidden.shape == (2, 12 + 77, 128) and pooled.shape == (2, 128) and not hidden[:, 12:].any() and hidden[:, :12].any()
    assert set(base.locked_modules()) == {"locked_transformer", "text_encoder", "text_encoder_2", "vae"}


def test_zero_joins_reproduce_the_locked_transformer_at_step_zero_and_gaussian_ones_do_not(tiny_sd3_folder):
    module = sd3_module(tiny_sd3_folder, block="zero")
    assert isinstance(module.controlnet, SD3ControlNetModel) and len(module.controlnet.transformer_blocks) == 3
    assert module.base.denoiser.config.num_layers == 6  # copying 3 blocks left the locked transformer's own config as it was
    latents, t, hidden, pooled = inputs(module.base)
    condition = torch.rand(2, 3, 32, 32)
    alone = module.base.predict_noise(latents, t, hidden, pooled)
    assert torch.equal(alone, module.base.predict_noise(latents, t, hidden, pooled, module.controlnet, condition))
    gauss = sd3_module(tiny_sd3_folder, block="gauss", block_std="standard")
    stds = connection_init_stds(gauss.controlnet, "gauss", "standard")
    # PyTorch's default init of each join: a 64-wide linear layer, the condition's 1x1 patch conv on 4 latent channels
    assert stds["controlnet_blocks.0"] == pytest.approx(1 / (3 * 64) ** 0.5) and stds["pos_embed_input.proj"] == pytest.approx(1 / 12 ** 0.5)
    assert gauss.controlnet.controlnet_blocks[0].weight.std().item() == pytest.approx(stds["controlnet_blocks.0"], rel=0.05)
    assert not torch.equal(alone, gauss.base.predict_noise(latents, t, hidden, pooled, gauss.controlnet, condition))


def test_sampling_gives_the_controlnet_the_condition_latents_it_trained_on(tiny_sd3_folder):
    """What the pipeline hands the ControlNet when the harness samples is what training gives it (the condition in
    [-1, 1] through the VAE): a mismatch trains one input and samples with another."""
    module = sd3_module(tiny_sd3_folder, block="zero")
    given = []
    module.controlnet.register_forward_pre_hook(lambda net, args, kwargs: given.append(kwargs["controlnet_cond"]), with_kwargs=True)
    condition = torch.rand(2, 3, 32, 32)
    torch.manual_seed(1)  # the condition's VAE latents come from the global generator, in training as in the pipeline
    trained_on = module.base.condition_latents(condition)
    torch.manual_seed(1)
    module.base(PROMPTS, condition, module.controlnet, num_inference_steps=1, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(given[0], trained_on, atol=1e-6)


def test_flow_matching_noises_toward_the_velocity_with_the_scripts_weighting(tiny_sd3_folder):
    scheduler = load_base(tiny_sd3_folder).noise_scheduler
    latents = torch.randn(64, 4, 8, 8)
    plain = dict(OBJECTIVE, weighting_scheme="none", precondition_outputs=False)
    noisy, timesteps, target, weights = objective_batch(scheduler, latents, 0.0, plain, torch.Generator().manual_seed(0))
    sigmas = (timesteps / 1000).view(-1, 1, 1, 1)  # shift 1: each timestep is its sigma times 1,000
    assert torch.allclose(noisy, (1 - sigmas) * latents + sigmas * (target + latents), atol=1e-6)  # target = noise - latents
    assert torch.equal(weights, torch.ones_like(weights))
    _, timesteps, _, weights = objective_batch(scheduler, latents, 0.0, OBJECTIVE, torch.Generator().manual_seed(0))
    assert torch.allclose(weights, (timesteps / 1000).view(-1, 1, 1, 1) ** 2)  # preconditioned: the denoised latents' loss
    assert abs((timesteps / 1000).mean() - 0.5) < 0.1 and (timesteps / 1000).std() < 0.25  # logit-normal: around the middle
    assert objective_batch(DDPMScheduler(), latents, 0.0, None)[3] is None  # DDPM bases: unweighted, as before


def test_the_export_runs_in_diffusers_sd3_controlnet_pipeline_as_in_the_harness(tiny_sd3_folder, sd_data, tmp_path):
    module = sd3_module(tiny_sd3_folder, block="gauss", block_std=0.05)  # non-zero joins: the ControlNet shows in the images
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=DataLoader(fill50k_dataset(sd_data, 32), batch_size=4))
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    export(ckpt, tmp_path / "export")
    assert "StableDiffusion3ControlNetPipeline.from_pretrained" in (readme := (tmp_path / "export" / "README.md").read_text())
    assert "text_encoder_3=None, tokenizer_3=None" in readme
    assert json.loads((tmp_path / "export" / "base" / "transformer" / "config.json").read_text())["num_layers"] == 6
    condition = torch.randint(0, 256, (2, 3, 32, 32)) / 255.0  # what an 8-bit condition image holds
    torch.manual_seed(1)  # the pipeline draws the condition's VAE latents from the global generator, not the one it is given
    harness = module.base(PROMPTS, condition, module.controlnet, num_inference_steps=3, guidance_scale=2.0,
                          generator=torch.Generator().manual_seed(0))
    pipeline = StableDiffusion3ControlNetPipeline.from_pretrained(
        str(tmp_path / "export" / "base"), controlnet=SD3ControlNetModel.from_pretrained(tmp_path / "export" / "controlnet"),
        text_encoder_3=None, tokenizer_3=None)
    torch.manual_seed(1)
    images = pipeline(PROMPTS, control_image=[to_pil_image(c) for c in condition], num_inference_steps=3, guidance_scale=2.0, height=32, width=32, output_type="pt",
                      max_sequence_length=77, generator=torch.Generator().manual_seed(0)).images
    assert torch.allclose(harness, images * 2 - 1, atol=1e-4), (harness - (images * 2 - 1)).abs().max()
    without = module.base(PROMPTS, num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(harness, without, atol=1e-3)


def test_two_sd3_controlnets_compose_each_with_its_scale(tiny_sd3_folder):
    first, second = sd3_module(tiny_sd3_folder, block="gauss", block_std=0.05), sd3_module(tiny_sd3_folder, block="gauss", block_std=0.05)
    conditions = [torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)]

    def sample(nets, condition, scale):
        torch.manual_seed(1)  # the condition's VAE latents come from the global generator
        return first.base(PROMPTS, condition, nets, num_inference_steps=2, conditioning_scale=scale, generator=torch.Generator().manual_seed(0))

    alone = sample(first.controlnet, conditions[0], 1.0)
    assert torch.allclose(alone, sample([first.controlnet, second.controlnet], conditions, [1.0, 0.0]), atol=1e-5)  # the second scaled away
    assert not torch.allclose(alone, sample([first.controlnet, second.controlnet], conditions, [1.0, 1.0]), atol=1e-3)


@pytest.mark.bad_input
@pytest.mark.parametrize("override, message", [
    ("block=single", r"block=single is not defined on a transformer base"),
    ("block=t2i_adapter", r"block=t2i_adapter is not defined on a transformer base"),
    ("model.controlnet.hint_channels=[16,32,64]", r"model\.controlnet\.hint_channels=\[16, 32, 64\]: .* set it to null"),
    ("model.controlnet.num_layers=6", r"model\.controlnet\.num_layers=6: copy 1 to 5 of the base transformer's 6 blocks"),
    ("model.base.objective.weighting_scheme=uniform", r"model\.base\.objective\.weighting_scheme='uniform' is not one of"),
    ("model.base.noise_offset=0.3", r"model\.base\.noise_offset=0\.3: .* set it to 0"),
    ("data.resolution=30", r"data\.resolution=30 .* multiple of 4"),
    ("model.sampling.resolution_weighting=paper", r"model\.sampling\.resolution_weighting=paper: .* set it to off"),
])
def test_settings_a_transformer_base_cannot_take_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        check_train_config(compose_train(["model=tiny_sd3", override]))


@pytest.mark.bad_input
def test_a_unet_block_on_a_transformer_folder_is_refused_when_the_module_is_built(tiny_sd3_folder):
    with pytest.raises(ValueError, match=r"block=controlnet_xs is not defined on a transformer base"):
        sd3_module(tiny_sd3_folder, block="controlnet_xs")


@pytest.mark.bad_input
def test_a_folder_of_another_family_is_refused_for_model_sd3_and_sd3_offline_names_the_key(sd_folder, tiny_sd3_folder):
    with pytest.raises(BaseNotFoundError, match=r"StableDiffusionPipeline \(model=sd15\), not the StableDiffusion3Pipeline that model=sd3"):
        PretrainedBaseSource(pretrained_model_name_or_path=str(sd_folder), pipeline="StableDiffusion3Pipeline").check()
    with pytest.raises(BaseNotFoundError, match=r"StableDiffusion3Pipeline \(model=sd3\)"):
        PretrainedBaseSource(pretrained_model_name_or_path=str(tiny_sd3_folder), pipeline="StableDiffusionXLPipeline").check()
    source = compose_train(["model=sd3"]).model.base
    with pytest.raises(BaseNotFoundError, match=r"model\.base\.pretrained_model_name_or_path=stabilityai/stable-diffusion-3-medium-diffusers"):
        PretrainedBaseSource(**{key: value for key, value in source.items() if key != "_target_"}).check()


@pytest.mark.slow
def test_smoke_on_the_embedded_sd3_base_pretrains_it_with_flow_matching_and_samples_with_its_own_sampler(tmp_path):
    result = run_train(["model=tiny_sd3", "experiment=smoke", "eval.fid_domain.enabled=false"], tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next((tmp_path / "outputs").rglob("results.json")).read_text())
    assert results["model"] == "tiny_sd3" and results["global_step"] == 6 and results["base"]["pretraining"]["steps"] == {"vae": 20, "unet": 20}
    (folder,) = (tmp_path / "cache" / "base").glob("base-*")
    base = load_base(folder)
    assert isinstance(base, SD3Base) and base.vae.config.shift_factor == results["base"]["pretraining"]["vae_shift_factor"] != 0.0
    run_dir = next((tmp_path / "outputs").rglob("results.json")).parent
    source = next(Path(results["data_root"]).rglob("source/*.png"))
    sampled = run_train([f"ckpt={run_dir}", f"condition={source}", "prompt=red circle with blue background", "sampling.num_inference_steps=2"],
                        tmp_path, script="src/sample.py")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    report = json.loads(next((tmp_path / "outputs" / "sample").rglob("samples.json")).read_text())
    assert report["sampling"]["scheduler"] == "FlowMatchEulerDiscreteScheduler" and "resolution_weights" not in report["sampling"]
