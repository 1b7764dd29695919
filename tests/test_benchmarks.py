"""The benchmark scripts at their smallest settings: they still run and write what the README reads (no timing is
asserted). benchmarks/reliability.py runs, at its smallest, in tests/test_train.py."""
import json
import sys

import pytest

import vs_diffusers
import vs_plain_loop


def test_the_plain_loop_benchmark_writes_its_ratio(tmp_path, monkeypatch):
    out = tmp_path / "vs_plain_loop.json"
    monkeypatch.setattr(sys, "argv", ["vs_plain_loop.py", "--steps", "4", "--rounds", "1", "--batch", "4", "--warmup", "1", "--out", str(out)])
    vs_plain_loop.main()
    report = json.loads(out.read_text())
    assert report["ratio"] > 0 and len(report["rounds_s_per_step"]["lightning"]) == 1
    assert "fidelity_curve" not in report["settings"]["callbacks"] and "checkpoint" in report["settings"]["callbacks"]


def test_the_diffusers_script_benchmark_runs_both_on_the_same_work(tmp_path, monkeypatch):
    """Needs the bench extra (pip install -e '.[bench]': accelerate, tensorboard), which diffusers' script imports."""
    pytest.importorskip("accelerate", reason="diffusers' training script needs the bench extra: pip install -e '.[bench]'")
    pytest.importorskip("tensorboard", reason="diffusers' training script logs to TensorBoard: pip install -e '.[bench]'")
    out = tmp_path / "vs_diffusers.json"
    monkeypatch.setattr(sys, "argv", ["vs_diffusers.py", "--steps", "2", "--rounds", "1", "--batch", "4", "--samples", "64", "--out", str(out)])
    vs_diffusers.main()
    report = json.loads(out.read_text())
    assert set(report["setups"]) == {"harness", "harness_no_cache", "diffusers_script"}
    assert all(len(report["rounds"][0][setup]["long"]["last_losses"]) == 4 for setup in report["setups"])
