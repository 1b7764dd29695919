"""Nothing lost: the training order a resume rebuilds, checkpoints that are loaded safely and checked against their base."""
import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import fill50k_dataset
from controlnet_lab.bases import base_fingerprint, load_base
from controlnet_lab.bases.pretraining import build_once
from controlnet_lab.data.order import EpochOrder
from controlnet_lab.data.encoded import EncodingStore, StoreWriter
from controlnet_lab.locked_encodings import cached_encodings
from controlnet_lab.module import ControlNetModule
from controlnet_lab.resume import read_checkpoint, resume_checkpoint
from controlnet_lab.storage import check_room


def test_an_epoch_resumed_after_k_samples_serves_the_rest_of_the_same_epoch():
    whole = list(EpochOrder(20, prompt_dropout=0.5, seed=3, resume_epoch=0))
    order = EpochOrder(20, prompt_dropout=0.5, seed=3, resume_epoch=1, resume_skip=8)
    order.set_epoch(1)
    later = EpochOrder(20, prompt_dropout=0.5, seed=3)
    later.set_epoch(1)
    assert list(order) == list(later)[8:] and len(order) == 20  # the loader keeps the epoch's length
    order.set_epoch(2)
    assert len(list(order)) == 20  # the next epoch is whole
    assert sorted(i for i, _ in whole) == list(range(20)) and whole != list(later)  # a new permutation each epoch
    assert 4 <= sum(dropped for _, dropped in whole) <= 16


class Payload:
    """What a malicious checkpoint carries: unpickling it would run code."""

    def __reduce__(self):
        return (shutil.copyfile, (__file__, "/tmp/controlnet_lab_pickle_payload_ran"))


@pytest.mark.bad_input
def test_a_checkpoint_with_a_pickled_payload_is_refused(tmp_path, trained_checkpoints):
    marker = Path("/tmp/controlnet_lab_pickle_payload_ran")
    marker.unlink(missing_ok=True)
    checkpoint = torch.load(trained_checkpoints["zero"], weights_only=True)
    checkpoint["hyper_parameters"]["note"] = Payload()
    path = tmp_path / "malicious.ckpt"
    torch.save(checkpoint, path)
    for load in (ControlNetModule.for_inference, read_checkpoint):
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            load(path)
    assert not marker.exists()  # the payload never ran


@pytest.mark.bad_input
def test_a_checkpoint_whose_base_changed_is_refused(tmp_path, trained_checkpoints):
    checkpoint = torch.load(trained_checkpoints["zero"], weights_only=True)
    base = tmp_path / "base"
    shutil.copytree(checkpoint["hyper_parameters"]["base_path"], base)
    checkpoint["hyper_parameters"].update(base_path=str(base), base_fingerprint="0" * 64)
    path = tmp_path / "moved.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=f"fingerprint {'0' * 64}, but the base at {base} has fingerprint [0-9a-f]{{64}}"):
        ControlNetModule.for_inference(path)


def test_a_checkpoint_path_copied_from_ls_works_as_an_override(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from conftest import ROOT, compose_train

    checkpoint = instantiate(compose_train([f"paths.output_dir={tmp_path}"]).callbacks.checkpoint)
    name = Path(checkpoint.format_checkpoint_name({"step": torch.tensor(6)})).name
    assert name == "step-000006.ckpt"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for entry_point in ("sample", "export", "eval"):
            assert compose(config_name=entry_point, overrides=[f"ckpt={tmp_path}/checkpoints/{name}"]).ckpt.endswith(name)


@pytest.mark.bad_input
def test_resume_finds_the_newest_readable_checkpoint_and_never_writes_over_another_run(tmp_path, trained_checkpoints, caplog):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert resume_checkpoint("last", tmp_path) is None  # a requeued job before its first checkpoint starts afresh
    good = trained_checkpoints["zero"].read_bytes()
    (folder / "step=000002.ckpt").write_bytes(good)  # as runs before named them
    (folder / "step-000004.ckpt").write_bytes(good[: len(good) // 2])  # a write cut short
    (folder / "last.ckpt").write_bytes(good[:100])
    with pytest.raises(FileExistsError, match="holds another run's checkpoints: resume it with ckpt_path=last"):
        resume_checkpoint(None, tmp_path)
    resumed = resume_checkpoint("latest", tmp_path)
    assert resumed.path == folder / "step=000002.ckpt" and resumed.global_step == 2
    assert [reason.split(":")[0] for reason in resumed.passed_over] == [str(folder / "last.ckpt"), str(folder / "step-000004.ckpt")]
    assert "passing over an unreadable checkpoint" in caplog.text
    (folder / "step=000002.ckpt").unlink()
    with pytest.raises(RuntimeError, match="no readable checkpoint to resume from"):
        resume_checkpoint("last", tmp_path)
    with pytest.raises(FileNotFoundError, match="ckpt_path=nowhere.ckpt: no checkpoint there"):
        resume_checkpoint("nowhere.ckpt", tmp_path)


@pytest.mark.bad_input
def test_a_folder_the_run_cannot_write_stops_it_first():
    """These tests run as root, which a read-only mode does not stop; sysfs refuses new files even to root."""
    unwritable = Path("/sys/kernel")
    if not unwritable.is_dir():
        pytest.skip("no sysfs on this machine")
    with pytest.raises(OSError, match=r"^/sys/kernel: the run cannot write its checkpoints there \(.+\); choose another paths.log_dir"):
        check_room(unwritable, trainable_parameters=1000, ema=False, kept=2)


@pytest.mark.bad_input
def test_a_disk_without_room_for_the_checkpoints_stops_the_run_first(tmp_path, monkeypatch):
    free = 10 * 2**20
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(free=free))
    check_room(tmp_path / "a", trainable_parameters=100_000, ema=False, kept=3)  # 4 x 1.2 MB fit in 10 MB
    with pytest.raises(OSError, match=r"need about 0.06 GiB \(4 files of 0.01 GiB: the ControlNet's weights and AdamW state and EMA\), "
                                      r"but 0.01 GiB are free; .*lower callbacks.checkpoint.save_top_k"):
        check_room(tmp_path / "b", trainable_parameters=1_000_000, ema=True, kept=3)


@pytest.mark.bad_input
def test_a_cached_base_cut_short_is_built_again(tiny_base, tmp_path, caplog):
    builds = []

    def build(staging: Path) -> dict:
        builds.append(staging)
        shutil.copytree(tiny_base, staging, dirs_exist_ok=True)
        return {"steps": 0}

    folder = build_once(tmp_path / "base-key", build)
    assert build_once(folder, build) == folder and len(builds) == 1  # reused while intact
    (weights,) = (folder / "unet").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:-100])
    assert build_once(folder, build) == folder and len(builds) == 2
    assert f"the cached base {folder} is corrupt" in caplog.text and base_fingerprint(folder) == base_fingerprint(tiny_base)


@pytest.mark.bad_input
def test_cached_encodings_cut_short_or_from_another_version_are_computed_again(tiny_base, tiny_data, tmp_path, caplog):
    base = load_base(tiny_base)
    dataset = fill50k_dataset(tiny_data, 16, count=6)
    first = cached_encodings(base, "fingerprint", dataset, tmp_path)
    (store,) = (tmp_path / "encodings").glob("text-*")
    shard = next(store.glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:50])
    again = cached_encodings(base, "fingerprint", dataset, tmp_path)
    assert f"the cached encodings {store} are unusable ({shard}: 50 bytes" in caplog.text
    assert torch.equal(first.text_hidden[0], again.text_hidden[0])
    EncodingStore(store)  # written again, whole
    index = json.loads((store / "index.json").read_text())
    (store / "index.json").write_text(json.dumps({**index, "version": 0}))
    cached_encodings(base, "fingerprint", dataset, tmp_path)
    assert "written by store version 0" in caplog.text and EncodingStore(store).index["version"] == index["version"]


def test_an_interrupted_encoding_pass_leaves_nothing_that_is_read(tiny_base, tiny_data, tmp_path, monkeypatch):
    base = load_base(tiny_base)
    dataset = fill50k_dataset(tiny_data, 16, count=6)
    monkeypatch.setattr(StoreWriter, "finish", lambda self, **extra: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        cached_encodings(base, "fingerprint", dataset, tmp_path)
    assert list((tmp_path / "encodings").iterdir()) == []  # the staging folder is gone, nothing was published


@pytest.mark.parametrize("fixture, part", [("sdxl_folder", "text_encoder_2"), ("tiny_sd3_folder", "transformer")])
def test_every_locked_part_of_a_base_is_in_its_fingerprint(request, tmp_path, fixture, part):
    """SDXL's second text encoder and SD3's transformer are locked as the UNet is: a change to either is a new base."""
    folder = shutil.copytree(request.getfixturevalue(fixture), tmp_path / "base")
    before = base_fingerprint(folder)
    weights = sorted((folder / part).glob("*.safetensors"))[0]
    changed = bytearray(weights.read_bytes())
    changed[-1] ^= 1
    weights.write_bytes(bytes(changed))
    assert base_fingerprint(folder) != before
