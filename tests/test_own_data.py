"""A researcher's own data: image folders and Hugging Face datasets, detector conditions made once, evaluation on free-form captions."""
import json
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import run_train
from controlnet_lab.data import control_datamodule
from controlnet_lab.data.datamodule import FolderDataModule, HubDataModule
from controlnet_lab.data.readers import metadata_splits
from controlnet_lab.data.samples import DatasetFormatError, Samples, fit_square
from controlnet_lab.evaluation.prompts import FREE_FORM_SETTINGS, other_captions
from controlnet_lab.tables.render import display_table
from controlnet_lab.tables.statistics import summarize

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 190, 60), "yellow": (230, 220, 40)}
SETTINGS = dict(name="own", resolution=16, batch_size=4, val_size=4, split_seed=0)


def draw_row(rng: np.random.Generator, index: int, size=(24, 20)) -> tuple[np.ndarray, str]:
    """A colored square or disc on noise, and its caption."""
    width, height = size
    image = rng.integers(0, 90, (height, width, 3)).astype(np.uint8)
    color = list(COLORS)[index % len(COLORS)]
    shape = "square" if index % 2 else "circle"
    y, x = np.mgrid[:height, :width]
    cx, cy, r = width / 2 + rng.uniform(-3, 3), height / 2 + rng.uniform(-2, 2), rng.uniform(4, 7)
    mask = (np.abs(x - cx) < r) & (np.abs(y - cy) < r) if shape == "square" else (x - cx) ** 2 + (y - cy) ** 2 < r * r
    image[mask] = COLORS[color]
    return image, f"a photo of a {color} {shape}"


def write_folder(root: Path, rows: int = 16, seed: int = 0, conditions: bool = False) -> Path:
    """An imagefolder in diffusers' layout: images/, optionally conditions/, metadata.jsonl."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(rows):
        image, caption = draw_row(rng, i)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        line = {"file_name": f"images/{i}.png", "text": caption}
        if conditions:
            (root / "conditions").mkdir(exist_ok=True)
            Image.fromarray(255 - image).save(root / "conditions" / f"{i}.png")
            line["conditioning_image_file_name"] = f"conditions/{i}.png"
        lines.append(json.dumps(line))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("own") / "photos")


def tiny_inception(folder: Path) -> Path:
    """A TorchScript stand-in for clean-fid's Inception file: 2048 features from a pooled 1x1 convolution."""
    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 2048, 1)

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 1)

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x):
            return self.layers(x)

    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.script(Stub()).save(str(folder / "inception-2015-12-05.pt"))
    return folder


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, photo_folder):
    tmp = tmp_path_factory.mktemp("folder_run")
    inception = tiny_inception(tmp / "inception")
    result = run_train(["experiment=smoke", "logger=csv", "data=folder", f"data.root={photo_folder}", "data.condition=canny",
                        "data.resolution=16", "data.val_size=6", "data.validation_size=2", "data.size=null", "eval.fid.inception=true",
                        f"eval.fid.inception_dir={inception}", "eval.fid.download=false",
                        f"eval.validation.images=[{photo_folder / 'images' / '0.png'},{photo_folder / 'images' / '1.png'}]",
                        "eval.validation.prompts=[a photo of a red circle]"], tmp, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp / "outputs" / "smoke" / "runs").iterdir()
    return tmp, run_dir


@pytest.mark.slow
def test_a_folder_with_free_form_captions_trains_and_is_scored_with_what_applies(folder_run):
    tmp, run_dir = folder_run
    results = json.loads((run_dir / "results.json").read_text())
    metrics, skipped = results["metrics"], results["metrics"]["skipped"]
    assert results["split"]["held_out"] == 6 and results["split"]["train"] == 10 and results["global_step"] == 6
    assert 0.0 <= metrics["edge_f1"] <= 1.0 and metrics["condition_fidelity"]["detector"] == "canny"
    assert results["split"]["validation"] == 2 and results["split"]["test"] == metrics["eval_images"] == 4
    assert "fid" not in metrics and skipped["fid"].startswith("4 images in a 2048-d feature space")  # Inception on the 4 test images
    # The fill50k oracle scores and the domain FID are not measured on free-form captions, and say why.
    for name in ("mask_iou", "color_accuracy", "base_mask_iou", "random_placement_mask_iou"):
        assert name not in metrics and "fill50k grammar" in skipped[name]
    assert "fid_domain" not in metrics and "not fill50k-format" in skipped["fid_domain"]
    assert "clip_score" in skipped
    # The paper's four prompt settings, each scored by re-detection.
    assert metrics["settings_evaluated"] == list(FREE_FORM_SETTINGS)
    assert all(0.0 <= metrics["prompt_settings"][s]["edge_f1"] <= 1.0 for s in FREE_FORM_SETTINGS)
    assert [p["step"] for p in metrics["curve"]] == [0, 3, 6] and "mask_iou" not in metrics["curve"][0]
    # The canny maps of the 16 images were made once and kept.
    (maps,) = (tmp / "cache" / "conditions").iterdir()
    assert len(list(maps.glob("*.png"))) == 16
    # The user's validation conditions and prompt were sampled at steps 0, 3 and 6.
    assert sorted(p.name for p in (run_dir / "validation").iterdir()) == ["step_000000.png", "step_000003.png", "step_000006.png"]


@pytest.mark.slow
def test_tables_of_free_form_runs_leave_absent_cells_empty(folder_run, tmp_path):
    _, run_dir = folder_run
    free_form = pd.json_normalize(json.loads((run_dir / "results.json").read_text())).assign(job_dir=str(run_dir))
    fill50k_like = free_form.copy().assign(**{"block": "gauss", "metrics.prompt_settings.perfect.mask_iou": 0.5})
    table = display_table(summarize(pd.concat([free_form, fill50k_like], ignore_index=True)))
    assert list(table["mask IoU (perfect prompt)"]) == ["", "0.500"]
    assert "edge F1 (none prompt)" in table and "mask IoU (out_of_vocabulary prompt)" not in table


def first_batch(data) -> dict:
    data.setup()
    L.seed_everything(0)
    return next(iter(data.train_dataloader()))


def test_a_save_to_disk_copy_gives_the_same_first_batch(photo_folder, tmp_path):
    folder = FolderDataModule(root=str(photo_folder), condition="canny", cache_dir=tmp_path / "cache", **SETTINGS)
    saved = tmp_path / "saved"
    datasets.load_dataset("imagefolder", data_dir=str(photo_folder), split="train", cache_dir=str(tmp_path / "hf")).save_to_disk(str(saved))
    hub = HubDataModule(path=str(saved), condition="canny", cache_dir=tmp_path / "cache", **{k: v for k, v in SETTINGS.items() if k != "name"})
    a, b = first_batch(folder), first_batch(hub)
    assert a["true_prompt"] == b["true_prompt"] and a["prompt"] == b["prompt"]
    assert torch.equal(a["target"], b["target"]) and torch.equal(a["condition"], b["condition"])
    assert hub.name == "saved"


def test_a_detector_condition_is_computed_once(photo_folder, tmp_path, monkeypatch):
    calls = []
    real = control_datamodule.condition_maker

    def counting(*args, **kwargs):
        detect = real(*args, **kwargs)
        return lambda *images: calls.append(1) or detect(*images)

    monkeypatch.setattr(control_datamodule, "condition_maker", counting)
    data = FolderDataModule(root=str(photo_folder), condition="canny", cache_dir=tmp_path, **SETTINGS)
    data.setup()
    assert len(calls) == 16  # 12 training + 4 held-out images, once each
    for _ in range(2):  # two epochs
        for batch in data.train_dataloader():
            assert batch["condition"].shape == (len(batch["prompt"]), 3, 16, 16)
    list(data.val_dataloader())
    assert len(calls) == 16
    again = FolderDataModule(root=str(photo_folder), condition="canny", cache_dir=tmp_path, **SETTINGS)
    again.setup()
    assert len(calls) == 16  # a second run reads the maps from the cache
    damaged = again.detected["train"].path(int(again.train_rows[0]))
    damaged.write_bytes(damaged.read_bytes()[:20])  # cut short
    FolderDataModule(root=str(photo_folder), condition="canny", cache_dir=tmp_path, **SETTINGS).setup()
    assert len(calls) == 17  # that one map is made again, the others read


def test_stored_conditions_keep_their_target_geometry(tmp_path):
    root = write_folder(tmp_path / "paired", rows=6, conditions=True)
    data = FolderDataModule(root=str(root), cache_dir=tmp_path, **{**SETTINGS, "val_size": 2})
    data.setup()
    item = data.train_dataset()[0]
    row = int(data.train_rows[0])
    image = np.asarray(Image.open(data.train_samples.targets.paths[row]).convert("RGB"))
    assert np.allclose((item["target"].permute(1, 2, 0).numpy() + 1) * 127.5, fit_square(image, 16), atol=1e-3)
    condition = np.asarray(Image.open(data.train_samples.conditions.paths[row]).convert("RGB"))
    assert np.allclose(item["condition"].permute(1, 2, 0).numpy() * 255, fit_square(condition, 16), atol=1e-3)
    assert np.array_equal(condition, 255 - image)
    # Non-square (24x20) images: the shorter side is scaled to 16, then the center is cropped.
    assert fit_square(np.zeros((20, 24, 3), np.uint8), 16).shape == (16, 16, 3)


def test_a_condition_of_another_size_is_first_resized_to_its_target(tmp_path):
    target = np.zeros((20, 40, 3), np.uint8)
    target[:, 16:] = 255  # a wide image: its center crop starts at column 10
    condition = np.asarray(Image.fromarray(target).resize((20, 20), Image.NEAREST))  # square: fitted alone, it would keep all columns
    Image.fromarray(target).save(tmp_path / "t.png")
    Image.fromarray(condition).save(tmp_path / "c.png")
    table = datasets.Dataset.from_dict({"image": [str(tmp_path / "t.png")], "conditioning_image": [str(tmp_path / "c.png")], "text": ["x"]},
                                       features=datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(), "text": datasets.Value("string")}))
    samples = Samples(table, "test", resize={"image": "bilinear", "condition": "nearest"})  # a two-valued map stays two-valued
    fitted_target, fitted_condition = samples.pair(0, 16)
    assert np.array_equal(fitted_condition, fitted_target)  # the target's crop
    assert not np.array_equal(fit_square(condition, 16), fitted_target)
    assert np.array_equal(samples.condition(0, 16), fitted_condition)  # read with only the target's header


def test_the_dataset_own_validation_split_is_the_held_out_set(tmp_path):
    root = tmp_path / "split"
    write_folder(root / "train", rows=8, seed=1)
    write_folder(root / "validation", rows=5, seed=2)
    data = FolderDataModule(root=str(root), condition="canny", val_split="validation", cache_dir=tmp_path, **{**SETTINGS, "val_size": 3})
    data.setup()
    assert len(data.train_samples) == 8 and len(data.val_samples) == 5
    assert data.split_report["held_out"] == 3 and data.split_report["train"] == 8 and data.split_report["val_split"] == "validation"
    with pytest.raises(DatasetFormatError, match="data.split/data.val_split=test"):
        FolderDataModule(root=str(root), condition="canny", val_split="test", cache_dir=tmp_path, **SETTINGS).setup()


def test_split_subfolders_are_named_as_datasets_names_them(tmp_path):
    """The split each metadata.jsonl holds, given to datasets instead of its inference over every file of the folder."""
    metadata = [tmp_path / folder / "metadata.jsonl" for folder in ("train", "validation-2023", "my_test", "extra")]
    splits = metadata_splits(tmp_path, metadata)
    assert {split: [Path(path).parent.name for path in paths] for split, paths in splits.items()} == {
        "train": ["train"], "validation": ["validation-2023"], "test": ["my_test"]}
    flat = [tmp_path / "metadata.jsonl", tmp_path / "images" / "metadata.jsonl", tmp_path / "trainee" / "metadata.jsonl"]
    assert metadata_splits(tmp_path, flat) == {"train": [str(path) for path in flat]}


def test_exact_duplicates_of_held_out_samples_leave_training(tmp_path):
    root = write_folder(tmp_path / "dups", rows=10)
    lines = (root / "metadata.jsonl").read_text().splitlines()
    (root / "metadata.jsonl").write_text("\n".join(lines + [lines[i].replace('"text": "', '"text": "again: ') for i in range(10)]) + "\n")
    data = FolderDataModule(root=str(root), condition="canny", cache_dir=tmp_path, **SETTINGS)
    data.setup()
    held_out_images = {data.val_samples.targets.keys[r] for r in data.val_rows}
    assert data.split_report["exact_duplicates_excluded"] == 4
    assert not held_out_images & {data.train_samples.targets.keys[r] for r in data.train_rows}


BROKEN = {
    "no image column": (lambda line: {k: v for k, v in line.items() if k != "file_name"}, "lacks 'file_name'"),
    "missing image": (lambda line: {**line, "file_name": "images/nothing.png"}, "does not exist"),
    "caption not a string": (lambda line: {**line, "text": 7}, "not a string"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.bad_input
def test_a_broken_metadata_line_is_named(photo_folder, tmp_path, case):
    root = tmp_path / "broken"
    root.mkdir()
    (root / "images").symlink_to(photo_folder / "images")
    lines = [json.loads(line) for line in (photo_folder / "metadata.jsonl").read_text().splitlines()]
    change, message = BROKEN[case]
    lines[4] = change(lines[4])
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(DatasetFormatError, match=rf"metadata.jsonl, line 5: .*{message}"):
        FolderDataModule(root=str(root), condition="canny", cache_dir=tmp_path, **SETTINGS).setup()


@pytest.mark.bad_input
def test_a_corrupt_image_is_named(tmp_path):
    root = write_folder(tmp_path / "corrupt", rows=6)
    (root / "images" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    with pytest.raises(DatasetFormatError, match=r"line 4: image .*3.png is unreadable"):
        FolderDataModule(root=str(root), condition="canny", cache_dir=tmp_path, **SETTINGS).setup()


@pytest.mark.bad_input
def test_an_unknown_column_stops_the_run_before_any_work(photo_folder, tmp_path):
    result = run_train(["experiment=smoke", "logger=csv", "data=folder", f"data.root={photo_folder}", "data.condition=canny",
                        "data.caption_column=caption"], tmp_path)
    assert result.returncode != 0
    assert "data.caption_column=caption" in result.stderr and "lacks 'caption'" in result.stderr
    assert not (tmp_path / "cache" / "base").exists() and not (tmp_path / "cache" / "conditions").exists()


@pytest.mark.bad_input
def test_hub_data_errors_name_the_key(tmp_path, photo_folder):
    with pytest.raises(DatasetFormatError, match="data.name=nobody/no-such-dataset"):
        HubDataModule(name="nobody/no-such-dataset", condition="canny", cache_dir=tmp_path, **{k: v for k, v in SETTINGS.items() if k != "name"}).setup()
    saved = tmp_path / "saved"
    datasets.load_dataset("imagefolder", data_dir=str(photo_folder), split="train", cache_dir=str(tmp_path / "hf")).save_to_disk(str(saved))
    with pytest.raises(DatasetFormatError, match=r"data.image_column=photo: .* has no such column; its columns are \['image', 'text'\]"):
        HubDataModule(path=str(saved), image_column="photo", condition="canny", cache_dir=tmp_path, **{k: v for k, v in SETTINGS.items() if k != "name"}).setup()
    with pytest.raises(ValueError, match="data.condition=stored: .* stores no condition images"):
        HubDataModule(path=str(saved), condition="stored", cache_dir=tmp_path, **{k: v for k, v in SETTINGS.items() if k != "name"}).setup()


def test_conflicting_captions_come_from_other_samples():
    captions = ["a red square", "a blue circle", "a red square", "a green circle"]
    conflicting = other_captions(captions, seed=3)
    assert conflicting == other_captions(captions, seed=3)
    assert all(other != own and other in captions for own, other in zip(captions, conflicting))
    with pytest.raises(ValueError, match="every held-out caption is the same"):
        other_captions(["same", "same"], seed=0)
