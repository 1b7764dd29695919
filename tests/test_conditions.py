import numpy as np
import pytest
import torch
from matplotlib.colors import CSS4_COLORS

from conftest import PALETTE, compose_train, fill50k_dataset
from controlnet_lab.bases import load_base
from controlnet_lab.config_checks import ConfigError, check_train_config
from controlnet_lab.data.colors import parse_prompt
from controlnet_lab.data.conditions import SEG_COLORS, condition_maker, detector_device_for, detector_settings
from controlnet_lab.data.fill50k import read_index
from controlnet_lab.data.samples import load_rgb
from controlnet_lab.evaluation.prompts import INSUFFICIENT_PROMPT, OUT_OF_VOCABULARY_PROMPT, PROMPT_SETTINGS, setting_prompts
from controlnet_lab.data.outlines import condition_mask


def _sample(tiny_data, index: int = 0, resolution: int = 32):
    record = read_index(tiny_data)[index]
    return load_rgb(record.source, resolution), load_rgb(record.target, resolution), f"source/{index}.png"


def _ring_distance(mask: np.ndarray) -> np.ndarray:
    """Per pixel: distance in pixels to the boundary of ``mask``."""
    import cv2

    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    outside = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 3)
    return np.maximum(inside, outside)


def test_seg_is_the_enclosed_circle_in_two_flat_colors(tiny_data):
    source, target, name = _sample(tiny_data)
    seg = condition_maker("seg", 32)(source, target, name)
    mask = condition_mask(source)
    assert (seg[mask] == SEG_COLORS["circle"]).all() and (seg[~mask] == SEG_COLORS["background"]).all()


@pytest.mark.parametrize("name", ["canny", "sketch"])
def test_edge_conditions_trace_the_circle_boundary(tiny_data, name):
    source, target, record_name = _sample(tiny_data)
    condition = condition_maker(name, 32)(source, target, record_name)
    assert condition.shape == source.shape and condition.dtype == np.uint8
    lines = condition.max(axis=-1) > 32
    assert lines.sum() > 10
    distance = _ring_distance(condition_mask(source))
    assert np.median(distance[lines]) <= 2.0  # strokes lie on the circle's boundary
    assert not np.array_equal(lines, source.max(axis=-1) > 32)  # and are not the stored outline itself


def test_sketch_is_fixed_per_sample_and_differs_between_samples(tiny_data):
    maker = condition_maker("sketch", 32)
    source, target, name = _sample(tiny_data, 0)
    assert np.array_equal(maker(source, target, name), maker(source, target, name))
    assert not np.array_equal(maker(source, target, name), maker(source, target, "source/1.png"))


def test_dataset_serves_the_condition_and_keeps_the_outline_for_scoring(tiny_data):
    outline_item = fill50k_dataset(tiny_data, 16)[2]
    seg_item = fill50k_dataset(tiny_data, 16, make_condition=condition_maker("seg", 16))[2]
    assert np.array_equal(seg_item["source"], outline_item["condition"])
    assert not np.array_equal(seg_item["condition"], outline_item["condition"])


@pytest.mark.bad_input
def test_condition_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.condition='depth'"):
        check_train_config(compose_train(["data.condition=depth"]))
    with pytest.raises(ConfigError, match="data.detector_weights"):
        check_train_config(compose_train(["data.condition=hed"]))


def test_a_detector_network_runs_on_the_gpu_when_there_is_one(monkeypatch):
    assert detector_device_for("canny", "cuda") == "cpu"  # OpenCV: on the CPU whatever the setting
    assert detector_device_for("hed", "auto") == "cpu"  # this machine has no CUDA device
    with pytest.raises(ValueError, match="data.detector_device=cuda: this machine has no CUDA device"):
        detector_device_for("hed", "cuda")
    with pytest.raises(ConfigError, match="data.detector_device='gpu'"):
        check_train_config(compose_train(["data.detector_device=gpu"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert detector_device_for("hed", "auto") == "cuda" and detector_device_for("hed", "cuda:1") == "cuda:1"
    # maps a GPU made are cached apart from the CPU's (other float kernels); the CPU's key is what it was
    assert detector_settings("hed", 64, "w", (100, 200), "cuda:1")["device"] == "cuda"
    assert "device" not in detector_settings("hed", 64, "w", (100, 200), "cpu")


def test_a_detector_with_weights_loads_them_from_a_local_folder(tmp_path):
    from controlnet_aux.hed import ControlNetHED_Apache2

    torch.manual_seed(0)
    torch.save(ControlNetHED_Apache2().state_dict(), tmp_path / "ControlNetHED.pth")  # random weights, as the file is named
    detect = condition_maker("hed", 64, str(tmp_path), device=detector_device_for("hed", "auto"))
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    edges = detect(image, image, "")
    assert edges.shape == (64, 64, 3) and edges.dtype == np.uint8 and edges.std() > 0


def test_prompt_settings(tiny_data):
    true_prompts = [r.prompt for r in read_index(tiny_data)]
    palette = list(PALETTE)
    assert setting_prompts("none", true_prompts, palette, 0) == [""] * len(true_prompts)
    assert setting_prompts("insufficient", true_prompts, palette, 0) == [INSUFFICIENT_PROMPT] * len(true_prompts)
    assert setting_prompts("perfect", true_prompts, palette, 0) == true_prompts
    conflicting = setting_prompts("conflicting", true_prompts, palette, 0)
    assert conflicting == setting_prompts("conflicting", true_prompts, palette, 0)
    for true, other in zip(true_prompts, conflicting):
        named, other_named = parse_prompt(true), parse_prompt(other)
        assert other_named is not None and not set(named) & set(other_named)
    assert setting_prompts("out_of_vocabulary", true_prompts, palette, 0) == [OUT_OF_VOCABULARY_PROMPT] * len(true_prompts)
    assert PROMPT_SETTINGS == ("none", "insufficient", "out_of_vocabulary", "conflicting", "perfect")


def test_the_insufficient_prompt_is_known_to_the_base_and_names_no_color(tiny_base):
    tokenizer = load_base(tiny_base).tokenizer
    ids = tokenizer(INSUFFICIENT_PROMPT)["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) == len(INSUFFICIENT_PROMPT.split()) + 2  # + <bos>, <eos>
    assert not set(INSUFFICIENT_PROMPT.split()) & set(CSS4_COLORS)
    # The paper's literal sentence is out of this base's vocabulary: reported as its own setting.
    assert tokenizer(OUT_OF_VOCABULARY_PROMPT)["input_ids"].count(tokenizer.unk_token_id) == 6
