"""Nothing lost: the training order a resume rebuilds, checkpoints that are loaded safely and checked against their base."""
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from controlnet_lab.data.order import EpochOrder
from controlnet_lab.module import ControlNetModule
from controlnet_lab.resume import checkpoint_summary, resume_checkpoint


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


def test_a_checkpoint_with_a_pickled_payload_is_refused(tmp_path, trained_checkpoints):
    marker = Path("/tmp/controlnet_lab_pickle_payload_ran")
    marker.unlink(missing_ok=True)
    checkpoint = torch.load(trained_checkpoints["zero"], weights_only=True)
    checkpoint["hyper_parameters"]["note"] = Payload()
    path = tmp_path / "malicious.ckpt"
    torch.save(checkpoint, path)
    for load in (ControlNetModule.for_inference, checkpoint_summary):
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            load(path)
    assert not marker.exists()  # the payload never ran


def test_a_checkpoint_whose_base_changed_is_refused(tmp_path, trained_checkpoints):
    checkpoint = torch.load(trained_checkpoints["zero"], weights_only=True)
    base = tmp_path / "base"
    shutil.copytree(checkpoint["hyper_parameters"]["base_path"], base)
    checkpoint["hyper_parameters"].update(base_path=str(base), base_fingerprint="0" * 64)
    path = tmp_path / "moved.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=f"fingerprint {'0' * 64}, but the base at {base} has fingerprint [0-9a-f]{{64}}"):
        ControlNetModule.for_inference(path)


def test_a_new_run_never_writes_over_another_runs_checkpoints(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert resume_checkpoint("last", tmp_path) is None  # a requeued job before its first checkpoint starts afresh
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(FileExistsError, match="holds another run's checkpoints: resume it with ckpt_path=last"):
        resume_checkpoint(None, tmp_path)
    assert resume_checkpoint("latest", tmp_path) == tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match="ckpt_path=nowhere.ckpt: no checkpoint there"):
        resume_checkpoint("nowhere.ckpt", tmp_path)
