import json
from pathlib import Path

import pandas as pd
import pytest

from controlnet_lab.tables import job_number, load_sweep, summarize


def test_jobs_are_taken_in_launch_order_not_name_order():
    names = ["10_block=zero", "2_block=gauss", "0_block=single", "1_block=zero"]
    assert [p.name for p in sorted(map(Path, names), key=job_number)] == ["0_block=single", "1_block=zero", "2_block=gauss", "10_block=zero"]


def test_summary_is_the_mean_and_sample_std_over_the_seeds_of_each_method(tmp_path):
    """Two methods x three seeds with known scores; a job without results is left out, not counted as zero."""
    scores = {"zero": [0.5, 0.6, 0.7], "single": [0.2, 0.2, 0.5]}
    job = 0
    for block, values in scores.items():
        for seed, value in enumerate(values):
            folder = tmp_path / f"{job}_block={block},seed={seed}"
            (folder / ".hydra").mkdir(parents=True)
            record = {"block": block, "seed": seed, "metrics": {"mask_iou": value, "eval_images": 64,
                      "prompt_settings": {"perfect": {"mask_iou": value}, "none": {"mask_iou": value / 2}}}}
            (folder / "results.json").write_text(json.dumps(record))
            job += 1
    (tmp_path / f"{job}_block=gauss,seed=0" / ".hydra").mkdir(parents=True)  # a failed job
    frame, unfinished = load_sweep(tmp_path)
    summary = summarize(frame).set_index("block")
    assert [p.name for p in unfinished] == [f"{job}_block=gauss,seed=0"]
    assert list(summary.index) == ["zero", "single"]
    perfect = "metrics.prompt_settings.perfect.mask_iou"
    assert summary.loc["zero", f"{perfect}:mean"] == pytest.approx(0.6)
    assert summary.loc["zero", f"{perfect}:std"] == pytest.approx(0.1)  # ddof=1
    assert summary.loc["single", f"{perfect}:mean"] == pytest.approx(0.3)
    assert summary.loc["single", f"{perfect}:std"] == pytest.approx(pd.Series([0.2, 0.2, 0.5]).std())
    assert summary.loc["single", "metrics.prompt_settings.none.mask_iou:mean"] == pytest.approx(0.15)
    assert summary.loc["zero", "seeds"] == 3
