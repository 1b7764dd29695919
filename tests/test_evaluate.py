"""eval/evaluate.py through its real Hydra entry point, on the shared smoke run: re-scoring, sampling sweeps, composition."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_train

pytestmark = pytest.mark.slow  # each re-scores or samples the shared smoke run in its own processes


def test_evaluate_rescores_a_checkpoint(smoke_run):
    tmp, run_dir = smoke_run
    result = run_train([f"ckpt={run_dir}", "eval.num_images=8"], tmp, script="eval/evaluate.py")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((run_dir / "checkpoints" / "eval.json").read_text())["metrics"]
    original = json.loads((run_dir / "results.json").read_text())["metrics"]
    # Same checkpoint, same held-out conditions, same seeds: the same scores.
    assert scores["mask_iou"] == original["mask_iou"] and scores["eval_images"] == 8


def test_an_evaluation_sweep_over_resolution_weighting_tabulates(smoke_run):
    """eval/evaluate.py as a multirun over sampling settings, then eval/tables.py on it: one row per setting."""
    tmp, run_dir = smoke_run
    sweep = tmp / "eval_sweep"
    result = run_train(["-m", f"ckpt={run_dir}", "eval.num_images=4", "sampling.guidance_scale=2", "sampling.resolution_weighting=off,paper",
                        "eval.prompt_settings=[none,perfect]", f"hydra.sweep.dir={sweep}"], tmp, script="eval/evaluate.py")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/eval.json"))]
    assert [r["sampling"]["resolution_weighting"] for r in records] == ["off", "paper"]
    assert all(r["metrics"]["settings_evaluated"] == ["none", "perfect"] for r in records)
    assert all(len(r["provenance"]["commit"]) == 40 and r["provenance"]["machine"]["cores"] >= 1 for r in records)
    assert all(r["sampling"]["guidance_scale"] == 2 for r in records)
    assert records[0]["metrics"]["prompt_settings"] != records[1]["metrics"]["prompt_settings"]
    # One record shape (run_record.py): the trained run's method fields, as its results.json gives them.
    trained = json.loads((run_dir / "results.json").read_text())
    assert trained["kind"] == "train" and all(r["kind"] == "eval" for r in records)
    assert all({k: r[k] for k in ("block", "block_std", "model", "data", "seed")} == {k: trained[k] for k in ("block", "block_std", "model", "data", "seed")}
               for r in records)
    assert all(r["wall_time_s"]["total"] > 0 and trained["wall_time_s"]["total"] > 0 for r in records)
    table = subprocess.run([sys.executable, str(ROOT / "eval" / "tables.py"), f"sweep={sweep}", "wandb=false"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr[-3000:]
    rows = (sweep / "table.csv").read_text().splitlines()
    assert rows[0].split(",")[0] == "sampling.resolution_weighting" and [row.split(",")[0] for row in rows[1:]] == ["off", "paper"]


def test_evaluate_composes_controlnets_each_given_its_own_condition(smoke_run):
    """compose=[...]: a seg ControlNet sampled with the outline one. Swapping which is ckpt and which composed gives the
    same images (residuals summed), which holds only if each net gets its own condition type of the same samples."""
    tmp, outline_run = smoke_run
    seg_run = tmp / "seg_run"  # trained at a high learning rate, so that its residuals change the images
    trained = run_train(["experiment=smoke", "logger=csv", "data.condition=seg", "model.controlnet.lr=1e-2", f"hydra.run.dir={seg_run}"], tmp)
    assert trained.returncode == 0, trained.stderr[-3000:]
    records = []
    for first, second in ((outline_run, seg_run), (seg_run, outline_run)):
        sweep = tmp / f"composed_{first.name}"  # as a multirun: its job folder is named without the run paths
        result = run_train(["-m", f"ckpt={first}", f"compose=[{second}]", "sampling.conditioning_scale=0.5", "eval.num_images=8",
                            f"hydra.sweep.dir={sweep}"], tmp, script="eval/evaluate.py")
        assert result.returncode == 0, result.stderr[-3000:]
        (record,) = sweep.glob("*/eval.json")
        assert record.parent.name == "0_eval.num_images=8,sampling.conditioning_scale=0.5"
        records.append(json.loads(record.read_text()))
    assert [r["composition"] for r in records] == ["outline+seg", "seg+outline"]
    assert [[net["condition"] for net in r["controlnets"]] for r in records] == [["outline", "seg"], ["seg", "outline"]]
    outline_first, seg_first = (r["metrics"] for r in records)
    assert outline_first["prompt_settings"] == seg_first["prompt_settings"]  # every setting's oracle and fidelity scores
    assert {"edge_f1", "seg_miou"} <= set(outline_first["prompt_settings"]["perfect"])  # each net's condition re-detected
    assert [(f["metric"], f["images"]) for f in outline_first["composed_fidelity"]] == [("seg_miou", 8)]
    # Not the runs' own sampling: no eval.json beside their checkpoints (what tables read as a run's re-scoring).
    assert not (seg_run / "checkpoints" / "eval.json").exists()
