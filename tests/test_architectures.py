"""The conditioning architectures since ControlNet on the block axis: ControlNet-LoRA and T2I-Adapter, on the tiny SD
base (tests/sd_fixtures.py) and, where the architecture fits it, the pixel base."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from conftest import ROOT, compose_train, every_traceback, fill50k_dataset, run_train
from sd_fixtures import SD_HINT_CHANNELS, sd_module
from controlnet_lab.config_checks import ConfigError, check_train_config
from controlnet_lab.controlnet_lora import connection_module_names, load_lora
from controlnet_lab.export import export
from controlnet_lab.module import ControlNetModule

LORA = OmegaConf.to_container(compose_train(["block=controlnet_lora"]).block.lora)


def batch_of(data, size: int = 4) -> dict:
    return next(iter(DataLoader(fill50k_dataset(data, 32, count=size), batch_size=size)))


def fit(module: ControlNetModule, data, tmp_path, steps: int = 3) -> L.Trainer:
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=DataLoader(fill50k_dataset(data, 32, prompt_dropout=0.5), batch_size=4))
    return trainer


def export_run(trainer: L.Trainer, tmp_path) -> dict:
    """The trained module's checkpoint, in a run's layout, exported to ``tmp_path/export``: export.json's content."""
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    trainer.save_checkpoint(ckpt)
    return export(ckpt, tmp_path / "export")


@pytest.mark.parametrize("in_full", [True, False])
def test_controlnet_lora_starts_as_the_base_and_trains_only_its_lora_and_connections(sd_folder, sd_data, tmp_path, in_full):
    """Step 0 predicts what the locked base predicts; training changes the LoRA layers (and, with connections_in_full,
    the zero convs and hint encoder), never the copy's own weights or the locked base."""
    module = sd_module(sd_folder, block="controlnet_lora", lora={**LORA, "connections_in_full": in_full}, lr=1e-2)
    batch, latents, t = batch_of(sd_data), torch.randn(4, 4, 4, 4), torch.tensor([10, 200, 500, 900])
    hidden, _ = module.base.encode_prompt(batch["prompt"])
    alone = module.base.predict_noise(latents, t, hidden)
    assert torch.equal(alone, module.base.predict_noise(latents, t, hidden, None, module.controlnet, batch["condition"]))
    connections = tuple(f"{name}." for name in connection_module_names(module.controlnet))
    full = sd_module(sd_folder, block="zero")
    # Outside the connections (which hold most of a toy copy: its hint encoder is SD's), LoRA trains a fraction.
    adapted = sum(p.numel() for k, p in module.controlnet.named_parameters() if p.requires_grad and not k.startswith(connections))
    assert 0 < adapted < sum(p.numel() for k, p in full.controlnet.named_parameters() if not k.startswith(connections)) / 2

    locked = {k: v.clone() for k, v in module.base.unet.state_dict().items()}
    copy = {k: v.clone() for k, v in module.controlnet.state_dict().items()}
    trainer = fit(module, sd_data, tmp_path)
    assert all(torch.equal(locked[k], v) for k, v in module.base.unet.state_dict().items())
    changed = {k for k, v in module.controlnet.state_dict().items() if not torch.equal(copy[k], v)}
    assert changed and all("lora_" in k or (in_full and k.startswith(connections)) for k in changed), sorted(changed)[:5]
    assert any("lora_B" in k for k in changed) and (not in_full or any(k.startswith("controlnet_down_blocks.") for k in changed))
    optimized = sum(p.numel() for group in trainer.optimizers[0].param_groups for p in group["params"])
    assert optimized == module.trainable_parameter_count()
    assert not torch.equal(alone, module.base.predict_noise(latents, t, hidden, None, module.controlnet, batch["condition"]))


def test_controlnet_lora_exports_merged_for_diffusers_pipeline_and_as_an_adapter(sd_folder, sd_data, tmp_path):
    """The export's controlnet/ is a ControlNetModel with the LoRA merged in: StableDiffusionControlNetPipeline gives the
    harness's images; controlnet_lora/ read back onto the base (load_lora) predicts what the trained copy predicts."""
    module = sd_module(sd_folder, block="controlnet_lora", lora=LORA, lr=1e-2, base_name=str(sd_folder))
    trainer = fit(module, sd_data, tmp_path, steps=2)
    info = export_run(trainer, tmp_path)
    assert info["controlnet_class"] == "ControlNetModel" and "load_lora" in info["load"]["lora"]
    assert "StableDiffusionControlNetPipeline" in (tmp_path / "export" / "README.md").read_text()

    batch = batch_of(sd_data, 2)
    seeds = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731
    ours = module.base(batch["prompt"], condition=batch["condition"], controlnet=module.controlnet, num_inference_steps=3,
                       guidance_scale=3.0, generator=seeds())
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(str(sd_folder), controlnet=ControlNetModel.from_pretrained(tmp_path / "export" / "controlnet"),
                                                                  safety_checker=None, requires_safety_checker=False)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    theirs = pipeline(batch["prompt"], image=batch["condition"], num_inference_steps=3, guidance_scale=3.0, generator=seeds(),
                      output_type="pt", height=32, width=32).images * 2 - 1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert (ours - module.base(batch["prompt"], num_inference_steps=3, guidance_scale=3.0, generator=seeds())).abs().max() > 1e-3

    adapter = load_lora(module.base.unet, tmp_path / "export" / "controlnet_lora", SD_HINT_CHANNELS)
    latents, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 600])
    hidden, _ = module.base.encode_prompt(batch["prompt"])
    expected = module.base.predict_noise(latents, t, hidden, None, module.controlnet, batch["condition"])
    assert torch.equal(expected, module.base.predict_noise(latents, t, hidden, None, adapter, batch["condition"]))


def test_controlnet_lora_trains_on_the_pixel_base_and_resumes_from_its_checkpoint(tiny_base, tiny_data, tmp_path):
    module = ControlNetModule(str(tiny_base), block="controlnet_lora", lora=LORA, lr=1e-2, num_val_images=0)
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=DataLoader(fill50k_dataset(tiny_data, 16), batch_size=8))
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    again = ControlNetModule.for_inference(tmp_path / "lora.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(module.controlnet.state_dict().values(), again.controlnet.state_dict().values(), strict=True))


@pytest.mark.bad_input
@pytest.mark.parametrize("override, message", [
    ("block.lora.target_modules=[to_q,nowhere]", r"block\.lora\.target_modules: \['nowhere'\] name no module"),
    ("block.lora.rank=0", r"block\.lora\.rank must be a positive integer"),
    ("block.lora.connections_in_full=sometimes", r"block\.lora\.connections_in_full must be true or false"),
])
def test_lora_settings_that_fit_no_controlnet_stop_the_run_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        check_train_config(compose_train(["block=controlnet_lora", override]))


ADAPTER = OmegaConf.to_container(compose_train(["block=t2i_adapter"]).block.adapter)


def test_t2i_adapter_trains_its_encoder_alone_and_adds_its_features_as_diffusers_does(sd_folder, sd_data, tmp_path):
    """No zero convs: the base's prediction changes from step 0 (the architecture does not promise otherwise). The
    training step's prediction is diffusers' formula (StableDiffusionAdapterPipeline's UNet call), training changes the
    adapter and never the locked UNet, and the adapter is a fraction of a ControlNet."""
    module = sd_module(sd_folder, block="t2i_adapter", adapter=ADAPTER, lr=1e-2)
    assert type(module.controlnet).__name__ == "T2IAdapter"
    assert module.trainable_parameter_count() < sd_module(sd_folder, block="zero").trainable_parameter_count() / 2
    batch, latents, t = batch_of(sd_data), torch.randn(4, 4, 4, 4), torch.tensor([10, 200, 500, 900])
    hidden, _ = module.base.encode_prompt(batch["prompt"])
    ours = module.base.predict_noise(latents, t, hidden, None, module.controlnet, batch["condition"], conditioning_scale=0.7)
    features = [f * 0.7 for f in module.controlnet(batch["condition"])]
    theirs = module.base.unet(latents, t, encoder_hidden_states=hidden, down_intrablock_additional_residuals=[f.clone() for f in features]).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert not torch.equal(ours, module.base.predict_noise(latents, t, hidden))

    locked = {k: v.clone() for k, v in module.base.unet.state_dict().items()}
    adapter = {k: v.clone() for k, v in module.controlnet.state_dict().items()}
    fit(module, sd_data, tmp_path)
    assert all(torch.equal(locked[k], v) for k, v in module.base.unet.state_dict().items())
    assert any(not torch.equal(adapter[k], v) for k, v in module.controlnet.state_dict().items())


def test_t2i_adapter_exports_for_diffusers_adapter_pipeline(sd_folder, sd_data, tmp_path):
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    with pytest.raises(ValueError, match=r"block\.adapter\.channels=\[16\]: a light_adapter gives features of \[16, 16\] channels, but the UNet's down blocks have \[16, 32\]"):
        sd_module(sd_folder, block="t2i_adapter", adapter={**ADAPTER, "adapter_type": "light_adapter"})
    module = sd_module(sd_folder, block="t2i_adapter", adapter=ADAPTER, lr=1e-2, base_name=str(sd_folder))
    trainer = fit(module, sd_data, tmp_path, steps=2)
    info = export_run(trainer, tmp_path)
    card = (tmp_path / "export" / "README.md").read_text()
    assert info["controlnet_class"] == "T2IAdapter" and f"StableDiffusionAdapterPipeline.from_pretrained('{sd_folder}', adapter=adapter)" in card

    batch = batch_of(sd_data, 2)
    seeds = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731
    ours = module.base(batch["prompt"], condition=batch["condition"], controlnet=module.controlnet, num_inference_steps=3,
                       guidance_scale=3.0, conditioning_scale=0.8, generator=seeds())
    pipeline = StableDiffusionAdapterPipeline.from_pretrained(str(sd_folder), adapter=T2IAdapter.from_pretrained(tmp_path / "export" / "controlnet"),
                                                              safety_checker=None, requires_safety_checker=False)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    theirs = pipeline(batch["prompt"], image=batch["condition"], num_inference_steps=3, guidance_scale=3.0, adapter_conditioning_scale=0.8,
                      generator=seeds(), output_type="np", height=32, width=32).images  # NHWC in [0, 1]
    torch.testing.assert_close(ours, torch.from_numpy(theirs).permute(0, 3, 1, 2) * 2 - 1, rtol=0, atol=1e-4)
    assert (ours - module.base(batch["prompt"], num_inference_steps=3, guidance_scale=3.0, generator=seeds())).abs().max() > 1e-3
    two = module.base(batch["prompt"], condition=[batch["condition"]] * 2, controlnet=[module.controlnet] * 2, num_inference_steps=3,
                      guidance_scale=3.0, conditioning_scale=[0.4, 0.4], generator=seeds())
    torch.testing.assert_close(two, ours, rtol=0, atol=1e-4)  # composed (MultiAdapter): 0.4 + 0.4 of the same adapter
    with pytest.raises(ValueError, match="resolution_weighting=paper weights ControlNet residuals"):
        module.base(batch["prompt"], condition=batch["condition"], controlnet=module.controlnet, guidance_scale=3.0, resolution_weighting="paper")


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides, message", [
    ([], r"block=t2i_adapter: the base UNet's down blocks \[0, 1\] .* have no cross-attention"),  # the pixel base
    (["model=tiny_sd", "block.adapter.downscale_factor=8"], r"block\.adapter\.downscale_factor=8: the base's latents are 4x smaller"),
    (["model=tiny_sd", "block.adapter.adapter_type=huge"], r"block\.adapter\.adapter_type='huge': choose one of full_adapter, light_adapter"),
    (["model=tiny_sd", "model.sampling.guidance_scale=2", "model.sampling.resolution_weighting=paper"],
     r"model\.sampling\.resolution_weighting=paper weights ControlNet residuals"),
])
def test_adapter_settings_that_fit_no_base_stop_the_run_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_train_config(compose_train(["block=t2i_adapter", *overrides]))


@pytest.mark.slow
def test_a_sweep_over_the_new_architectures_trains_scores_samples_and_tabulates_each(sd_folder_two_layers, tmp_path):
    """`-m block=controlnet_lora,t2i_adapter,controlnet_xs` on an SD folder (experiment=smoke): each job trains with the fidelity curve,
    validation images and the final evaluation, src/sample.py samples a checkpoint, and eval/tables.py puts them in one
    table with their trainable parameters."""
    result = run_train(["-m", "block=controlnet_lora,t2i_adapter,controlnet_xs", "++block.xs.size_ratio=0.5", "model=sd15",
                        f"model.base.pretrained_model_name_or_path={sd_folder_two_layers}",
                        "experiment=smoke", "data.resolution=32", "model.sampling.num_inference_steps=2", "eval.fid_domain.enabled=false"],
                       tmp_path, timeout=600)
    assert result.returncode == 0, every_traceback(result.stderr)
    (sweep,) = (tmp_path / "outputs" / "smoke" / "multiruns").iterdir()
    records = {r["block"]: r for r in (json.loads(p.read_text()) for p in sweep.glob("*/results.json"))}
    assert set(records) == {"controlnet_lora", "t2i_adapter", "controlnet_xs"} and all(r["global_step"] == 6 for r in records.values())
    assert all("mask_iou" in r["metrics"] and r["metrics"]["curve"] for r in records.values())
    assert records["t2i_adapter"]["metrics"]["block_init_std"] == {}  # no connection convs
    assert records["controlnet_lora"]["metrics"]["initial_output_change"]["mean_abs_change"] == 0.0  # zero convs: the base's at step 0
    assert records["controlnet_xs"]["metrics"]["initial_output_change"]["mean_abs_change"] < 1e-3  # the fused base path's own rounding
    assert records["t2i_adapter"]["metrics"]["initial_output_change"]["mean_abs_change"] > 0.0

    job = next(p.parent for p in sweep.glob("*/results.json") if "t2i_adapter" in p.parent.name)
    source = next(Path(records["t2i_adapter"]["data_root"]).rglob("source/*.png"))
    sampled = run_train([f"ckpt='{job}'", f"condition={source}", "prompt=red circle", "sampling.num_inference_steps=2"], tmp_path, script="src/sample.py")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    table = subprocess.run([sys.executable, str(ROOT / "eval" / "tables.py"), f"sweep={sweep}", "wandb=false"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr[-3000:]
    rows = (sweep / "table.csv").read_text().splitlines()
    assert rows[0].split(",")[0] == "block" and sorted(row.split(",")[0] for row in rows[1:]) == sorted(records)
    assert "metrics.trainable_params:mean" in rows[0]


XS = {**OmegaConf.to_container(compose_train(["block=controlnet_xs"]).block.xs), "size_ratio": 0.5}


def test_controlnet_xs_starts_as_the_base_trains_its_control_network_and_exports_its_adapter(sd_folder_two_layers, sd_data, tmp_path):
    """At step 0 the fused model with its control predicts exactly what it predicts without (zero-initialised
    connections), which is the locked UNet's prediction up to diffusers' own fused implementation of the base path
    (9.7e-5 at most on a mean magnitude of 0.22 here, the same in float64: not rounding). Training changes the control
    network only (its copy of the base stays the locked UNet's); the export's ControlNetXSAdapter, fused again with the
    base, predicts the same, and StableDiffusionControlNetXSPipeline samples the harness's images."""
    from diffusers import ControlNetXSAdapter, StableDiffusionControlNetXSPipeline, UNetControlNetXSModel

    folder = sd_folder_two_layers
    module = sd_module(folder, block="controlnet_xs", xs=XS, lr=1e-2, base_name=str(folder))
    batch, latents, t = batch_of(sd_data), torch.randn(4, 4, 4, 4), torch.tensor([10, 200, 500, 900])
    hidden, _ = module.base.encode_prompt(batch["prompt"])
    alone = module.base.predict_noise(latents, t, hidden)
    fused = module.controlnet
    controlled = fused(latents, t, encoder_hidden_states=hidden, controlnet_cond=batch["condition"], return_dict=False)[0]
    assert torch.equal(controlled, fused(latents, t, encoder_hidden_states=hidden, controlnet_cond=batch["condition"], apply_control=False).sample)
    assert torch.equal(controlled, module.base.predict_noise(latents, t, hidden, None, fused, batch["condition"]))
    torch.testing.assert_close(controlled, alone, rtol=0, atol=2e-4)
    def trained_beside_the_hint_encoder(net):  # SD's hint encoder is most of a toy ControlNet
        return sum(p.numel() for k, p in net.named_parameters() if p.requires_grad and not k.startswith("controlnet_cond_embedding."))

    assert trained_beside_the_hint_encoder(fused) < trained_beside_the_hint_encoder(sd_module(folder, block="zero").controlnet) / 2

    locked = {k: v.clone() for k, v in module.base.unet.state_dict().items()}
    before = {k: v.clone() for k, v in module.controlnet.named_parameters()}
    trainer = fit(module, sd_data, tmp_path, steps=2)
    assert all(torch.equal(locked[k], v) for k, v in module.base.unet.state_dict().items())
    changed = {k for k, v in module.controlnet.named_parameters() if not torch.equal(before[k], v)}
    frozen = {k for k, v in module.controlnet.named_parameters() if not v.requires_grad}
    assert changed and not changed & frozen and frozen
    info = export_run(trainer, tmp_path)
    assert info["controlnet_class"] == "ControlNetXSAdapter"
    assert f"StableDiffusionControlNetXSPipeline.from_pretrained('{folder}', controlnet=controlnet)" in (tmp_path / "export" / "README.md").read_text()

    adapter = ControlNetXSAdapter.from_pretrained(tmp_path / "export" / "controlnet")
    expected = module.base.predict_noise(latents, t, hidden, None, module.controlnet, batch["condition"])
    assert not torch.equal(expected, alone)
    again = UNetControlNetXSModel.from_unet(module.base.unet, adapter)
    torch.testing.assert_close(module.base.predict_noise(latents, t, hidden, None, again, batch["condition"]), expected, rtol=0, atol=1e-6)

    batch = batch_of(sd_data, 2)
    seeds = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731
    ours = module.base(batch["prompt"], condition=batch["condition"], controlnet=module.controlnet, num_inference_steps=3,
                       guidance_scale=3.0, conditioning_scale=0.9, generator=seeds())
    pipeline = StableDiffusionControlNetXSPipeline.from_pretrained(str(folder), controlnet=adapter, safety_checker=None, requires_safety_checker=False)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    theirs = pipeline(batch["prompt"], image=batch["condition"], num_inference_steps=3, guidance_scale=3.0, controlnet_conditioning_scale=0.9,
                      generator=seeds(), output_type="pt", height=32, width=32).images * 2 - 1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides, message", [
    (["model=tiny_sd"], r"ControlNet-XS blocks take 2 ResNet layers per block .* layers_per_block=1 \(model\.base\.unet\.layers_per_block\)"),
    (["model=tiny_sd", "model.base.unet.layers_per_block=2", "block.xs.size_ratio=0"], r"block\.xs\.size_ratio must be in \(0, 1\]"),
    (["model=tiny_sd", "model.base.unet.layers_per_block=2", "block.xs.time_embedding_mix=0.5"], r"needs block\.xs\.learn_time_embedding=true"),
    (["model.base.unet.layers_per_block=2"], r"no class embedding.*model\.base\.unet\.class_embed_type=projection"),  # the pixel base
    (["model=tiny_sd", "model.base.unet.layers_per_block=2"], r"block\.xs\.size_ratio=0\.1 gives the control network \[3, 6, 6\] channels, fewer "
                                                              r"than the base's 8 attention heads; the smallest ratio this base allows is 0\.25"),
])
def test_xs_settings_that_fit_no_base_stop_the_run_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_train_config(compose_train(["block=controlnet_xs", *overrides]))
