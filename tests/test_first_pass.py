"""The first pass over a dataset's images is paid once: kept in a manifest, re-read only for files that changed."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from controlnet_lab.data import control_datamodule
from controlnet_lab.data import manifest as manifest_module
from controlnet_lab.data.condition_cache import cached_conditions
from controlnet_lab.data.datamodule import FolderDataModule
from controlnet_lab.data.manifest import Manifest, content_key
from controlnet_lab.data.samples import DatasetFormatError

SETTINGS = dict(name="own", resolution=8, batch_size=2, val_size=2, split_seed=0, condition="canny")


def write_folder(root, rows: int):
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(rows):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"images/{i}.png", "text": f"image {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def counted(monkeypatch):
    """The files the first pass reads (in this process: num_proc=1)."""
    reads = []
    inspect = manifest_module.inspect_file
    monkeypatch.setattr(manifest_module, "inspect_file", lambda path: reads.append(path) or inspect(path))
    return reads


def test_a_second_start_reads_the_manifest_and_a_changed_file_is_read_again(tmp_path, counted):
    root = write_folder(tmp_path / "own", rows=8)
    first = FolderDataModule(root=str(root), cache_dir=tmp_path / "cache", num_proc=1, **SETTINGS)
    first.setup()
    assert len(counted) == 8
    keys = list(first.train_samples.targets.keys)
    assert keys[3] == content_key((root / "images" / "3.png").read_bytes())
    counted.clear()
    again = FolderDataModule(root=str(root), cache_dir=tmp_path / "cache", num_proc=1, **SETTINGS)
    again.setup()
    assert counted == [] and again.train_samples.targets.keys == keys and again.fingerprint() == first.fingerprint()
    (kept,) = (tmp_path / "cache" / "datasets" / "tables").iterdir()  # the folder's table, not loaded again by datasets
    assert str(pq.read_table(kept / "table.parquet").schema.field("image").type) == "string"  # paths, not the images' bytes
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "3.png")  # another image under the same name
    changed = FolderDataModule(root=str(root), cache_dir=tmp_path / "cache", num_proc=1, **SETTINGS)
    changed.setup()
    assert counted == [str(root / "images" / "3.png")] and changed.fingerprint() != first.fingerprint()


@pytest.mark.bad_input
def test_a_manifest_cut_short_is_named_and_rebuilt(tmp_path, counted, caplog):
    root = write_folder(tmp_path / "own", rows=6)
    FolderDataModule(root=str(root), cache_dir=tmp_path / "cache", num_proc=1, **SETTINGS).setup()
    (path,) = (tmp_path / "cache" / "manifests").glob("*.json")
    path.write_text(path.read_text()[:40])
    counted.clear()
    FolderDataModule(root=str(root), cache_dir=tmp_path / "cache", num_proc=1, **SETTINGS).setup()
    assert f"the manifest {path} is unreadable" in caplog.text and len(counted) == 6
    assert json.loads(path.read_text())["version"] == manifest_module.MANIFEST_VERSION


@pytest.mark.bad_input
def test_an_interrupted_first_pass_keeps_no_manifest_and_an_unreadable_image_is_named(tmp_path):
    root = write_folder(tmp_path / "own", rows=6)
    (root / "images" / "4.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DatasetFormatError, match=r"metadata.jsonl, line 5: image .*4.png is unreadable"):
        FolderDataModule(root=str(root), cache_dir=tmp_path / "cache", num_proc=1, **SETTINGS).setup()
    assert not list((tmp_path / "cache").glob("manifests/*.json"))


def test_the_parallel_pass_finds_what_one_process_finds(tmp_path):
    root = write_folder(tmp_path / "own", rows=300)
    paths = sorted(str(p) for p in (root / "images").glob("*.png"))
    serial = Manifest(None, "x", num_proc=1).facts(paths, lambda i: paths[i])
    parallel = Manifest(tmp_path / "cache", "x", num_proc=2).facts(paths, lambda i: paths[i])
    assert serial == parallel and parallel[0].width == 8
    with pytest.raises(ValueError, match="data.num_proc must be >= 1"):
        Manifest(None, "x", num_proc=0)


def test_detector_maps_made_in_worker_processes_equal_those_made_in_one(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "own", rows=72)
    maps = []
    for num_proc, detector_in_workers in ((1, True), (2, True), (2, False)):
        if not detector_in_workers:  # as on a GPU: the workers read the targets, the detector runs in this process
            monkeypatch.setattr(control_datamodule, "cached_conditions",
                                lambda *args, **kwargs: cached_conditions(*args, **{**kwargs, "in_workers": False}))
        cache = tmp_path / f"cache{len(maps)}"
        data = FolderDataModule(root=str(root), cache_dir=cache, num_proc=num_proc, **SETTINGS)
        data.setup()
        folder = data.detected["train"].folder
        maps.append({p.name: p.read_bytes() for p in folder.glob("*.png")})
    assert len(maps[0]) == 72 and maps[0] == maps[1] == maps[2]  # the training and held-out maps
