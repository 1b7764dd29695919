"""Slow: the default run itself must meet its targets, on held-out conditions it never saw (`pytest -m slow`).

This is `make train` with a fresh cache, the locked base copied from the project (32 minutes with
the curve every 50 steps on the slower of the 2-core machines it was timed on:
experiments/embedded_default/shipped_base/), its fidelity curve measured every 100 steps instead of
50 (the scores do not depend on it). The committed figures are above
these thresholds; the thresholds leave a little room for arithmetic differences between machines. The same run's
data is then checked to be content-disjoint across the split, for the default and for
smaller `data.size` subsets.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_train, stored_paths
from controlnet_lab.data.fill50k import read_index
from controlnet_lab.data.samples import load_rgb
from controlnet_lab.data.datamodule import build_datamodule


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("default")
    result = run_train(["logger=csv", "eval.every_n_steps=100"], tmp, timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp / "outputs" / "train" / "runs").iterdir()
    return run_dir


@pytest.mark.slow
def test_default_run_learns_control_and_keeps_colors(default_run):
    results = json.loads((default_run / "results.json").read_text())
    # The locked base is the one shipped for the default recipe (the data generated here has the key it was built for).
    assert results["base"]["pretraining"]["shipped_from"].endswith(f"shipped/{Path(results['base']['path']).name}"), results["base"]
    metrics = results["metrics"]
    assert metrics["mask_iou"] >= 0.75, metrics
    assert metrics["mask_iou"] > metrics["base_mask_iou"] + 0.4, metrics
    assert metrics["base_mask_iou"] < metrics["random_placement_mask_iou"] + 0.1, metrics
    assert metrics["color_accuracy"] >= 0.8, metrics
    # Re-detected edges follow the condition, and the fidelity curve (64 conditions every 100 steps) rises.
    assert metrics["edge_f1"] >= 0.75, metrics
    assert [p["step"] for p in metrics["curve"]] == list(range(0, 1600, 100)) and metrics["curve_images"] == 64
    assert metrics["rise"] is not None and metrics["rise"]["final"] > metrics["rise"]["initial"] + 0.4, metrics["rise"]


@pytest.mark.slow
@pytest.mark.parametrize("size", [None, 1000, 5000])
def test_the_default_split_is_content_disjoint(default_run, size):
    """No two of the 20,000 sources are byte-identical, and no held-out source lies within 0.2 (data/held_out.py's
    distance) of a training source, computed here independently of the harness's own check."""
    cfg = OmegaConf.load(default_run / ".hydra" / "config.yaml")
    root = json.loads((default_run / "results.json").read_text())["data_root"]
    if size is None:
        sources = [r.source.read_bytes() for r in read_index(root)]
        assert len(sources) == 20000 and len({hashlib.sha256(s).digest() for s in sources}) == 20000
    cfg.data.size = size
    data = build_datamodule(cfg.data)
    assert data.split_report["exact_duplicates_excluded"] == 0 and len(data.val_rows) == 256
    held_out_paths, train_paths = stored_paths(data, "val"), stored_paths(data, "train")
    assert not set(held_out_paths) & set(train_paths)

    def ink(paths):
        return torch.tensor(np.stack([load_rgb(path, 32).max(-1).reshape(-1) for path in paths]), dtype=torch.float64) / 255

    held_out, train = ink(held_out_paths), ink(train_paths)
    nearest = float((torch.cdist(held_out, train, p=1) / (held_out.sum(1)[:, None] + train.sum(1)[None])).min())
    assert nearest >= 0.2, nearest
