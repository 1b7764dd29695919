import json
import random
import subprocess
import sys

import cv2
import numpy as np
import pytest

from controlnet_lab.data.colors import parse_prompt, rgb_of
from controlnet_lab.data.control_datamodule import permutation, training_subset
from conftest import fill50k_dataset
from controlnet_lab.data.fill50k import DatasetFormatError, fill50k_samples, read_index
from controlnet_lab.data.synthetic import SyntheticFill50kSpec, write_fill50k
from controlnet_lab.data.outlines import condition_mask
from controlnet_lab.data.samples import crop_geometry, fit_square


def split_indices(total: int, val_size: int, size: int | None, split_seed: int):
    """(train, held-out) rows as ControlDataModule.setup draws them, without duplicates to exclude."""
    order = permutation(total, val_size, split_seed)
    return training_subset(order[val_size:], size, "test"), order[:val_size]


def test_reader_reads_what_the_generator_writes(tiny_data):
    records = read_index(tiny_data)
    assert len(records) == 48
    lines = [json.loads(line) for line in (tiny_data / "prompt.json").read_text().splitlines()]
    assert set(lines[0]) == {"source", "target", "prompt"}
    assert lines[0]["source"] == "source/0.png" and lines[0]["target"] == "target/0.png"
    assert parse_prompt(lines[0]["prompt"]) is not None


def test_fill50k_conventions_ranges_and_rgb_order(tiny_data):
    sample = fill50k_dataset(tiny_data, 16)[0]
    condition, target = sample["condition"], sample["target"]
    assert condition.shape == target.shape == (3, 16, 16)
    assert condition.min() == 0 and 0.8 < condition.max() <= 1.0  # anti-aliased: a sub-pixel ring need not fill a pixel
    assert target.min() >= -1 and target.max() <= 1
    # The background pixel's RGB, read back, is the prompt's background color in RGB order, not BGR.
    circle, background = parse_prompt(sample["prompt"])
    corner = ((target[:, 0, 0] + 1) * 127.5).round().int().tolist()
    assert tuple(corner) == rgb_of(background)
    mask = condition_mask((condition.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    pixels = ((target.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(int)
    # Inside the outline's circle (its anti-aliased edge aside) the target is the circle's color exactly, in RGB order.
    interior = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert interior.any() and (np.abs(pixels[interior] - rgb_of(circle)).sum(axis=1) == 0).all()
    # On the edge, pixels are blends; those the mask counts are nearer the circle's color than the background's.
    nearer = np.linalg.norm(pixels[mask] - rgb_of(circle), axis=1) <= np.linalg.norm(pixels[mask] - rgb_of(background), axis=1)
    assert nearer.mean() > 0.9


def test_reader_resizes_to_the_configured_resolution(tiny_data):
    sample = fill50k_dataset(tiny_data, 8)[3]
    assert sample["condition"].shape == (3, 8, 8)
    assert sample["geometry"].tolist() == [16, 16, 0, 0]  # (original size, crop): 16 px images shrunk whole to 8


@pytest.mark.parametrize("height, width, geometry", [(48, 64, [48, 64, 0, 5]), (80, 40, [80, 40, 16, 0]), (32, 32, [32, 32, 0, 0])])
def test_crop_geometry_names_the_crop_the_geometry_rule_takes(height, width, geometry):
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert crop_geometry(height, width, 32).tolist() == geometry
    _, _, top, left = geometry
    scale = 32 / min(height, width)
    resized = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    assert np.array_equal(fit_square(image, 32), resized[top : top + 32, left : left + 32])


def test_generator_is_deterministic(tmp_path):
    spec = SyntheticFill50kSpec(count=5, resolution=16, palette=("red", "blue", "white"), radius_range=(0.2, 0.3), outline_thickness=1, seed=3)
    a, b = write_fill50k(spec, tmp_path / "a"), write_fill50k(spec, tmp_path / "b")
    assert (a / "prompt.json").read_text() == (b / "prompt.json").read_text()
    assert (a / "target" / "4.png").read_bytes() == (b / "target" / "4.png").read_bytes()


@pytest.mark.bad_input
def test_generator_rejects_unknown_color(tmp_path):
    spec = SyntheticFill50kSpec(count=5, resolution=16, palette=("red", "blurple"), radius_range=(0.2, 0.3), outline_thickness=1, seed=0)
    with pytest.raises(ValueError, match="blurple"):
        write_fill50k(spec, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _copy(src, dst):
    dst.mkdir()
    for sub in ("source", "target"):
        (dst / sub).mkdir()
        for i in range(3):
            (dst / sub / f"{i}.png").write_bytes((src / sub / f"{i}.png").read_bytes())
    lines = (src / "prompt.json").read_text().splitlines()[:3]
    (dst / "prompt.json").write_text("\n".join(lines) + "\n")
    return dst


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: (d / "prompt.json").unlink(), r"prompt\.json: missing"),
        (lambda d: (d / "prompt.json").write_text('{"source": "source/0.png", "target": "target/0.png", "prompt": "x"}\nnot json\n'), r"prompt\.json, line 2: not valid JSON"),
        (lambda d: (d / "prompt.json").write_text('{"source": "source/0.png", "prompt": "x"}\n'), r"line 1: lacks key\(s\) target"),
        (lambda d: (d / "target" / "1.png").unlink(), r"line 2: image .*target/1\.png does not exist"),
        (lambda d: (d / "source" / "2.png").write_bytes(b"not a png"), r"line 3: image .*source/2\.png is unreadable"),
        (lambda d: cv2.imwrite(str(d / "target" / "0.png"), np.zeros((8, 8, 3), np.uint8)), r"line 1: source .*0\.png is 16x16 but target .*0\.png is 8x8"),
    ],
)
@pytest.mark.bad_input
def test_broken_dataset_errors_name_file_and_line(tiny_data, tmp_path, breakage, message):
    broken = _copy(tiny_data, tmp_path / "broken")
    breakage(broken)
    with pytest.raises(DatasetFormatError, match=message):
        fill50k_samples(broken)


def test_splits_are_nested_and_validation_fixed():
    small, val_a = split_indices(1000, 100, 50, split_seed=0)
    large, val_b = split_indices(1000, 100, 500, split_seed=0)
    assert set(small) <= set(large)
    assert np.array_equal(val_a, val_b)
    assert not set(val_a) & set(large)


@pytest.mark.bad_input
def test_size_larger_than_dataset_names_the_key():
    with pytest.raises(ValueError, match=r"data\.size=2000 exceeds the 900"):
        split_indices(1000, 100, 2000, split_seed=0)


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_prompt_dropout_rate_is_respected(tiny_data, rate):
    dataset = fill50k_dataset(tiny_data, 8, prompt_dropout=rate)
    draws = 2000
    random.seed(0)
    empty = sum(dataset[i % len(dataset)]["prompt"] == "" for i in range(draws))
    tolerance = 4 * (draws * rate * (1 - rate)) ** 0.5  # 4 binomial standard deviations
    assert abs(empty - rate * draws) <= tolerance


def test_prompt_dropout_is_redrawn_and_seeded(tiny_data):
    dataset = fill50k_dataset(tiny_data, 8, prompt_dropout=0.5)
    random.seed(1)
    first = [dataset[0]["prompt"] for _ in range(40)]
    random.seed(1)
    assert [dataset[0]["prompt"] for _ in range(40)] == first
    assert len(set(first)) == 2  # the same sample is served with and without its prompt


def test_subsets_are_the_same_in_another_process():
    code = "from controlnet_lab.data.control_datamodule import permutation; print(permutation(500, 50, 7)[50:70].tolist())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == str([int(i) for i in split_indices(500, 50, 20, 7)[0]])
