"""Held-out means unseen: continuous geometry, and a split that is disjoint by content, not only by index."""
import hashlib
import shutil

import numpy as np
import pytest
import torch

from conftest import stored_paths
from controlnet_lab.data.datamodule import Fill50kDataModule
from controlnet_lab.data.samples import load_rgb
from controlnet_lab.data.held_out import outline_distance
from controlnet_lab.data.synthetic import SyntheticFill50kSpec, draw_sample, write_fill50k
from controlnet_lab.data.outlines import condition_mask
from controlnet_lab.metrics.oracle import mask_iou, segment_circle

DEFAULT_LIKE = dict(resolution=32, palette=("red", "green", "blue", "yellow", "cyan", "magenta", "white", "black"),
                    radius_range=(0.15, 0.35), outline_thickness=1)


def ink(paths, resolution=32):
    """Each source's brightest channel in [0, 1], computed here independently of held_out.py."""
    return torch.tensor(np.stack([load_rgb(path, resolution).max(-1).reshape(-1) for path in paths]), dtype=torch.float64) / 255


def dense_module(root, size=None, exclude=True, resolution=32, val_size=64):
    return Fill50kDataModule(root=str(root), name="dense", resolution=resolution, batch_size=8, val_size=val_size, size=size,
                             condition="outline", held_out={"exclude_near_duplicates": exclude, "max_distance": 0.2})


def min_distance(a, b):
    """The smallest fraction of differing ink between any row of a and any row of b."""
    diff = (a[:, None, :] - b[None, :, :]).abs().sum(-1)
    return float((diff / (a.sum(1)[:, None] + b.sum(1)[None, :])).min())


@pytest.fixture(scope="module")
def dense_data(tmp_path_factory):
    """2,000 samples at the default's resolution: dense enough that near-duplicates occur."""
    return write_fill50k(SyntheticFill50kSpec(count=2000, seed=1, **DEFAULT_LIKE), tmp_path_factory.mktemp("dense") / "fill")


def test_no_two_generated_outlines_are_the_same():
    spec = SyntheticFill50kSpec(count=3000, seed=0, **DEFAULT_LIKE)
    rng = np.random.default_rng(0)
    sources = [draw_sample(rng, spec)[0] for _ in range(spec.count)]
    assert len({hashlib.sha256(s.tobytes()).hexdigest() for s in sources}) == spec.count


def test_the_outline_encloses_exactly_the_targets_circle():
    spec = SyntheticFill50kSpec(count=300, seed=2, **DEFAULT_LIKE)
    rng = np.random.default_rng(2)
    ious = [mask_iou(condition_mask(source), segment_circle(target)[0]) for source, target, _ in (draw_sample(rng, spec) for _ in range(spec.count))]
    assert np.mean(ious) > 0.99 and np.min(ious) > 0.9, (np.mean(ious), np.min(ious))


@pytest.mark.parametrize("size", [None, 300, 1000])
def test_held_out_sources_are_far_from_every_training_source(dense_data, size):
    data = dense_module(dense_data, size)
    data.setup()
    assert min_distance(ink(stored_paths(data, "val")), ink(stored_paths(data, "train"))) >= 0.2
    report = data.split_report
    assert report["near_duplicates_excluded"] > 0 and report["exact_duplicates_excluded"] == 0
    assert report["train"] == len(data.train_rows) == (size or 2000 - 64 - report["near_duplicates_excluded"])


def test_without_exclusion_the_same_split_has_near_duplicates(dense_data):
    data = dense_module(dense_data, exclude=False)
    data.setup()
    assert min_distance(ink(stored_paths(data, "val")), ink(stored_paths(data, "train"))) < 0.2
    assert data.split_report["near_duplicates_excluded"] is None


def test_subsets_stay_nested_after_exclusion(dense_data):
    def train(size):
        data = dense_module(dense_data, size)
        data.setup()
        return data
    small, large = train(300), train(1000)
    assert stored_paths(small, "train") == stored_paths(large, "train")[:300]
    assert np.array_equal(small.pool_rows, large.pool_rows)  # what the FID domain net learns from does not depend on data.size
    available = len(large.pool_rows)
    assert available < 2000 - 64
    with pytest.raises(ValueError, match=rf"data\.size={available + 1} exceeds the {available} .* near-duplicates of held-out samples"):
        train(available + 1)


def test_a_users_folder_drops_byte_identical_sources_from_training(tiny_data, tmp_path):
    folder = shutil.copytree(tiny_data, tmp_path / "copy")
    data = dense_module(folder, exclude=False, resolution=16, val_size=8)
    data.setup()
    # Overwrite three training sources with held-out ones: those samples leave training, and are counted.
    copied = stored_paths(data, "train")[:3]
    for path, held_out in zip(copied, stored_paths(data, "val")[:3]):
        shutil.copyfile(held_out, path)
    again = dense_module(folder, exclude=False, resolution=16, val_size=8)
    again.setup()
    assert again.split_report["exact_duplicates_excluded"] == 3 and not set(copied) & set(stored_paths(again, "train"))
    assert len(again.train_rows) == 37 and again.split_report["near_duplicates_excluded"] is None


class FixedGeometry:
    """Stands in for the generator's RNG: a circle of a given centre and radius (pixels at 32 px)."""

    def __init__(self, center, radius):
        self.center, self.radius = np.array(center), radius

    def uniform(self, low, high, size=None):
        return self.center if size == 2 else self.radius / 32

    def choice(self, n, size, replace):
        return np.array([0, 1])


def test_the_distance_scale_a_shift_of_half_a_pixel_is_not_a_near_duplicate():
    """The figures of data/held_out.py's docstring: 0.2 lies between a 0.25 and a 0.5 px shift of a radius-7.2 circle."""
    spec = SyntheticFill50kSpec(count=1, seed=0, **DEFAULT_LIKE)

    def ink_of(center, radius):
        source = draw_sample(FixedGeometry(center, radius), spec)[0]
        return torch.from_numpy(source.max(-1).reshape(1, -1).astype(np.float32) / 255)

    reference = ink_of((15.3, 16.1), 7.2)
    distance = {shift: float(outline_distance(reference, ink_of((15.3 + shift, 16.1), 7.2))) for shift in (0.0, 0.25, 0.5, 1.0)}
    assert distance[0.0] == 0.0
    assert distance[0.25] == pytest.approx(0.14, abs=0.01) and distance[0.5] == pytest.approx(0.27, abs=0.01)
    assert distance[1.0] == pytest.approx(0.49, abs=0.01)
    assert float(outline_distance(reference, ink_of((15.3, 16.1), 7.7))) == pytest.approx(0.42, abs=0.01)


def test_the_held_out_set_splits_into_disjoint_validation_and_test_parts(dense_data):
    """Validation (what may steer a run) is the held-out set's first validation_size samples, test the rest; neither is
    trained on, and the training pool is the same as without the split (so is the locked base's recipe key)."""
    data = Fill50kDataModule(root=str(dense_data), name="dense", resolution=32, batch_size=8, val_size=64, validation_size=16,
                             condition="outline")
    data.setup()
    whole = Fill50kDataModule(root=str(dense_data), name="dense", resolution=32, batch_size=8, val_size=64, condition="outline")
    whole.setup()
    validation, test = data.validation_dataset(), data.test_dataset()
    assert len(validation) == 16 and len(test) == 48
    assert set(validation.rows).isdisjoint(test.rows) and set(validation.rows) | set(test.rows) == set(data.val_rows)
    assert set(data.val_rows).isdisjoint(data.train_rows) and data.fingerprint() == whole.fingerprint()
    assert data.split_report["validation"] == 16 and data.split_report["test"] == 48 and data.split_report["validation_and_test_disjoint"]
    # runs configured before the split: validation and test are both the whole held-out set, and the record says so
    assert len(whole.validation_dataset()) == len(whole.test_dataset()) == 64 and not whole.split_report["validation_and_test_disjoint"]


@pytest.mark.bad_input
@pytest.mark.parametrize("validation_size", [64, -1])
def test_a_validation_part_that_leaves_no_test_set_is_refused_naming_the_key(dense_data, validation_size):
    with pytest.raises(ValueError, match=r"data.validation_size must be in \[0, data.val_size - 1 = 63\]"):
        Fill50kDataModule(root=str(dense_data), name="dense", resolution=32, batch_size=8, val_size=64, validation_size=validation_size)
