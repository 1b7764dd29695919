"""Slow: a shortened default run must already show control (CI runs it when time allows: `pytest -m slow`)."""
import json

import pytest

from conftest import run_train


@pytest.mark.slow
def test_short_default_run_learns_control(tmp_path):
    result = run_train(
        ["logger=csv", "model.base.pretrain.max_steps=800", "trainer.max_steps=500", "trainer.val_check_interval=250", "eval.num_images=64"],
        tmp_path,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
    # The ControlNet must place circles where the condition says, far better than the base alone.
    assert metrics["mask_iou"] > metrics["base_mask_iou"] + 0.2, metrics
