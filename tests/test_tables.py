import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from controlnet_lab.intervals import _detectable, difference, t_interval
from controlnet_lab.run_record import read_record
from controlnet_lab.metrics.convergence import first_converged_step
from controlnet_lab.tables.plan import load_plan, plan_verdicts, registration, stops_as_planned
from controlnet_lab.tables.render import display_table
from controlnet_lab.tables.report import write_tables
from controlnet_lab.tables.statistics import average_evaluation_seeds, differences, summarize
from controlnet_lab.tables.sweeps import SweepError, archive_sweep, job_number, load_sweep, method_columns


def test_jobs_are_taken_in_launch_order_not_name_order():
    names = ["10_block=zero", "2_block=gauss", "0_block=single", "1_block=zero"]
    assert [p.name for p in sorted(map(Path, names), key=job_number)] == ["0_block=single", "1_block=zero", "2_block=gauss", "10_block=zero"]


def write_sweep(folder: Path, scores: dict[str, dict[int, float]]) -> int:
    """A multirun directory with one results.json per (block, seed): perfect-prompt mask IoU as given, none-prompt half
    of it. Returns the number of jobs."""
    job = 0
    for block, values in scores.items():
        for seed, value in values.items():
            job_dir = folder / f"{job}_block={block},seed={seed}"
            (job_dir / ".hydra").mkdir(parents=True)
            record = {"block": block, "seed": seed, "metrics": {"mask_iou": value, "eval_images": 64,
                      "prompt_settings": {"perfect": {"mask_iou": value}, "none": {"mask_iou": value / 2}}}}
            (job_dir / "results.json").write_text(json.dumps(record))
            job += 1
    return job


def test_summary_is_the_mean_and_sample_std_over_the_seeds_of_each_method(tmp_path):
    """Two methods x three seeds with known scores; a job without results is left out, not counted as zero."""
    job = write_sweep(tmp_path, {"zero": {0: 0.5, 1: 0.6, 2: 0.7}, "single": {0: 0.2, 1: 0.2, 2: 0.5}})
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
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)  # 4.303 x std / sqrt(3)
    assert summary.loc["zero", f"{perfect}:low"] == pytest.approx(0.6 - half)
    assert summary.loc["zero", f"{perfect}:high"] == pytest.approx(0.6 + half)


def test_a_t_interval_of_one_value_has_no_width_to_report():
    assert t_interval([0.4])[0] == 0.4 and math.isnan(t_interval([0.4])[1])
    mean, low, high = t_interval([1.0, 2.0, 3.0, float("nan")], level=0.9)
    assert mean == 2.0 and high - mean == pytest.approx(stats.t.ppf(0.95, 2) / math.sqrt(3))


REFERENCE = {0: 0.50, 1: 0.70, 2: 0.90}   # seeds differ a lot ...
TREATMENT = {0: 0.55, 1: 0.74, 2: 0.96}   # ... the treatment adds 0.05 +- 0.01 to each


def test_pairing_by_seed_calls_a_difference_that_unpaired_seeds_leave_inconclusive():
    paired = difference(TREATMENT, REFERENCE)
    assert paired.paired and paired.mean == pytest.approx(0.05) and paired.verdict == "higher"
    assert paired.high - paired.mean == pytest.approx(stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3))
    unpaired = difference({seed + 3: v for seed, v in TREATMENT.items()}, REFERENCE)  # other seeds: Welch
    assert not unpaired.paired and unpaired.mean == pytest.approx(0.05) and unpaired.verdict == "inconclusive"
    assert difference(REFERENCE, TREATMENT).verdict == "lower"


def test_an_interval_against_a_margin_is_equivalent_only_when_it_lies_inside_it():
    paired = difference(TREATMENT, REFERENCE)  # +0.05 [+0.025, +0.075]
    assert paired.against_margin(0.1) == "equivalent within ±0.1"
    assert paired.against_margin(0.02) == "higher by more than 0.02"
    assert paired.against_margin(0.05) == "undecided"  # the interval crosses +0.05
    assert difference(REFERENCE, TREATMENT).against_margin(0.02) == "lower by more than 0.02"
    assert difference({0: 0.5}, {0: 0.4}).against_margin(0.1) == "too few seeds"


def test_an_inconclusive_difference_says_how_many_seeds_would_decide_it():
    noisy = difference({0: 0.60, 1: 0.62, 2: 0.49}, {0: 0.55, 1: 0.58, 2: 0.52})  # differences 0.05, 0.04, -0.03
    assert noisy.verdict == "inconclusive" and noisy.paired
    sd = pd.Series([0.05, 0.04, -0.03]).std()
    n = noisy.seeds_to_decide
    assert _detectable(sd, n, n - 1, 0.05) <= abs(noisy.mean) < _detectable(sd, n - 1, n - 2, 0.05)
    assert noisy.detectable == pytest.approx(_detectable(sd, 3, 2, 0.05)) and noisy.detectable > abs(noisy.mean)
    assert difference({0: 0.5}, {0: 0.4}).verdict == "too few seeds"
    assert difference({0: 0.2, 1: 0.3}, {0: 0.2, 1: 0.3}).verdict == "identical"
    assert difference({0: 0.75, 1: 0.5}, {0: 0.5, 1: 0.25}).verdict == "no spread"  # +0.25 in both seeds: not called


def test_differences_compare_with_the_first_method_or_every_pair_with_bonferroni(tmp_path):
    write_sweep(tmp_path, {"zero": REFERENCE, "gauss": TREATMENT, "single": {s: v - 0.3 for s, v in REFERENCE.items()}})
    frame, _ = load_sweep(tmp_path)
    against_first = differences(frame).set_index(["method", "metric"])
    assert list(against_first["vs"].unique()) == ["block=zero"] and against_first["level"].eq(0.95).all()
    row = against_first.loc[("block=gauss", "mask IoU (perfect prompt)")]
    assert row["difference"] == pytest.approx(0.05) and row["verdict"] == "higher" and row["paired"]
    assert against_first.loc[("block=single", "mask IoU (perfect prompt)"), "verdict"] == "lower"
    every_pair = differences(frame, comparisons="all_pairs", correction="bonferroni")
    assert len(every_pair[every_pair["metric"] == "mask IoU (perfect prompt)"]) == 3
    assert every_pair["level"].eq(round(1 - 0.05 / 3, 4)).all()
    wider = every_pair.set_index(["method", "vs", "metric"]).loc[("block=gauss", "block=zero", "mask IoU (perfect prompt)")]
    assert wider["high"] - wider["low"] > row["high"] - row["low"]
    with pytest.raises(ValueError, match="correction='holm'"):
        differences(frame, correction="holm")


def test_tables_write_the_intervals_and_the_differences(tmp_path):
    write_sweep(tmp_path / "sweep", {"zero": REFERENCE, "gauss": TREATMENT})
    _, paths = write_tables(tmp_path / "sweep", tmp_path / "out")
    assert "0.700 ± 0.200 [0.203, 1.197]" in paths["markdown"].read_text()
    shown = paths["differences_markdown"].read_text()
    assert "+0.050 [+0.025, +0.075]" in shown and "3 paired" in shown and "higher" in shown
    numbers = pd.read_csv(paths["differences_csv"]).set_index("metric")
    assert numbers.loc["mask IoU (perfect prompt)", "difference"] == pytest.approx(0.05)
    assert numbers.loc["mask IoU (none prompt)", "difference"] == pytest.approx(0.025)
    assert "difference" in paths["differences_latex"].read_text()


def test_margins_fixed_before_the_runs_judge_their_metrics_differences(tmp_path):
    write_sweep(tmp_path / "sweep", {"zero": REFERENCE, "gauss": TREATMENT})
    _, paths = write_tables(tmp_path / "sweep", tmp_path / "out", margins={"metrics.prompt_settings.perfect.mask_iou": 0.1})
    numbers = pd.read_csv(paths["differences_csv"]).set_index("metric")
    assert numbers.loc["mask IoU (perfect prompt)", "against_margin"] == "equivalent within ±0.1"
    assert pd.isna(numbers.loc["mask IoU (none prompt)", "against_margin"])  # no margin was set for it
    assert "equivalent within ±0.1" in paths["differences_markdown"].read_text()
    with pytest.raises(SweepError, match="metrics.fid"):
        write_tables(tmp_path / "sweep", tmp_path / "out", margins={"metrics.fid": 1.0})


def test_an_arm_launched_later_joins_the_tables_paired_by_seed(tmp_path):
    write_sweep(tmp_path / "first", {"zero": REFERENCE})
    write_sweep(tmp_path / "later", {"gauss": TREATMENT})
    (tmp_path / "later" / "3_block=gauss,seed=3" / ".hydra").mkdir(parents=True)  # unfinished
    _, paths = write_tables(tmp_path / "first", tmp_path / "out", extra_sweeps=[tmp_path / "later"])
    numbers = pd.read_csv(paths["differences_csv"]).set_index("metric").loc["mask IoU (perfect prompt)"]
    assert numbers["method"] == "block=gauss" and numbers["vs"] == "block=zero"
    assert numbers["difference"] == pytest.approx(0.05) and numbers["paired"] and numbers["verdict"] == "higher"
    assert "1 job(s) of the sweep later are not in the table" in paths["markdown"].read_text()


def test_evaluation_seeds_of_one_checkpoint_average_into_one_row(tmp_path):
    """Two evaluation seeds of each of three checkpoints per method: three paired rows, each the mean of its two."""
    rows = [{"block": block, "seed": seed, "eval.seed": eval_seed, "job_dir": str(tmp_path),
             "metrics.prompt_settings.perfect.mask_iou": base[seed] + offset + (0.01 if eval_seed == 2 else -0.01)}
            for block, base, offset in (("zero", REFERENCE, 0.0), ("gauss", REFERENCE, 0.05)) for seed in (0, 1, 2) for eval_seed in (1, 2)]
    frame = pd.DataFrame(rows)
    averaged = average_evaluation_seeds(frame)
    assert len(averaged) == 6 and "eval.seed" not in averaged
    assert averaged.set_index(["block", "seed"]).loc[("zero", 1), "metrics.prompt_settings.perfect.mask_iou"] == pytest.approx(0.70)
    row = differences(averaged).set_index("metric").loc["mask IoU (perfect prompt)"]
    assert row["seeds"] == 3 and row["paired"] and row["difference"] == pytest.approx(0.05)
    assert differences(frame).set_index("metric").loc["mask IoU (perfect prompt)", "seeds"] == 6  # pooled: noise draws counted as runs


def test_a_null_method_value_reads_as_the_config_wrote_it(tmp_path):
    """data.size 100 / 1000 / null: pandas holds the column as 100.0 / 1000.0 / NaN; the tables say 100 / 1000 / null."""
    for job, size in enumerate((100, 1000, None)):
        (tmp_path / f"{job}_data.size={size}" / ".hydra").mkdir(parents=True)
        record = {"data": {"size": size}, "seed": 0, "metrics": {"mask_iou": 0.5, "eval_images": 8, "prompt_settings": {"perfect": {"mask_iou": 0.5}}}}
        (tmp_path / f"{job}_data.size={size}" / "results.json").write_text(json.dumps(record))
    frame, _ = load_sweep(tmp_path)
    assert display_table(summarize(frame))["data.size"].tolist() == ["100", "1000", "null"]
    assert differences(frame)["method"].tolist()[0] == "size=1000" and differences(frame)["vs"].tolist()[0] == "size=100"


def test_a_key_that_another_determines_is_not_a_method_of_its_own():
    """In a block sweep each block has one std (none for zero): the blocks are the methods. In the Gaussian-std sweep
    one block has three stds: block and std together are."""
    blocks = pd.DataFrame({"block": ["zero", "gauss", "single"], "block_std": [None, "standard", None], "seed": [0, 0, 0]})
    assert method_columns(blocks) == ["block"]
    stds = pd.DataFrame({"block": ["zero", "gauss", "gauss", "gauss"], "block_std": [None, "0.02", "standard", "standard_x3"]})
    assert method_columns(stds) == ["block", "block_std"]


def test_composed_controlnets_and_their_scale_are_the_methods_of_a_composition_sweep():
    """Each net alone at scale 1 and both composed at 0.5 and 1: four methods, named by composition and scale."""
    frame = pd.DataFrame({"block": ["zero"] * 4, "composition": ["sketch", "seg", "sketch+seg", "sketch+seg"],
                          "sampling.conditioning_scale": [1.0, 1.0, 0.5, 1.0], "seed": [0] * 4})
    assert method_columns(frame) == ["composition", "sampling.conditioning_scale"]


def test_the_archive_holds_the_multirun_config_and_every_record_but_no_checkpoint(tmp_path):
    sweep = tmp_path / "sweep"
    write_sweep(sweep, {"zero": {0: 0.5}, "gauss": {0: 0.6}})
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "0_block=zero,seed=0" / "checkpoints").mkdir()
    (sweep / "0_block=zero,seed=0" / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    copied = archive_sweep(sweep, tmp_path / "out")
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in copied) == [
        "jobs/0_block=zero,seed=0/results.json", "jobs/1_block=gauss,seed=0/results.json", "multirun.yaml"]
    assert (tmp_path / "out" / "jobs" / "1_block=gauss,seed=0" / "results.json").read_text() == (sweep / "1_block=gauss,seed=0" / "results.json").read_text()


def test_the_archive_of_a_split_sweep_makes_the_same_tables_as_its_multiruns(tmp_path):
    """A sweep run over two sittings: each part archived (what gets committed), the multiruns then gone; the archives
    alone give the same tables."""
    write_sweep(tmp_path / "first", {"zero": REFERENCE})
    write_sweep(tmp_path / "later", {"gauss": TREATMENT})
    _, from_runs = write_tables(tmp_path / "first", tmp_path / "from_runs", extra_sweeps=[tmp_path / "later"])
    archive_sweep(tmp_path / "first", tmp_path / "archive")
    archive_sweep(tmp_path / "later", tmp_path / "archive" / "extra_sweeps" / "later")
    _, from_archive = write_tables(tmp_path / "archive", tmp_path / "from_archive", extra_sweeps=[tmp_path / "archive" / "extra_sweeps" / "later"])
    for name in ("csv", "differences_csv"):
        assert from_archive[name].read_text() == from_runs[name].read_text()
    assert "block=gauss" in pd.read_csv(from_archive["differences_csv"])["method"].tolist()


def test_one_arm_of_an_archived_experiment_joins_as_the_reference(tmp_path):
    """only=[data.prompt_dropout=0.5]: of an earlier experiment's archive (dropout 0 and 0.5), only the 0.5 arm joins a
    new sweep's tables, and archiving them again copies only that arm's records."""
    def set_dropout(sweep: Path, dropout_of_job) -> None:
        for job in sweep.iterdir():
            record = json.loads((job / "results.json").read_text())
            (job / "results.json").write_text(json.dumps({**record, "data": {"prompt_dropout": dropout_of_job(job)}}))
    write_sweep(tmp_path / "earlier", {"single": {0: 0.1, 1: 0.2, 2: 0.3}, "zero": REFERENCE})
    set_dropout(tmp_path / "earlier", lambda job: 0.5 if "zero" in job.name else 0.0)
    archive_sweep(tmp_path / "earlier", tmp_path / "earlier_archive")
    write_sweep(tmp_path / "new", {"gauss": TREATMENT})
    set_dropout(tmp_path / "new", lambda job: 0.5)
    only = ["data.prompt_dropout=0.5"]
    table, _ = write_tables(tmp_path / "new", tmp_path / "out", extra_sweeps=[tmp_path / "earlier_archive"], only=only)
    assert table["block"].tolist() == ["gauss", "zero"] and table["seeds"].tolist() == [3, 3]
    copied = archive_sweep(tmp_path / "earlier_archive", tmp_path / "again", only)
    assert sorted(p.parent.name for p in copied) == ["3_block=zero,seed=0", "4_block=zero,seed=1", "5_block=zero,seed=2"]
    with pytest.raises(SweepError, match="no job records data.size"):
        write_tables(tmp_path / "new", tmp_path / "out", only=["data.size=100"])


def test_curve_values_at_chosen_steps_get_intervals_and_paired_differences(tmp_path):
    """Color accuracy on the fidelity curve at step 25: the treatment's is 0.10-0.12 lower, depending on the seed."""
    write_sweep(tmp_path / "sweep", {"zero": REFERENCE, "gauss": TREATMENT})
    for job in (tmp_path / "sweep").iterdir():
        record = json.loads((job / "results.json").read_text())
        drop = 0.1 + record["seed"] / 100 if record["block"] == "gauss" else 0.0
        record["metrics"].update(curve_images=64, curve_metric="edge_f1", curve=[{"step": 0, "edge_f1": 0.2, "color_accuracy": 0.7},
                                                         {"step": 25, "edge_f1": 0.3, "color_accuracy": 0.8 - drop + record["seed"] / 100}])
        (job / "results.json").write_text(json.dumps(record))
    _, paths = write_tables(tmp_path / "sweep", tmp_path / "out", curve_steps=[0, 25])
    numbers = pd.read_csv(paths["differences_csv"]).set_index("metric")
    at_25 = numbers.loc["color acc. at step 25 (curve, 64 held-out)"]
    assert at_25["difference"] == pytest.approx(-0.11) and at_25["verdict"] == "lower" and at_25["paired"]
    assert numbers.loc["edge F1 at step 0 (curve, 64 held-out)", "verdict"] == "identical"
    assert "color acc. at step 25 (curve, 64 held-out)" in paths["markdown"].read_text()
    assert paths["color_curves"].name == "color_accuracy_curves.png" and paths["color_curves"].stat().st_size > 0
    with pytest.raises(ValueError, match=r"no job's curve has step 30 \(recorded: \[0, 25\]\)"):
        write_tables(tmp_path / "sweep", tmp_path / "out", curve_steps=[30])


def test_a_sweep_whose_curves_lack_color_accuracy_joins_one_whose_curves_have_it(tmp_path):
    """An older arm's curves recorded only the fidelity metric: the color plot shows the jobs that recorded it."""
    write_sweep(tmp_path / "sweep", {"zero": REFERENCE, "gauss": TREATMENT})
    for job in (tmp_path / "sweep").iterdir():
        record = json.loads((job / "results.json").read_text())
        point = {"step": 0, "edge_f1": 0.2, **({"color_accuracy": 0.7} if record["block"] == "gauss" else {})}
        record["metrics"].update(curve_images=64, curve_metric="edge_f1", curve=[point])
        (job / "results.json").write_text(json.dumps(record))
    _, paths = write_tables(tmp_path / "sweep", tmp_path / "out")
    assert paths["color_curves"].stat().st_size > 0 and paths["curves"].stat().st_size > 0


def test_conditions_with_different_fidelity_metrics_also_get_mask_iou_curves(tmp_path):
    """A condition sweep: edge F1 curves for one condition, seg mIoU for the other. Each keeps its own metric, and mask
    IoU, which every curve records, is plotted on one scale for both; only such a sweep gets that plot."""
    write_sweep(tmp_path / "sweep", {"zero": REFERENCE, "gauss": TREATMENT})
    for job in (tmp_path / "sweep").iterdir():
        record = json.loads((job / "results.json").read_text())
        metric = "edge_f1" if record["block"] == "zero" else "seg_miou"
        record["metrics"].update(curve_images=64, curve_metric=metric, curve=[{"step": 0, metric: 0.2, "mask_iou": 0.1},
                                                                              {"step": 25, metric: 0.5, "mask_iou": 0.4 + record["seed"] / 100}])
        (job / "results.json").write_text(json.dumps(record))
    _, paths = write_tables(tmp_path / "sweep", tmp_path / "out", curve_steps=[25])
    assert paths["mask_iou_curves"].name == "mask_iou_curves.png" and paths["mask_iou_curves"].stat().st_size > 0
    table = pd.read_csv(paths["csv"]).set_index("block")
    assert table.loc["gauss", "metrics.curve_at_25.seg_miou:mean"] == pytest.approx(0.5)
    assert math.isnan(table.loc["zero", "metrics.curve_at_25.seg_miou:mean"])
    write_sweep(tmp_path / "one_metric", {"zero": REFERENCE})
    for job in (tmp_path / "one_metric").iterdir():
        record = json.loads((job / "results.json").read_text())
        record["metrics"].update(curve_images=64, curve_metric="edge_f1", curve=[{"step": 0, "edge_f1": 0.2, "mask_iou": 0.1}])
        (job / "results.json").write_text(json.dumps(record))
    assert "mask_iou_curves" not in write_tables(tmp_path / "one_metric", tmp_path / "out_one")[1]


def test_the_tables_read_results_without_loading_the_models_libraries():
    """eval/tables.py reads JSON files: it must not pay for (or need) torch, diffusers, transformers or clean-fid."""
    import subprocess
    import sys

    heavy = ("torch", "diffusers", "transformers", "cleanfid", "lightning")
    code = f"import sys, runpy; runpy.run_path('eval/tables.py', run_name='imported'); print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_records_of_either_entry_point_and_of_earlier_versions_read_in_one_shape():
    experiments = Path(__file__).resolve().parents[1] / "experiments"
    rescored = read_record(next((experiments / "multi_controlnet" / "jobs").glob("*/eval.json")))  # written before kind existed
    assert rescored["kind"] == "eval" and rescored["wall_time_s"] == {"total": pytest.approx(rescored["wall_time_s"]["total"])}
    trained = read_record(next((experiments / "ablation_block" / "jobs").glob("*/results.json")))
    assert trained["kind"] == "train" and trained["wall_time_s"]["total"] > trained["wall_time_s"]["until_trained"]


PLAN = """experiment: ablation_block
seeds: [0, 1, 2]
claims:
  - name: zero beats gauss
    treatment: ["block=gauss"]
    control: ["block=zero"]
    metric: mask_iou
    prompt: perfect
    direction: lower
    margin: 0.05
    secondary: [metrics.prompt_settings.none.mask_iou]
  - name: the prompt matters less to gauss
    treatment: ["block=gauss"]
    control: ["block=zero"]
    metric: mask_iou
    prompt: {none: 1, perfect: -1}
    direction: higher
    margin: 0.05
"""


def planned(tmp_path: Path, scores: dict, plan: str = PLAN) -> pd.DataFrame:
    write_sweep(tmp_path / "sweep", scores)
    (tmp_path / "plan.yaml").write_text(plan)
    frame, _ = load_sweep(tmp_path / "sweep")
    return plan_verdicts(load_plan(tmp_path / "plan.yaml"), frame).set_index("claim")


def test_a_plan_decides_each_claim_from_its_primary_interval(tmp_path):
    # gauss is 0.2 lower in every seed (+-0.01); seed 3 is not in the plan and is left out
    table = planned(tmp_path, {"zero": {0: 0.60, 1: 0.70, 2: 0.80, 3: 0.0}, "gauss": {0: 0.40, 1: 0.51, 2: 0.59, 3: 0.9}})
    first = table.loc["zero beats gauss"]
    assert first["verdict"] == "reproduced" and first["difference"] == pytest.approx(-0.2) and first["seeds"] == 3
    assert first["secondary"]["metrics.prompt_settings.none.mask_iou"].startswith("-0.100")
    # none - perfect is -value / 2 per job: gauss - zero is +0.1, the predicted direction
    assert table.loc["the prompt matters less to gauss", "verdict"] == "reproduced"


def test_a_plan_calls_the_other_direction_contradicted_a_close_pair_equivalent_and_a_missing_seed_incomplete(tmp_path):
    higher = planned(tmp_path / "a", {"zero": {0: 0.4, 1: 0.5, 2: 0.6}, "gauss": {0: 0.6, 1: 0.71, 2: 0.79}})
    assert higher.loc["zero beats gauss", "verdict"] == "contradicted"
    close = planned(tmp_path / "b", {"zero": {0: 0.40, 1: 0.50, 2: 0.60}, "gauss": {0: 0.401, 1: 0.502, 2: 0.599}})
    assert close.loc["zero beats gauss", "verdict"] == "equivalent"
    noisy = planned(tmp_path / "c", {"zero": {0: 0.4, 1: 0.5, 2: 0.6}, "gauss": {0: 0.2, 1: 0.7, 2: 0.5}})
    assert noisy.loc["zero beats gauss", "verdict"] == "undecided"
    short = planned(tmp_path / "d", {"zero": {0: 0.6, 1: 0.7, 2: 0.8}, "gauss": {0: 0.4, 1: 0.5}})
    assert short.loc["zero beats gauss", "verdict"] == "incomplete" and short.loc["zero beats gauss", "missing_seeds"] == [2]


@pytest.mark.bad_input
@pytest.mark.parametrize("change, message", [("direction: lower\n    margin: 0.05\n    secondary", "claims[0].direction="),
                                             ("margin: 0.05\n    secondary", "claims[0].margin must be > 0")])
def test_an_impossible_plan_is_refused_naming_the_file_and_key(tmp_path, change, message):
    broken = PLAN.replace(change, change.replace("direction: lower", "direction: down") if "direction" in message
                          else change.replace("margin: 0.05", "margin: 0"), 1)
    (tmp_path / "plan.yaml").write_text(broken)
    with pytest.raises(SweepError, match=f"plan.yaml: {message}".replace("[", r"\[").replace("]", r"\]")):
        load_plan(tmp_path / "plan.yaml")


def test_a_plan_counts_as_registered_only_if_every_job_ran_at_a_commit_holding_it(tmp_path):
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "plan.yaml").write_text(PLAN)
    git("add", "plan.yaml")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "plan")
    before = git("rev-parse", "HEAD")
    frame = pd.DataFrame({"provenance.commit": [before, before]})
    assert registration(load_plan(tmp_path / "plan.yaml"), frame)["pre_registered"] is True
    (tmp_path / "plan.yaml").write_text(PLAN.replace("margin: 0.05", "margin: 0.2", 1))  # the margin widened after the runs
    changed = registration(load_plan(tmp_path / "plan.yaml"), frame)
    assert changed["pre_registered"] is False and changed["commits_without_this_plan"] == [before[:7]]


def test_the_tables_entry_point_writes_the_plans_verdicts_beside_the_tables(tmp_path):
    write_sweep(tmp_path / "sweep", {"zero": {0: 0.60, 1: 0.70, 2: 0.80}, "gauss": {0: 0.40, 1: 0.51, 2: 0.59}})
    (tmp_path / "sweep" / "plan.yaml").write_text(PLAN)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "eval" / "tables.py"), f"sweep={tmp_path / 'sweep'}",
                           "wandb=false"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    shown = (tmp_path / "sweep" / "verdicts.md").read_text()
    assert "| zero beats gauss" in shown and "reproduced" in shown and "Pre-registered: unknown" in shown


def test_a_one_arm_claim_is_decided_against_its_reference(tmp_path):
    plan = """experiment: sudden
seeds: [0, 1, 2]
claims:
  - name: the rise is sudden
    treatment: ["block=zero"]
    reference: 0.5
    metric: mask_iou
    prompt: perfect
    direction: lower
    margin: 0.05
"""
    table = planned(tmp_path, {"zero": {0: 0.30, 1: 0.32, 2: 0.29}}, plan)
    row = table.loc["the rise is sudden"]
    assert row["verdict"] == "reproduced" and row["difference"] == pytest.approx(-0.19667, abs=1e-4) and row["primary"].endswith("- 0.5")
    (tmp_path / "plan.yaml").write_text(plan.replace("    reference: 0.5\n", "    reference: 0.5\n    control: [\"block=gauss\"]\n"))
    with pytest.raises(SweepError, match=r"claims\[0\] needs exactly one of control"):
        load_plan(tmp_path / "plan.yaml")


def test_a_job_run_under_an_older_stopping_rule_counts_as_planned_only_if_the_plans_rule_stops_it_at_the_same_step():
    """The plan's rule replayed on the recorded curve: a job that had risen when it stopped stops there under min_rise
    too; one stopped while still flat at the base's level would have run on, and is a deviation."""
    steps = list(range(0, 3100, 100))
    noise = [0.005 * math.sin(1.7 * s) for s in steps]
    risen = [0.25 + 0.5 * min(s, 1000) / 1000 + n for s, n in zip(steps, noise)]
    flat = [0.25 + n for n in noise]
    old_rule = {"points": 10, "max_slope_per_1k": 0.05, "min_steps": 1500}
    plan_rule = {"enabled": True, **old_rule, "min_rise": 0.1}

    def job(values):
        stop = first_converged_step(steps[:len(values)], values, **old_rule)
        return pd.Series({"metrics.curve": [{"step": s, "edge_f1": v} for s, v in zip(steps, values) if stop is None or s <= stop],
                          "metrics.curve_metric": "edge_f1", "metrics.stopping.enabled": True, "metrics.stopping.converged_at_step": math.nan if stop is None else stop,
                          "metrics.stopping.rule.metric": None})

    assert stops_as_planned(plan_rule, job(risen)) and not stops_as_planned(plan_rule, job(flat))
    capped = job(flat[:14])  # stopped by neither rule before its cap at step 1,300
    assert pd.isna(capped["metrics.stopping.converged_at_step"]) and stops_as_planned(plan_rule, capped)
