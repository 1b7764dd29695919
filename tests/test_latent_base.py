"""The latent (Stable Diffusion-family) path, on a tiny random SD-shaped pipeline built here and saved with
``save_pretrained``: the same loading code a Hub id such as SD 1.5 takes."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
from torch.utils.data import DataLoader

from conftest import compose_train, fill50k_dataset, run_train
from sd_fixtures import SD3_OBJECTIVE, sd_module
from controlnet_lab.config_checks import check_train_config
from controlnet_lab.bases import LatentBase, load_base
from controlnet_lab.bases.sources import BaseNotFoundError, PretrainedBaseSource
from controlnet_lab.data.encoded import EncodingStore
from controlnet_lab.export import export
from controlnet_lab.module import ControlNetModule


def batch_of(data: Path, size: int = 4) -> dict:
    return next(iter(DataLoader(fill50k_dataset(data, 32, count=size), batch_size=size)))


def test_loads_as_a_latent_base_with_the_scheduler_and_prediction_type_of_its_config(sd_folder):
    base = load_base(sd_folder)
    assert isinstance(base, LatentBase) and base.vae_scale_factor == 8 and base.resolution == 32
    assert type(base.scheduler).__name__ == "PNDMScheduler"
    assert type(base.noise_scheduler).__name__ == "DDPMScheduler"  # training noise, as diffusers' script
    assert base.noise_scheduler.config.beta_schedule == "scaled_linear" and base.noise_scheduler.config.prediction_type == "epsilon"


def test_zero_blocks_reproduce_the_base_prediction_at_step_zero(sd_folder, sd_data):
    module = sd_module(sd_folder, block="zero")
    batch = batch_of(sd_data)
    latents = torch.randn(4, 4, 4, 4)
    hidden, _ = module.base.encode_prompt(batch["prompt"])
    alone = module.base.predict_noise(latents, torch.tensor([10, 200, 500, 900]), hidden)
    controlled = module.base.predict_noise(latents, torch.tensor([10, 200, 500, 900]), hidden, None, module.controlnet, batch["condition"])
    assert torch.equal(alone, controlled)
    gauss = sd_module(sd_folder, block="gauss", block_std=0.1)
    assert not torch.equal(alone, gauss.base.predict_noise(latents, torch.tensor([10, 200, 500, 900]), hidden, None, gauss.controlnet, batch["condition"]))


@pytest.mark.bad_input
def test_the_hint_encoder_must_reach_the_latent_resolution(sd_folder):
    with pytest.raises(ValueError, match=r"model\.controlnet\.hint_channels=\[16, 32\].*give 4 entries"):
        ControlNetModule(str(sd_folder), hint_channels=(16, 32), num_val_images=0)


def test_without_hint_channels_the_paper_encoder_is_derived_from_the_vae_factor_and_recorded(sd_folder):
    module = ControlNetModule(str(sd_folder), hint_channels=None, num_val_images=0)
    encoder = module.controlnet.controlnet_cond_embedding
    assert [block.out_channels for block in encoder.blocks[1::2]] == [32, 96, 256]  # the stride-2 stages: factor 8
    assert encoder.conv_in.out_channels == 16 and module.hparams.hint_channels == [16, 32, 96, 256]


@pytest.mark.parametrize("folder, settings", [("sd_folder", {}), ("sdxl_folder", {}),  # SDXL: its second text encoder too
                                              ("tiny_sd3_folder", {"objective": SD3_OBJECTIVE, "num_layers": 3})])  # SD3: the transformer
def test_training_leaves_the_locked_vae_unet_and_text_encoders_bitwise_unchanged(folder, settings, sd_data, tmp_path, request):
    module = ControlNetModule(str(request.getfixturevalue(folder)), hint_channels=None, num_val_images=0, resolution=32, lr=1e-2, **settings)
    before = {name: {k: v.clone() for k, v in part.state_dict().items()} for name, part in module.base.locked_modules().items()}
    copy_before = {k: v.clone() for k, v in module.controlnet.state_dict().items()}
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=DataLoader(fill50k_dataset(sd_data, 32, prompt_dropout=0.5), batch_size=4))
    for name, part in module.base.locked_modules().items():
        assert all(torch.equal(before[name][k], v) for k, v in part.state_dict().items()), name
    assert any(not torch.equal(copy_before[k], v) for k, v in module.controlnet.state_dict().items())


def test_export_generates_the_same_images_in_diffusers_own_controlnet_pipeline(sd_folder, sd_data, tmp_path):
    """The export loads with ControlNetModel.from_pretrained, and StableDiffusionControlNetPipeline over the base folder
    gives the harness's own images (same DDIM scheduler, seeds and steps, with classifier-free guidance)."""
    L.seed_everything(0)
    module = sd_module(sd_folder, block="gauss", block_std=0.05, base_name=str(sd_folder))  # as model=sd15 with a folder
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=DataLoader(fill50k_dataset(sd_data, 32), batch_size=4))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    trainer.save_checkpoint(ckpt)
    info = export(ckpt, tmp_path / "export")
    assert not info["base_copied"]  # a base given as a folder or id is named, not copied
    card = (tmp_path / "export" / "README.md").read_text()
    assert "library_name: diffusers" in card and "controlnet" in card
    assert "base_model:" not in card  # the card's field names Hub models; this base is a local folder, named in the text
    assert f"StableDiffusionControlNetPipeline.from_pretrained('{sd_folder}', controlnet=controlnet)" in card

    batch = batch_of(sd_data, 2)
    seeds = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731
    ours = module.base(batch["prompt"], condition=batch["condition"], controlnet=module.controlnet, num_inference_steps=3,
                       guidance_scale=3.0, generator=seeds())
    controlnet = ControlNetModel.from_pretrained(tmp_path / "export" / "controlnet")
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(str(sd_folder), controlnet=controlnet, safety_checker=None,
                                                                  requires_safety_checker=False)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    theirs = pipeline(batch["prompt"], image=batch["condition"], num_inference_steps=3, guidance_scale=3.0, generator=seeds(),
                      output_type="pt", height=32, width=32).images * 2 - 1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    alone = module.base(batch["prompt"], num_inference_steps=3, guidance_scale=3.0, generator=seeds())
    assert (ours - alone).abs().max() > 1e-3  # the trained ControlNet acts


def test_training_starts_from_an_existing_controlnet(sd_folder, tmp_path):
    module = sd_module(sd_folder, block="gauss", block_std=0.05)
    module.controlnet.save_pretrained(tmp_path / "net")
    again = sd_module(sd_folder, block="zero", controlnet_path=str(tmp_path / "net"))
    assert all(torch.equal(a, b) for a, b in zip(module.controlnet.state_dict().values(), again.controlnet.state_dict().values()))
    with pytest.raises(FileNotFoundError, match=r"model\.controlnet\.pretrained_model_name_or_path=.*missing"):
        sd_module(sd_folder, controlnet_path=str(tmp_path / "missing"))


@pytest.mark.bad_input
def test_a_missing_hub_id_offline_names_the_key_and_the_id():
    with pytest.raises(BaseNotFoundError, match=r"model\.base\.pretrained_model_name_or_path=nobody/no-such-model: .*not in the local.*\(hf download nobody/no-such-model\)"):
        PretrainedBaseSource(pretrained_model_name_or_path="nobody/no-such-model").check()
    with pytest.raises(BaseNotFoundError, match="no model_index.json"):
        PretrainedBaseSource(pretrained_model_name_or_path=str(Path(__file__).parent)).check()


@pytest.mark.bad_input
def test_train_on_sd15_offline_without_weights_stops_before_any_work(tmp_path):
    result = run_train(["model=sd15", "experiment=smoke"], tmp_path, timeout=120)
    assert result.returncode != 0
    assert "model.base.pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5" in result.stderr
    assert "huggingface_hub" not in result.stderr  # our error, not a trace from inside the hub client
    assert not (tmp_path / "cache").exists()  # no data generated, nothing pretrained


@pytest.mark.slow
@pytest.mark.parametrize("model, folder, residuals", [("sd15", "sd_folder", 5), ("sdxl", "sdxl_folder", 7)])  # SDXL's 2 layers a block
def test_smoke_trains_on_a_saved_folder(model, folder, residuals, tmp_path, request):
    """model=sd15 (sdxl) pointed at a local folder, with experiment=smoke: how a user checks a new setup."""
    folder = request.getfixturevalue(folder)
    result = run_train([f"model={model}", f"model.base.pretrained_model_name_or_path={folder}", "experiment=smoke", "data.resolution=32",
                        "model.sampling.guidance_scale=2.0", "model.sampling.num_inference_steps=2", "eval.fid_domain.enabled=false"],
                       tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next((tmp_path / "outputs").rglob("results.json")).read_text())
    assert results["model"] == model and results["global_step"] == 6
    assert results["base"]["path"] == str(folder) and "mask_iou" in results["metrics"]
    encodings = tmp_path / "cache" / "encodings"
    assert len(list(encodings.glob("images-*"))) == 2 and len(list(encodings.glob("text-*"))) == 2  # training and held-out samples
    # SDXL's pooled text is cached beside the hidden states; SD has none.
    assert all((EncodingStore(store).column("text_pooled") is not None) == (model == "sdxl") for store in encodings.glob("text-*"))

    # The run's checkpoint through the other entry points, unchanged for the user.
    run_dir = next((tmp_path / "outputs").rglob("results.json")).parent
    source = next(Path(results["data_root"]).rglob("source/*.png"))
    sampled = run_train([f"ckpt={run_dir}", f"condition={source}", "prompt=red circle with blue background", "sampling.num_inference_steps=2",
                         "sampling.guidance_scale=2.0", "sampling.resolution_weighting=paper"], tmp_path, script="src/sample.py")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    report = json.loads(next((tmp_path / "outputs" / "sample").rglob("samples.json")).read_text())
    assert report["sampling"]["resolution"] == 32 and len(report["sampling"]["resolution_weights"]) == residuals  # 4x4 and 2x2 latents
    rescored = run_train([f"ckpt={run_dir}", "eval.num_images=4"], tmp_path, script="eval/evaluate.py")
    assert rescored.returncode == 0, rescored.stderr[-3000:]
    exported = run_train([f"ckpt={run_dir}", f"out={tmp_path / 'export'}"], tmp_path, script="src/export.py")
    assert exported.returncode == 0 and (tmp_path / "export" / "controlnet" / "config.json").is_file()
    assert (tmp_path / "export" / "eval_samples.png").is_file() and "## Training config" in (tmp_path / "export" / "README.md").read_text()


@pytest.mark.parametrize("model", ["tiny", "tiny_sd", "sd15", "tiny_sdxl", "sdxl", "tiny_sd3", "sd3"])
@pytest.mark.parametrize("experiment", ["smoke", "ablation_block", "ablation_prompt_dropout", "ablation_dataset_size", "ablation_condition",
                                        "ablation_block_sdxl", "ablation_block_sd3", "ablation_architecture", "ablation_gauss_std",
                                        "decisive_gauss", "decisive_lite", "decisive_dropout", "decisive_sudden",
                                        "decisive_architecture"])
def test_every_model_composes_with_the_experiments(model, experiment):
    cfg = compose_train([f"model={model}", f"experiment={experiment}"])
    assert cfg.model.name == model  # the command line's model=, also over an experiment's own and cfg.model.base._target_.startswith("controlnet_lab.bases.sources.")
    if model not in ("sd15", "sdxl", "sd3"):  # named bases: their folder or id is checked when the run starts
        check_train_config(cfg)
    if experiment == "smoke":
        assert cfg.model.base.pretrain.max_steps == 20 and (model == "tiny" or cfg.model.base.pretrain.vae.max_steps == 20)


@pytest.mark.slow
def test_smoke_on_the_embedded_latent_base_pretrains_the_vae_then_the_unet(tmp_path):
    # All 200 samples but the held-out ones: the ControlNet trains on the pool the base pretrained on.
    result = run_train(["model=tiny_sd", "experiment=smoke", "eval.fid_domain.enabled=false", "data.size=null", "data.generator.count=200"],
                       tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next((tmp_path / "outputs").rglob("results.json")).read_text())
    pretraining = results["base"]["pretraining"]
    assert pretraining["steps"] == {"vae": 20, "unet": 20} and pretraining["vae_reconstruction_mae_255"] > 0
    assert 0 < pretraining["vae_scaling_factor"] and results["model"] == "tiny_sd" and results["global_step"] == 6
    (base,) = (tmp_path / "cache" / "base").glob("base-*")
    assert isinstance(load_base(base), LatentBase) and (base / "vae" / "config.json").is_file()
    assert json.loads((base / "vae" / "config.json").read_text())["scaling_factor"] == pretraining["vae_scaling_factor"]
    # The VAE encoded each image once: the pretraining's encodings of the pool served the ControlNet's training too.
    # (a VAE fingerprinted differently after saving and loading would have made a third store for the training set)
    assert len(list((tmp_path / "cache" / "encodings").glob("images-*"))) == 2  # the pool and the held-out set


def test_gradient_checkpointing_gives_the_same_gradients(sd_folder, sd_data):
    batch = batch_of(sd_data)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = sd_module(sd_folder, block="gauss", block_std=0.05, gradient_checkpointing=checkpointing)
        module.train()
        module.diffusion_loss(batch, torch.Generator().manual_seed(3)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.controlnet.parameters() if p.grad is not None]))
    assert module.controlnet.is_gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1])


def test_a_bf16_locked_base_trains_and_samples_an_fp32_controlnet(sd_folder, sd_data):
    """As diffusers' script with --mixed_precision bf16: the locked parts in bf16, the ControlNet in fp32."""
    module = sd_module(sd_folder, block="gauss", block_std=0.05, base_dtype="bfloat16")
    assert module.vae.dtype == module.locked_unet.dtype == module.text_encoder.dtype == torch.bfloat16
    assert module.controlnet.dtype == torch.float32
    batch = batch_of(sd_data, 2)
    loss = module.diffusion_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad.dtype == torch.float32 for p in module.controlnet.parameters() if p.grad is not None)
    images = module.base(batch["prompt"], condition=batch["condition"], controlnet=module.controlnet, num_inference_steps=2,
                         guidance_scale=2.0, resolution_weighting="paper")
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_the_regression_target_follows_the_base_prediction_type(sd_folder, sd_data, tmp_path):
    """SD 2.x (768-v) bases predict v: the loss regresses the scheduler's velocity, read from the base's scheduler config."""
    import shutil

    folder = tmp_path / "sd_v"
    shutil.copytree(sd_folder, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    batch = batch_of(sd_data, 2)
    losses = {}
    for name, base_folder in (("epsilon", sd_folder), ("v_prediction", folder)):
        module = sd_module(base_folder)
        assert module.base.noise_scheduler.config.prediction_type == name
        losses[name] = module.diffusion_loss(batch, torch.Generator().manual_seed(0))
    # Same weights, draws and prediction: only the target differs (epsilon vs sqrt(a) eps - sqrt(1-a) x0).
    assert not torch.isclose(losses["epsilon"], losses["v_prediction"])
    generator = torch.Generator().manual_seed(0)
    latents = module.base.latents(module.base.image_encoding(batch["target"]), generator)
    noise = torch.randn(latents.shape, generator=generator)
    steps = torch.randint(0, 1000, (2,), generator=generator)
    hidden, _ = module.base.encode_prompt(batch["prompt"])
    noisy = module.base.noise_scheduler.add_noise(latents, noise, steps)
    prediction = module.base.predict_noise(noisy, steps, hidden, None, module.controlnet, batch["condition"])
    expected = torch.nn.functional.mse_loss(prediction, module.base.noise_scheduler.get_velocity(latents, noise, steps))
    torch.testing.assert_close(losses["v_prediction"], expected)
