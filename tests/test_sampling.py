import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from diffusers import ControlNetModel, UNet2DConditionModel
from hydra import compose, initialize_config_dir
from PIL import Image

from conftest import ROOT, compose_train, run_train
from controlnet_lab.bases import load_base
from controlnet_lab.blocks import build_trainable_copy, connection_convs
from controlnet_lab.data.fill50k import read_index
from controlnet_lab.evaluation.held_out import generate
from controlnet_lab.generation import sample
from controlnet_lab.sampling import Sampling, control_residuals, resolution_weights, residual_heights

PROMPTS = ["red circle with blue background", "green circle with yellow background"]


@pytest.fixture(scope="module")
def pipeline(tiny_base):
    return load_base(tiny_base)


def _acting(pipeline, block, seed):
    """A ControlNet whose connection convs are no longer zero, as after training."""
    torch.manual_seed(seed)
    copy = build_trainable_copy(pipeline.unet, block, (16,), std=0.02)
    for _, conv in connection_convs(copy):
        torch.nn.init.normal_(conv.weight, std=0.1)
    return copy.eval()


def _conditions(count=2, seed=3):
    return torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _residual_heights_of(controlnet, unet, condition_size=None):
    size = unet.config.sample_size
    condition_size = condition_size or size
    hidden = torch.zeros(1, 4, unet.config.cross_attention_dim)
    pooled = torch.zeros(1, unet.config.cross_attention_dim) if unet.config.class_embed_type == "projection" else None
    down, mid = controlnet(torch.zeros(1, 3, size, size), 10, encoder_hidden_states=hidden, controlnet_cond=torch.zeros(1, 3, condition_size, condition_size),
                           class_labels=pooled, return_dict=False)
    return [r.shape[-2] for r in [*down, mid]]


@torch.no_grad()
@pytest.mark.parametrize("block", ["zero", "single"])
def test_resolution_weights_match_both_formulas_for_the_tiny_base(pipeline, block):
    heights = residual_heights(pipeline.unet.config)
    assert heights == _residual_heights_of(_acting(pipeline, block, 0), pipeline.unet) == [16, 16, 8, 8, 4, 4, 4]
    assert resolution_weights("paper", heights) == [16 / h for h in heights] == [1, 1, 2, 2, 4, 4, 4]
    assert resolution_weights("code", heights) == pytest.approx([0.825 ** (6 - i) for i in range(7)])
    assert resolution_weights("off", heights) == resolution_weights("uniform", heights) == [1.0] * 7


@torch.no_grad()
def test_resolution_weights_on_sd15_shaped_blocks_match_the_paper_and_diffusers_guess_mode():
    """Four levels of two layers at 64 px: SD 1.5's 13 residuals, 64 ... 8 high (paper: h = 8, 16, ..., 64)."""
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(8, 8, 8, 8), layers_per_block=2, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2, in_channels=3, out_channels=3)
    heights = residual_heights(unet.config)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 4, 4, 4))
    for _, conv in connection_convs(controlnet):
        torch.nn.init.normal_(conv.weight, std=0.1)
    assert heights == _residual_heights_of(controlnet, unet, condition_size=512) == [64] * 3 + [32] * 3 + [16] * 3 + [8] * 4
    assert resolution_weights("paper", heights) == [1] * 3 + [2] * 3 + [4] * 3 + [8] * 4
    code = resolution_weights("code", heights)
    assert code == pytest.approx([0.825 ** (12 - i) for i in range(13)]) and code[-1] == 1.0

    inputs = dict(sample=torch.randn(1, 3, 64, 64), timestep=10, encoder_hidden_states=torch.randn(1, 4, 8),
                  controlnet_cond=torch.rand(1, 3, 512, 512), return_dict=False)
    plain_down, plain_mid = controlnet(**inputs)
    guess_down, guess_mid = controlnet(**inputs, guess_mode=True)
    guess_scales = [(g.abs().sum() / p.abs().sum()).item() for g, p in zip([*guess_down, guess_mid], [*plain_down, plain_mid])]
    assert code == pytest.approx(guess_scales, abs=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["uniform", "paper", "code"])
def test_with_cfg_resolution_weighting_conditions_only_the_conditional_branch(pipeline, mode):
    controlnet = _acting(pipeline, "zero", 1)
    sample = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    hidden, pooled = pipeline.encode_prompt(["", PROMPTS[0]])
    condition = _conditions(1)
    down, mid = control_residuals(controlnet, sample, 500, hidden, {"class_labels": pooled}, condition, 1.0, mode, guided=True)
    plain_down, plain_mid = controlnet(sample[1:], 500, encoder_hidden_states=hidden[1:], controlnet_cond=condition,
                                       class_labels=pooled[1:], return_dict=False)
    weights = resolution_weights(mode, residual_heights(pipeline.unet.config))
    for residual, plain, weight in zip([*down, mid], [*plain_down, plain_mid], weights, strict=True):
        assert torch.count_nonzero(residual[0]) == 0  # the unconditional branch gets no control
        assert torch.equal(residual[1], plain[0] * weight)
        assert plain.abs().sum() > 0


@torch.no_grad()
def test_the_evaluation_conditioning_scale_scales_the_control_and_zero_is_the_base_alone(pipeline):
    controlnet, conditions = _acting(pipeline, "zero", 1), _conditions(2)
    settings = dict(batch_size=2, seed=5, desc="test")
    at = lambda scale: Sampling(num_inference_steps=3, guidance_scale=1.0, conditioning_scale=scale)  # noqa: E731
    alone = generate(pipeline, None, conditions, PROMPTS, sampling=at(1.0), **settings)
    assert np.array_equal(generate(pipeline, controlnet, conditions, PROMPTS, sampling=at(0.0), **settings), alone)
    full = generate(pipeline, controlnet, conditions, PROMPTS, sampling=at(1.0), **settings)
    doubled = generate(pipeline, controlnet, conditions, PROMPTS, sampling=at(2.0), **settings)
    assert not np.array_equal(full, alone) and not np.array_equal(doubled, full)


@torch.no_grad()
def test_without_resolution_weighting_both_branches_see_the_condition(pipeline):
    controlnet = _acting(pipeline, "zero", 1)
    sample = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    hidden, pooled = pipeline.encode_prompt([PROMPTS[0], PROMPTS[0]])
    down, mid = control_residuals(controlnet, sample, 500, hidden, {"class_labels": pooled}, _conditions(1), 1.0, "off", guided=True)
    assert all(torch.equal(r[0], r[1]) and r[0].abs().sum() > 0 for r in [*down, mid])


@pytest.mark.bad_input
def test_resolution_weighting_without_guidance_is_refused(pipeline):
    """With guidance_scale=1 there is no unconditional branch to keep the condition from; `paper` would only
    multiply the deep residuals of the single branch (x4 here)."""
    with pytest.raises(ValueError, match="resolution_weighting=paper needs classifier-free guidance"):
        pipeline(PROMPTS, condition=_conditions(len(PROMPTS)), controlnet=_acting(pipeline, "zero", 1), num_inference_steps=2,
                 guidance_scale=1.0, resolution_weighting="paper")


def _generate(pipeline, controlnet, condition, scale, mode="paper"):
    return pipeline(PROMPTS, condition=condition, controlnet=controlnet, num_inference_steps=3, guidance_scale=2.0,
                    conditioning_scale=scale, resolution_weighting=mode, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_two_controlnets_one_at_scale_zero_give_exactly_the_other(pipeline):
    first, lite = _acting(pipeline, "zero", 1), _acting(pipeline, "single", 2)
    first_condition, lite_condition = _conditions(seed=3), _conditions(seed=4)
    alone = _generate(pipeline, first, first_condition, 1.0)
    composed = _generate(pipeline, [first, lite], [first_condition, lite_condition], [1.0, 0.0])
    assert torch.equal(alone, composed)
    with_lite = _generate(pipeline, [first, lite], [first_condition, lite_condition], [1.0, 1.0])
    assert not torch.equal(alone, with_lite)  # the second net does act at scale 1


@torch.no_grad()
def test_two_identical_controlnets_at_half_scale_equal_one_at_full_scale(pipeline):
    controlnet, condition = _acting(pipeline, "gauss", 5), _conditions(seed=6)
    one = _generate(pipeline, controlnet, condition, 1.0, mode="off")
    two = _generate(pipeline, [controlnet, controlnet], [condition, condition], [0.5, 0.5], mode="off")
    assert torch.equal(one, two)
    assert not torch.equal(one, _generate(pipeline, controlnet, condition, 0.5, mode="off"))


def compose_sample(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="sample", overrides=overrides)


@pytest.fixture(scope="module")
def condition_folder(tiny_data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("conditions")
    for record in read_index(tiny_data)[:3]:
        Image.open(record.source).save(folder / record.source.name)
    return folder


def test_the_same_seed_and_settings_give_the_same_image_twice(trained_checkpoints, condition_folder, tmp_path):
    common = [f"ckpt={trained_checkpoints['zero']}", f"condition={condition_folder}", f"prompt={PROMPTS[0]}", "sampling.num_inference_steps=3",
              "sampling.guidance_scale=2.0", "sampling.resolution_weighting=code", "batch_size=2"]
    runs = {}
    for name, seeds in [("first", "[0,7]"), ("again", "[0,7]"), ("other", "[1]")]:
        sample(compose_sample([*common, f"seeds={seeds}", f"paths.output_dir={tmp_path / name}"]))
        runs[name] = json.loads((tmp_path / name / "samples.json").read_text())
    assert len(runs["first"]["images"]) == 6 and (tmp_path / "first" / "grid.png").is_file()
    for record in runs["first"]["images"]:
        assert (tmp_path / "first" / record["file"]).read_bytes() == (tmp_path / "again" / record["file"]).read_bytes()
    seed0 = [r for r in runs["first"]["images"] if r["seed"] == 0]
    other = runs["other"]["images"]
    assert all((tmp_path / "first" / a["file"]).read_bytes() != (tmp_path / "other" / b["file"]).read_bytes() for a, b in zip(seed0, other))
    assert runs["first"]["sampling"]["resolution_weights"] == pytest.approx([0.825 ** (6 - i) for i in range(7)])
    assert runs["first"]["images"][0]["conditions"] == [str(sorted(condition_folder.iterdir())[0])]


@pytest.mark.slow
def test_sample_entry_point_composes_two_controlnets_under_the_prompt_settings(trained_checkpoints, tiny_data, condition_folder, tmp_path):
    """The second ControlNet gets its condition from ordinary images through controlnet-aux's canny detector; another diffusers scheduler."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for record in read_index(tiny_data)[:3]:
        Image.open(record.target).save(photos / record.target.name)
    ckpts = f"[{trained_checkpoints['zero']},{trained_checkpoints['single']}]"
    result = run_train([f"ckpt={ckpts}", f"condition=[{condition_folder},{photos}]", "detector=[null,canny]",
                        "sampling.conditioning_scale=[1.0,0.5]", f"prompt={PROMPTS[0]}", "prompt_settings=true", "sampling.num_inference_steps=2",
                        "scheduler=DPMSolverMultistepScheduler",
                        f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, script="src/sample.py")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "samples.json").read_text())
    assert sorted(report["grids"]) == ["conflicting", "insufficient", "none", "out_of_vocabulary", "perfect"]
    assert all((tmp_path / "run" / grid).is_file() for grid in report["grids"].values())
    prompts = {r["setting"]: r["prompt"] for r in report["images"]}
    assert prompts["none"] == "" and prompts["perfect"] == PROMPTS[0] and prompts["conflicting"] not in ("", PROMPTS[0])
    assert [n["conditioning_scale"] for n in report["controlnets"]] == [1.0, 0.5]
    assert [n["detector"] for n in report["controlnets"]] == [None, "canny"]
    assert report["sampling"]["scheduler"] == "DPMSolverMultistepScheduler"


@pytest.mark.parametrize("override, message", [
    ("condition=/nowhere.png", "condition=/nowhere.png"),
    ("detector=sobel", "detector='sobel'"),
    ("detector=hed", "set detector_weights"),
    ("scheduler=NoSuchScheduler", "scheduler='NoSuchScheduler'"),
    ("sampling.resolution_weighting=loud", "sampling.resolution_weighting='loud'"),
    ("sampling.resolution_weighting=paper", "sampling.resolution_weighting=paper needs classifier-free guidance"),  # guidance_scale=1 by default
    ("sampling.conditioning_scale=[1,2,3]", "sampling.conditioning_scale has 3 entries"),
    ("prompt=[a,b]", "prompt has 2 entries for 3 conditions"),
])
@pytest.mark.bad_input
def test_bad_sampling_input_names_its_key(trained_checkpoints, condition_folder, tmp_path, override, message):
    cfg = compose_sample([f"ckpt={trained_checkpoints['zero']}", f"condition={condition_folder}", f"paths.output_dir={tmp_path}", override])
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("[", r"\[")):
        sample(cfg)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.bad_input
def test_controlnets_of_different_bases_are_not_composed(trained_checkpoints, tiny_data, condition_folder, tmp_path):
    from conftest import compose_train, train_checkpoint
    from controlnet_lab.bases import build_pixel_base

    other_base = tmp_path / "other_base"
    torch.manual_seed(123)  # other random weights than the session's tiny base
    build_pixel_base(OmegaConf.to_container(compose_train(["data.resolution=16"]).model.base, resolve=True), 16,
                     [r.prompt for r in read_index(tiny_data)]).save_pretrained(other_base)
    other = train_checkpoint(other_base, tiny_data, "zero", tmp_path, steps=1)
    cfg = compose_sample([f"ckpt=[{trained_checkpoints['zero']},{other}]", f"condition={condition_folder}", f"paths.output_dir={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match="different locked bases"):
        sample(cfg)


def test_the_sampling_settings_are_read_once_from_their_config_node():
    node = OmegaConf.create({"num_inference_steps": 4, "guidance_scale": 2.0, "resolution_weighting": False, "conditioning_scale": None})
    sampling = Sampling.from_config(node)  # YAML's unquoted off is false; a null key keeps its default
    assert sampling == Sampling(num_inference_steps=4, guidance_scale=2.0, resolution_weighting="off", conditioning_scale=1.0)
    assert sampling.kwargs() == {"num_inference_steps": 4, "guidance_scale": 2.0, "resolution_weighting": "off", "conditioning_scale": 1.0}
    callbacks = compose_train(["model.sampling.num_inference_steps=7"]).callbacks
    assert callbacks.fidelity_curve.sampling.num_inference_steps == 7 == callbacks.validation_images.sampling.num_inference_steps
