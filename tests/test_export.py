
import json
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline, UNet2DConditionModel
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModel

from conftest import compose_train, run_train, train_checkpoint
from controlnet_lab.bases import build_pixel_base, load_base
from controlnet_lab.controlnet_lite import ControlNetLiteModel
from controlnet_lab.data.fill50k import read_index
from controlnet_lab.export import base_fingerprint, checkpoint_path, export
from controlnet_lab.module import ControlNetModule

PROMPTS = ["red circle with blue background", "", "green circle with yellow background"]


def _inputs(pipeline, batch=3):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 3, 16, 16, generator=generator)
    condition = torch.rand(batch, 3, 16, 16, generator=generator)
    timesteps = torch.tensor([5, 400, 990])[:batch]
    hidden, pooled = pipeline.encode_prompt(PROMPTS[:batch])
    return sample, timesteps, hidden, pooled, condition


@torch.no_grad()
@pytest.mark.parametrize("block, diffusers_class", [("zero", ControlNetModel), ("gauss", ControlNetModel), ("single", ControlNetLiteModel)])
def test_export_then_load_gives_bitwise_the_same_noise_prediction(trained_checkpoints, tmp_path, block, diffusers_class):
    ckpt = trained_checkpoints[block]
    info = export(ckpt, tmp_path / "export")
    trained = ControlNetModule.load_from_checkpoint(ckpt, map_location="cpu")
    controlnet = diffusers_class.from_pretrained(str(tmp_path / "export" / "controlnet"), use_safetensors=True)
    pipeline = load_base(tmp_path / "export" / "base")

    sample, t, hidden, pooled, condition = _inputs(pipeline)
    expected = trained.base.predict_noise(sample, t, hidden, pooled, trained.controlnet, condition)
    exported = pipeline.predict_noise(sample, t, hidden, pooled, controlnet, condition)
    assert torch.equal(expected, exported)
    assert not torch.equal(expected, trained.base.predict_noise(sample, t, hidden, pooled))  # the ControlNet acts
    assert info["controlnet_class"] == diffusers_class.__name__ and info["block"] == block
    assert info["base_fingerprint"] == base_fingerprint(tmp_path / "export" / "base")
    card = (tmp_path / "export" / "README.md").read_text()  # diffusers' pipelines do not run the pixel base: the harness's loader
    assert f"load_trained('{tmp_path / 'export'}')" in card and "StableDiffusionControlNetPipeline" not in card
    weights = {p.suffix for p in (tmp_path / "export").rglob("*") if p.is_file() and p.suffix not in (".json", ".txt", ".md", ".png")}
    assert weights == {".safetensors"}  # nothing to unpickle


@pytest.mark.bad_input
def test_export_never_overwrites(trained_checkpoints, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="out="):
        export(trained_checkpoints["zero"], out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_export_entry_point_writes_the_folder_and_logs_it_as_a_wandb_model(trained_checkpoints, tmp_path):
    result = run_train([f"ckpt={trained_checkpoints['single']}", f"out={tmp_path / 'lite'}", "wandb=true"], tmp_path, script="src/export.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "lite" / "controlnet" / "config.json").is_file() and (tmp_path / "lite" / "export.json").is_file()
    # A model artifact (offline here: W&B's run log, synced later) holding the folder, the model card its description.
    artifact = json.loads(result.stdout[result.stdout.index("{"):])["wandb_artifact"]
    (log,) = trained_checkpoints["single"].parent.parent.glob("wandb/offline-run-*/run-*.wandb")
    recorded = log.read_bytes()
    assert artifact.startswith("controlnet-") and artifact.encode() in recorded
    assert all(part in recorded for part in (b"controlnet/config.json", b"export.json", b"README.md", b"trained with controlnet-lab"))
    with pytest.raises(FileNotFoundError, match="ckpt=.*nowhere: no checkpoint there"):  # what src/export.py runs first
        export(checkpoint_path(tmp_path / "nowhere"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@torch.no_grad()
def test_stable_diffusion_controlnet_pipeline_runs_the_exported_parts(tmp_path, tiny_data):
    """diffusers' own pipeline, built from the export, takes one DDIM step with CFG and matches the harness's pipeline.

    StableDiffusionControlNetPipeline passes no class labels, so this base leaves out the
    default's pooled-prompt projection; the VAE is a one-level AutoencoderKL (scale factor 1),
    unused with output_type="latent": the tiny base works in pixel space.
    """
    cfg = compose_train(["data.resolution=16", "model.base.unet.class_embed_type=null"])
    base = tmp_path / "base"
    build_pixel_base(OmegaConf.to_container(cfg.model.base, resolve=True), 16, [r.prompt for r in read_index(tiny_data)]).save_pretrained(base)
    out = tmp_path / "export"
    export(train_checkpoint(base, tiny_data, "gauss", tmp_path), out)

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8,), norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    scheduler = DDIMScheduler.from_pretrained(str(out / "base"), subfolder="scheduler")
    sd = StableDiffusionControlNetPipeline(
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(str(out / "base" / "text_encoder")),
        tokenizer=AutoTokenizer.from_pretrained(str(out / "base" / "tokenizer")),
        unet=UNet2DConditionModel.from_pretrained(str(out / "base" / "unet")),
        controlnet=ControlNetModel.from_pretrained(str(out / "controlnet")),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    condition = np.asarray(Image.open(read_index(tiny_data)[0].source).convert("RGB"))
    prompt = [PROMPTS[0]]
    latents = sd(prompt, image=Image.fromarray(condition), height=16, width=16, num_inference_steps=1, guidance_scale=2.0,
                 generator=torch.Generator().manual_seed(0), output_type="latent").images
    ours = load_base(out / "base")
    harness = ours(prompt, condition=torch.from_numpy(condition / 255.0).float().permute(2, 0, 1)[None],
                   controlnet=ControlNetModel.from_pretrained(str(out / "controlnet")), num_inference_steps=1, guidance_scale=2.0,
                   scheduler=DDIMScheduler.from_config(scheduler.config), generator=torch.Generator().manual_seed(0))
    without_control = ours(prompt, num_inference_steps=1, guidance_scale=2.0, scheduler=DDIMScheduler.from_config(scheduler.config),
                           generator=torch.Generator().manual_seed(0))
    assert latents.shape == (1, 3, 16, 16)
    torch.testing.assert_close(latents.clamp(-1, 1), harness, rtol=0, atol=1e-5)
    assert (harness - without_control).abs().max() > 1e-3  # the exported ControlNet took part
