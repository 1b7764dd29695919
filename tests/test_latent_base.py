"""The latent (Stable Diffusion-family) path, on a tiny random SD-shaped pipeline built here and saved with
``save_pretrained``: the same loading code a Hub id such as SD 1.5 takes."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, PNDMScheduler, StableDiffusionControlNetPipeline,
                       StableDiffusionPipeline, UNet2DConditionModel)
from torch.utils.data import DataLoader
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conftest import compose_train, fill50k_dataset, run_train
from controlnet_lab.config_checks import check_train_config
from controlnet_lab.bases import LatentBase, load_base
from controlnet_lab.bases.sources import BaseNotFoundError, PretrainedBase
from controlnet_lab.data.datamodule import Fill50kDataModule
from controlnet_lab.data import encoded as encoded_module
from controlnet_lab.data.encoded import EncodedDataset, EncodingStore, LockedEncodings, StoreWriter
from controlnet_lab.export import export
from controlnet_lab.locked_encodings import TargetImages, cached_encodings
from controlnet_lab.module import ControlNetModule

SD_HINT_CHANNELS = (16, 32, 96, 256)  # the sd15 config's condition encoder: VAE factor 8


def clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer over single characters (no merges): no download needed."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("-,.'")
    vocab = {token: i for i, token in enumerate(["<|startoftext|>", "<|endoftext|>", *letters, *[c + "</w>" for c in letters]])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=24, pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory) -> Path:
    """SD 1.5's layout at toy size: VAE factor 8, a 2-level UNet with cross-attention, CLIP text, PNDM (as SD 1.5 ships)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sd")
    tokenizer = clip_tokenizer(root / "tokenizer_src")
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=24, pad_token_id=1, bos_token_id=0, eos_token_id=1))
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=32)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(root / "sd")
    return root / "sd"


@pytest.fixture(scope="session")
def sd_data(tmp_path_factory) -> Path:
    from controlnet_lab.data.synthetic import SyntheticFill50kSpec, write_fill50k

    spec = SyntheticFill50kSpec(count=24, resolution=32, palette=("red", "green", "blue", "yellow"), radius_range=(0.2, 0.35),
                                outline_thickness=1, seed=0)
    return write_fill50k(spec, tmp_path_factory.mktemp("sd_data") / "fill")


def sd_module(sd_folder: Path, **kwargs) -> ControlNetModule:
    return ControlNetModule(str(sd_folder), hint_channels=SD_HINT_CHANNELS, num_val_images=0, resolution=32, **kwargs)


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


def test_training_leaves_the_locked_vae_unet_and_text_encoder_bitwise_unchanged(sd_folder, sd_data, tmp_path):
    module = sd_module(sd_folder, lr=1e-2)
    before = {name: {k: v.clone() for k, v in part.state_dict().items()} for name, part in module.base.locked_modules().items()}
    copy_before = {k: v.clone() for k, v in module.controlnet.state_dict().items()}
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=DataLoader(fill50k_dataset(sd_data, 32, prompt_dropout=0.5), batch_size=4))
    for name, part in module.base.locked_modules().items():
        assert all(torch.equal(before[name][k], v) for k, v in part.state_dict().items()), name
    assert any(not torch.equal(copy_before[k], v) for k, v in module.controlnet.state_dict().items())


def stacked(rows) -> torch.Tensor:
    return torch.stack([rows[i] for i in range(len(rows))])


def test_cached_and_computed_encodings_give_the_same_loss(sd_folder, sd_data, tmp_path):
    module = sd_module(sd_folder, block="gauss", block_std=0.05)
    dataset = fill50k_dataset(sd_data, 32, count=6)
    encodings = cached_encodings(module.base, "fingerprint", dataset, tmp_path, batch_size=4)  # two batches, one shard
    images = stacked(encodings.images)
    assert images.shape == (6, 8, 4, 4)  # posterior mean and log-variance of 4 latent channels at 32/8
    assert set(encodings.prompt_rows) == set(dataset.prompts) | {""}
    with torch.no_grad():
        assert torch.equal(images, module.base.image_encoding(stacked(TargetImages(dataset))))  # what the VAE computes, bit for bit
    reread = cached_encodings(module.base, "fingerprint", dataset, tmp_path)  # from the store this time
    assert torch.equal(stacked(reread.images), images) and torch.equal(stacked(reread.text_hidden), stacked(encodings.text_hidden))
    computed = next(iter(DataLoader(dataset, batch_size=6)))
    without_targets = fill50k_dataset(sd_data, 32, count=6, with_target=False)  # as the training loader serves cached latents
    without_targets.samples.targets.read = None  # a target's pixels are never decoded
    cached = next(iter(DataLoader(EncodedDataset(without_targets, reread), batch_size=6, num_workers=2)))  # workers open the shards
    assert "target" not in cached and torch.equal(cached["condition"], computed["condition"])
    losses = [module.diffusion_loss(batch, torch.Generator().manual_seed(7)) for batch in (computed, cached)]
    assert torch.equal(losses[0], losses[1])
    assert not torch.equal(losses[0], module.diffusion_loss(computed, torch.Generator().manual_seed(8)))


def test_the_encoding_store_is_written_in_shards_and_read_row_by_row(tmp_path, monkeypatch):
    writer = StoreWriter(tmp_path / "store", torch.bfloat16, shard_bytes=3 * 2 * 4)  # 3 rows of 4 bf16 values a shard
    rows = torch.randn(8, 4)
    for start in range(0, 8, 2):
        writer.add(x=rows[start : start + 2])
    writer.finish(note="kept")
    store = EncodingStore(tmp_path / "store")
    assert [s["rows"] for s in store.index["shards"]] == [4, 4] and store.extra == {"note": "kept"}
    column = store.column("x")
    assert len(column) == 8 and column[5].dtype == torch.float32
    assert torch.equal(stacked(column), rows.to(torch.bfloat16).float())
    assert store.column("absent") is None
    with pytest.raises(IndexError):
        column[8]
    monkeypatch.setattr(encoded_module, "OPEN_SHARDS", 1)  # one shard open at a time: each read reopens the other
    fresh = store.column("x")
    assert torch.equal(torch.stack([fresh[i] for i in (0, 5, 1, 7)]), rows[[0, 5, 1, 7]].to(torch.bfloat16).float())
    assert len(fresh._handles) == 1


def test_the_training_loader_reads_no_targets_when_their_latents_are_cached(sd_data, tmp_path):
    data = Fill50kDataModule(root=str(sd_data), name="sd", resolution=32, batch_size=4, val_size=4, cache_dir=tmp_path)
    data.setup()
    assert "target" in next(iter(data.train_dataloader()))
    data.train_encodings = LockedEncodings(images=torch.zeros(len(data.train_rows), 8, 4, 4))
    batch = next(iter(data.train_dataloader()))
    assert "target" not in batch and batch["image_encoding"].shape == (4, 8, 4, 4) and batch["condition"].shape == (4, 3, 32, 32)
    data.train_encodings = LockedEncodings(text_hidden=torch.zeros(1, 2, 3), prompt_rows={p: 0 for p in [*data.prompts(), ""]})
    assert "target" in next(iter(data.train_dataloader()))  # text alone cached: the VAE still encodes each target


def test_encodings_are_keyed_by_the_locked_parts_and_samples(sd_folder, sd_data, tmp_path):
    base = load_base(sd_folder)
    cached_encodings(base, "a", fill50k_dataset(sd_data, 32, count=4), tmp_path)
    cached_encodings(base, "b", fill50k_dataset(sd_data, 32, count=4), tmp_path)  # another base fingerprint, the same VAE
    cached_encodings(base, "a", fill50k_dataset(sd_data, 32, count=5), tmp_path)
    store = tmp_path / "encodings"
    assert len(list(store.glob("images-*"))) == 2 and len(list(store.glob("text-*"))) >= 2
    with torch.no_grad():
        base.vae.decoder.conv_out.bias.add_(1.0)  # the decoder changes nothing the cache holds, but the VAE is another one
        base.vae.encoder.conv_out.bias.add_(1.0)
    cached_encodings(base, "a", fill50k_dataset(sd_data, 32, count=4), tmp_path)
    assert len(list(store.glob("images-*"))) == 3
    assert cached_encodings(base, "a", fill50k_dataset(sd_data, 32, count=4), tmp_path, images=False).images is None


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
        PretrainedBase(pretrained_model_name_or_path="nobody/no-such-model").check()
    with pytest.raises(BaseNotFoundError, match="no model_index.json"):
        PretrainedBase(pretrained_model_name_or_path=str(Path(__file__).parent)).check()


@pytest.mark.bad_input
def test_train_on_sd15_offline_without_weights_stops_before_any_work(tmp_path):
    result = run_train(["model=sd15", "experiment=smoke"], tmp_path, timeout=120)
    assert result.returncode != 0
    assert "model.base.pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5" in result.stderr
    assert "huggingface_hub" not in result.stderr  # our error, not a trace from inside the hub client
    assert not (tmp_path / "cache").exists()  # no data generated, nothing pretrained


def test_smoke_trains_on_a_saved_sd_folder(sd_folder, tmp_path):
    """model=sd15 pointed at a local folder, with experiment=smoke: how a user checks a new setup."""
    result = run_train(["model=sd15", f"model.base.pretrained_model_name_or_path={sd_folder}", "experiment=smoke", "data.resolution=32",
                        "model.sampling.guidance_scale=2.0", "model.sampling.num_inference_steps=2", "eval.fid_domain.enabled=false"],
                       tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next((tmp_path / "outputs").rglob("results.json")).read_text())
    assert results["model"] == "sd15" and results["global_step"] == 6
    assert results["base"]["path"] == str(sd_folder) and "mask_iou" in results["metrics"]
    encodings = tmp_path / "cache" / "encodings"
    assert len(list(encodings.glob("images-*"))) == 2 and len(list(encodings.glob("text-*"))) == 2  # training and held-out samples

    # The run's checkpoint through the other entry points, unchanged for the user.
    run_dir = next((tmp_path / "outputs").rglob("results.json")).parent
    source = next(Path(results["data_root"]).rglob("source/*.png"))
    sampled = run_train([f"ckpt={run_dir}", f"condition={source}", "prompt=red circle with blue background", "num_inference_steps=2",
                         "guidance_scale=2.0", "resolution_weighting=paper"], tmp_path, script="src/sample.py")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    report = json.loads(next((tmp_path / "outputs" / "sample").rglob("samples.json")).read_text())
    assert report["sampling"]["resolution"] == 32 and len(report["sampling"]["resolution_weights"]) == 5  # SD-shaped: 4x4 and 2x2 latents
    rescored = run_train([f"ckpt={run_dir}", "eval.num_images=4"], tmp_path, script="eval/evaluate.py")
    assert rescored.returncode == 0, rescored.stderr[-3000:]
    exported = run_train([f"ckpt={run_dir}", f"out={tmp_path / 'export'}"], tmp_path, script="src/export.py")
    assert exported.returncode == 0 and (tmp_path / "export" / "controlnet" / "config.json").is_file()
    assert (tmp_path / "export" / "eval_samples.png").is_file() and "## Training config" in (tmp_path / "export" / "README.md").read_text()


@pytest.mark.parametrize("model", ["tiny", "tiny_sd", "sd15"])
@pytest.mark.parametrize("experiment", ["smoke", "ablation_block", "ablation_prompt_dropout", "ablation_dataset_size", "ablation_condition"])
def test_every_model_composes_with_the_experiments(model, experiment):
    cfg = compose_train([f"model={model}", f"experiment={experiment}"])
    assert cfg.model.name == model and cfg.model.base._target_.startswith("controlnet_lab.bases.sources.")
    if model != "sd15":
        check_train_config(cfg)
    if experiment == "smoke":
        assert cfg.model.base.pretrain.max_steps == 20 and (model == "tiny" or cfg.model.base.pretrain.vae.max_steps == 20)


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


def test_computing_the_cache_draws_nothing_from_the_run_random_state(sd_folder, sd_data, tmp_path):
    """A run that computes its cache and one that reads it must train alike: computing it (over a dataset with
    prompt dropout) leaves Python's and torch's random state untouched."""
    import random

    base = load_base(sd_folder)
    random.seed(0)
    torch.manual_seed(0)
    cached_encodings(base, "fingerprint", fill50k_dataset(sd_data, 32, prompt_dropout=0.5), tmp_path, workers=2)
    after = (random.random(), torch.rand(1))
    random.seed(0)
    torch.manual_seed(0)
    assert after == (random.random(), torch.rand(1))
