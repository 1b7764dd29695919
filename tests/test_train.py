"""src/train.py through its real Hydra entry point, at smoke size."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT, SHARED_DATA, SMOKE_DATA_COUNT, compose_train, run_train
from reliability import EPOCH_BATCHES, SMOKE, compare, kill_point, straight_run, survived
from controlnet_lab.bases.pretraining import cache_key
from controlnet_lab.config_checks import ConfigError, check_train_config
from controlnet_lab.metrics.convergence import rise, sudden_convergence_step
from controlnet_lab.tables.plan import load_plan
from controlnet_lab.metrics.oracle import random_placement_iou
from controlnet_lab.images import to_uint8
from controlnet_lab.tables.report import write_tables
from controlnet_lab.tracking import wandb_mode
from controlnet_lab.data.datamodule import build_datamodule
from controlnet_lab.evaluation.suite import metric_suite


def test_smoke_writes_results_and_checkpoint(smoke_run):
    tmp, run_dir = smoke_run
    results = json.loads((run_dir / "results.json").read_text())
    metrics = results["metrics"]
    assert results["block"] == "zero" and results["seed"] == 0
    assert results["data"]["prompt_dropout"] == 0.5 and results["data"]["size"] == 64
    assert results["split"]["held_out"] == 16 and results["split"]["train"] == 64 and results["split"]["exact_duplicates_excluded"] == 0
    # the held-out set's validation part (curve, validation loss) and test part (final scores) are disjoint
    assert (results["split"]["validation"], results["split"]["test"], results["split"]["validation_and_test_disjoint"]) == (8, 8, True)
    assert results["global_step"] == 6
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    provenance = results["provenance"]  # which code and machine, and what else ran meanwhile
    assert provenance["commit"] == head and provenance["machine"]["cores"] == os.cpu_count() and provenance["other_load"]["other_cpu_s"] >= 0
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 6
    assert not any(k.startswith(("locked_unet.", "text_encoder.")) for k in checkpoint["state_dict"])
    # The top-level scores are the perfect prompt's; 8 images make color accuracy a multiple of 1/8.
    assert metrics["mask_iou"] == metrics["prompt_settings"]["perfect"]["mask_iou"] and metrics["eval_images"] == 8
    assert metrics["centre_error_px"] == metrics["prompt_settings"]["perfect"]["centre_error_px"] >= 0  # also under every prompt
    assert all(0 <= scores["centre_error_px"] <= 16 * 2 ** 0.5 / 2 for scores in metrics["prompt_settings"].values())
    # eval.train_images=8: the perfect prompt on 8 training conditions, and the gap to the held-out scores.
    seen, gap = metrics["seen"], metrics["seen_minus_held_out"]
    assert seen["images"] == 8 and set(gap) == {"mask_iou", "color_accuracy", "centre_error_px", "edge_f1"}
    assert all(gap[key] == pytest.approx(seen[key] - metrics[key]) for key in gap)
    assert (8 * metrics["color_accuracy"]).is_integer() and (8 * metrics["base_color_accuracy"]).is_integer()
    # The trainable parameters are exactly the ControlNet's, and its connection convs started at zero.
    assert metrics["trainable_params"] == sum(v.numel() for k, v in checkpoint["state_dict"].items() if k.startswith("controlnet."))
    assert set(metrics["block_init_std"].values()) == {0.0} and "controlnet_mid_block" in metrics["block_init_std"]
    assert metrics["initial_output_change"] == {"mean_abs_change": 0.0, "relative": 0.0, "images": 8}  # zero convs, the 8 validation samples
    # The random-placement IoU is that of the run's own held-out outlines, read here again.
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    dataset = build_datamodule(cfg.data).test_dataset()
    outlines = to_uint8(torch.stack([dataset[i]["source"] for i in range(8)]), 0.0, 1.0)
    assert metrics["random_placement_mask_iou"] == pytest.approx(random_placement_iou(outlines))
    assert (run_dir / "eval_samples.png").is_file()


def test_smoke_reports_fidelity_fid_and_the_curve(smoke_run):
    _, run_dir = smoke_run
    metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
    assert 0.0 <= metrics["edge_f1"] <= 1.0 and metrics["condition_fidelity"] == {"metric": "edge_f1", "detector": "canny", "images": 8, "tolerance_px": 1}
    assert all("edge_f1" in scores for scores in metrics["prompt_settings"].values())
    # every setting's floors (eval.reference_points): the base alone and the ControlNet given another sample's condition
    assert all({"mask_iou", "edge_f1"} <= set(scores[ref]) for scores in metrics["prompt_settings"].values()
               for ref in ("base_alone", "shuffled_condition"))
    # 8 images in the domain net's 64-d feature space: no Fréchet distance, and the record says why
    assert "fid_domain" not in metrics and metrics["skipped"]["fid_domain"].startswith("8 images in a 64-d feature space")
    assert metrics["failed"] == {}
    assert [point["step"] for point in metrics["curve"]] == [0, 3, 6] and metrics["curve_metric"] == "edge_f1"
    assert all((4 * point["color_accuracy"]).is_integer() and 0 <= point["mask_iou"] <= 1 for point in metrics["curve"])  # 4 images
    steps, values = [p["step"] for p in metrics["curve"]], [p["edge_f1"] for p in metrics["curve"]]
    assert metrics["rise"] == rise(steps, values)
    assert metrics["sudden_convergence_step"] == sudden_convergence_step(steps, values)
    # the stopping rule is off by default, and 3 points are fewer than its 16: recorded, not read
    assert metrics["stopping"]["enabled"] is False and metrics["stopping"]["converged"] is False and metrics["stopping"]["last_reading"] is None


@pytest.fixture(scope="module")
def sweep_with_a_failed_job(tmp_path_factory):
    """A smoke sweep whose first job has an impossible prompt dropout; the second is the smoke run without the
    fidelity curve and the domain FID (both evaluation only)."""
    tmp = tmp_path_factory.mktemp("failed-sweep")
    result = run_train(["-m", "experiment=smoke", "logger=csv", "eval.fid_domain.enabled=false", "~callbacks.fidelity_curve",
                        "data.prompt_dropout=7,0.5"], tmp, timeout=600)
    (sweep,) = (tmp / "outputs" / "smoke" / "multiruns").iterdir()
    return result, sweep


@pytest.mark.slow
def test_the_fidelity_curve_does_not_change_training(smoke_run, sweep_with_a_failed_job):
    _, run_dir = smoke_run
    _, sweep = sweep_with_a_failed_job
    (other,) = sweep.glob("1_*data.prompt_dropout=0.5*")
    with_curve = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    without = torch.load(other / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert with_curve.keys() == without.keys() and all(torch.equal(with_curve[k], without[k]) for k in with_curve)


@pytest.mark.slow
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(smoke_run, tmp_path):
    """12 steps straight, against: 6 steps (the smoke run) resumed in its own directory to 12 (mid-epoch: the smoke data
    has 8 batches an epoch); one run sent SIGKILL at a random time up to 1 s after its first checkpoint (step 3: within
    the remaining training steps); and one that sends itself SIGTERM in the epoch's last batch (step 8), whose stop
    Lightning defers to after the epoch's end; each then resumed. What benchmarks/reliability.py does for the README's
    figures, at its smallest (it also kills up to 3 s after, into the final evaluation, and sends random SIGTERMs)."""
    tmp, first = smoke_run
    overrides = [*SMOKE, f"data.cache_dir={SHARED_DATA[0]}", SMOKE_DATA_COUNT]
    straight = straight_run(tmp, overrides)

    stopped = tmp_path / "stopped"
    shutil.copytree(first, stopped)  # the fixture's run stays as it is for the other tests
    resumed = run_train(["experiment=smoke", "logger=csv", "trainer.max_steps=12", f"paths.run_dir={stopped}", "ckpt_path=last"], tmp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    comparison = compare(straight, stopped)
    assert survived(comparison, killed=False) and comparison["resumed_from_step"] == 6, comparison
    record = json.loads((stopped / "results.json").read_text())
    assert [p["step"] for p in record["metrics"]["curve"]] == [0, 3, 6, 9, 12] and not comparison["losses_missing_at"]

    killed = kill_point(tmp, straight, tmp_path / "killed", signal.SIGKILL, random.uniform(0.0, 1.0), overrides)
    assert killed["survived"], killed
    terminated = kill_point(tmp, straight, tmp_path / "terminated", signal.SIGTERM, overrides=overrides, at_step=EPOCH_BATCHES)
    # the state after the batch in progress and its epoch's end is saved (the next epoch's start), then the run stops
    assert terminated["survived"] and terminated["resumed_from_step"] == EPOCH_BATCHES, terminated
    assert terminated["exit_status"] == 143 and terminated["interrupted_ckpt"], terminated
    interrupted = torch.load(tmp_path / "terminated" / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=True)
    assert interrupted["epoch"] == 1 and interrupted["global_step"] == EPOCH_BATCHES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "stopped", "terminated"]  # each continued in its own directory


def test_base_is_pretrained_once_and_reused(smoke_run):
    tmp, _ = smoke_run
    bases = list((tmp / "cache" / "base").glob("base-*"))
    assert len(bases) == 1 and (bases[0] / "model_index.json").is_file()


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.size=-5", "data.size"),
        ("data.resolution=18", "data.resolution"),
        ("data.prompt_dropout=1.5", "data.prompt_dropout"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("model.sampling.resolution_weighting=loud", "model.sampling.resolution_weighting"),
        ("model.sampling.resolution_weighting=paper", "model.sampling.resolution_weighting=paper needs classifier-free guidance"),
        ("eval.num_images=0", "eval.num_images"),
        ("eval.prompt_settings=[none,loud]", "eval.prompt_settings: unknown prompt setting"),
        ("eval.prompt_settings=[none]", "eval.prompt_settings: must include perfect"),
        ("data.held_out.max_distance=1.5", "data.held_out.max_distance"),
        ("block=gauss block.std=-1", "block.std"),
        ("model.compile=3", "model.compile must be true, false or torch.compile's keyword arguments"),
        ("model.compile=true trainer=fsdp", "model.compile cannot be used with trainer=fsdp"),
        ("model.base.cache_dtype=int8", "model.base.cache_dtype='int8'"),
        ("model.base.encode_batch_size=0", "model.base.encode_batch_size"),
        ("eval.curve_batch_size=0", "eval.curve_batch_size"),
        ("data.num_proc=0", "data.num_proc"),
    ],
)
@pytest.mark.bad_input
def test_bad_config_values_name_their_key(override, key):
    cfg = compose_train(override.split())
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_train_config(cfg)


@pytest.mark.bad_input
def test_entry_points_load_torch_only_after_hydra_has_parsed_the_command_line():
    """A mistyped override or --help answers in about a second, not after torch, Lightning and diffusers have loaded."""
    entry_points = ["src/train.py", "src/sample.py", "src/export.py", "src/build_base.py", "eval/evaluate.py", "eval/tables.py"]
    probe = ("import importlib.util, sys\n"
             f"for path in {entry_points!r}:\n"
             "    spec = importlib.util.spec_from_file_location(path.replace('/', '_')[:-3], path)\n"
             "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
             "print(sorted(m for m in ('torch', 'lightning', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]


def test_unknown_block_and_broken_dataset_fail_before_training(tmp_path):
    result = run_train(["block=lego"], tmp_path, timeout=120)
    assert result.returncode != 0 and "block" in result.stderr and "lego" in result.stderr

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "prompt.json").write_text('{"source": "source/0.png", "target": "target/0.png", "prompt": "red circle with blue background"}\n')
    result = run_train(["logger=csv", "data=fill50k", f"data.root={broken}"], tmp_path, timeout=120)
    assert result.returncode != 0
    assert re.search(r"prompt\.json, line 1: image \S+/(source|target)/0\.png does not exist", result.stderr)  # both are missing
    assert not (tmp_path / "cache" / "base").exists(), "no base was pretrained for a broken dataset"


def test_wandb_follows_its_own_wandb_mode(tmp_path, monkeypatch):
    """WANDB_MODE decides in training as in eval/ (Lightning's offline flag used to override it); unset, offline."""
    for mode in ("disabled", "offline"):
        monkeypatch.setenv("WANDB_MODE", mode)
        logger = hydra.utils.instantiate(compose_train([f"paths.output_dir={tmp_path / mode}"]).logger.wandb)
        assert logger.experiment.settings.mode == mode
        logger.experiment.finish()
    monkeypatch.delenv("WANDB_MODE")
    assert compose_train().logger.wandb.mode == "offline" == wandb_mode()


@pytest.mark.slow
def test_block_sweep_gives_one_result_per_block(tmp_path):
    result = run_train(["-m", "experiment=smoke", "block=zero,gauss,single", "logger.wandb.log_model=all"], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "smoke" / "multiruns").iterdir()
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert sorted(r["block"] for r in records) == ["gauss", "single", "zero"]
    params = {r["block"]: r["metrics"]["trainable_params"] for r in records}
    assert params["single"] < params["zero"] == params["gauss"]
    init = {r["block"]: r["metrics"]["block_init_std"] for r in records}
    assert init["gauss"]["controlnet_down_blocks.0"] == pytest.approx(1 / (3 * 16) ** 0.5)  # standard init of a 1x1 conv on 16 channels
    assert set(init["zero"].values()) == set(init["single"].values()) == {0.0}
    # One W&B run per job, in the group <experiment>-<sweep time>, tagged, its config flat (block.name, ...): strings of
    # W&B's offline run log (its records, synced later as they are).
    runs = list(sweep.glob("*/wandb/offline-run-*"))
    assert len(runs) == 3
    logs = [next(run.glob("run-*.wandb")).read_bytes() for run in runs]
    assert all(f"smoke-{sweep.name}".encode() in log and b"experiment:smoke" in log and b"data.prompt_dropout" in log for log in logs)
    assert {block for block in ("zero", "gauss", "single") for log in logs if f"block:{block}".encode() in log} == {"zero", "gauss", "single"}
    # logger.wandb.log_model=all: each checkpoint as a model artifact of its run, offline too.
    assert all(f"model-{run.name.rsplit('-', 1)[-1]}".encode() in log and b"model.ckpt" in log for run, log in zip(runs, logs))
    # Every model is scored under the paper's prompt settings and the out-of-vocabulary one.
    assert all(set(r["metrics"]["prompt_settings"]) == {"none", "insufficient", "out_of_vocabulary", "conflicting", "perfect"} for r in records)

    tables = subprocess.run([sys.executable, str(ROOT / "eval" / "tables.py"), f"sweep={sweep}", "dashboard=true"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert tables.returncode == 0, tables.stderr[-3000:]
    for name in ("table.md", "table.csv", "table.tex", "mask_iou_by_prompt.png", "samples.png", "fidelity_curves.png"):
        assert (sweep / name).stat().st_size > 0, name
    assert list((sweep / "wandb").glob("offline-run-*")), "the table goes to W&B too"
    # The sweep's W&B workspace (offline: written to save later): its runs, grouped by block, and the keys the jobs logged.
    dashboard = json.loads((sweep / "dashboard.json").read_text())
    assert f"smoke-{sweep.name}" in dashboard["workspace"]["runset_settings"]["filters"]
    assert dashboard["workspace"]["runset_settings"]["groupby"] == [{"name": "block.name"}]
    logged = b"".join(logs)
    assert all(key.encode() in logged for section in ("Fidelity curves by arm", "Final scores by prompt setting")
               for key in dashboard["panel_keys"][section])
    assert "curve/mask_iou" in dashboard["panel_keys"]["Fidelity curves by arm"]
    assert "final/prompt_settings/none/mask_iou" in dashboard["panel_keys"]["Final scores by prompt setting"]
    rows = (sweep / "table.csv").read_text().splitlines()
    assert len(rows) == 4 and [row.split(",")[0] for row in rows[1:]] == ["zero", "gauss", "single"]


@pytest.mark.bad_input
def test_missing_inception_weights_stop_the_run_before_training(tmp_path):
    weights = tmp_path / "no-weights"
    result = run_train(["experiment=smoke", "logger=csv", "eval.fid.inception=true", f"eval.fid.inception_dir={weights}", "eval.fid.download=false"], tmp_path)
    assert result.returncode != 0
    assert f"eval.fid.inception_dir={weights}" in result.stderr and "inception-2015-12-05.pt" in result.stderr
    assert not list((tmp_path / "outputs").rglob("*.ckpt")) and not (tmp_path / "cache" / "base").exists()


@pytest.mark.parametrize("name, swept", [
    ("ablation_block", "block"), ("ablation_prompt_dropout", "data.prompt_dropout"),
    ("ablation_dataset_size", "data.size"), ("ablation_condition", "data.condition"), ("ablation_gauss_std", "block"),
    ("ablation_block_latent", "block"),
])
def test_ablation_experiments_sweep_their_axis_over_three_seeds(name, swept):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert cfg.task_name == name and params.seed == "0,1,2" and len(str(params[swept]).split(",")) >= 3
    assert cfg.model.name == ("tiny_sd" if name.endswith("_latent") else "tiny")
    assert str(cfg.hydra.sweep.dir).startswith(str(ROOT / "outputs" / name))  # resolvable before Hydra runs a job


@pytest.mark.parametrize("plan_file", sorted((ROOT / "experiments").glob("*/plan.yaml")), ids=lambda path: path.parent.name)
def test_each_committed_plan_names_what_its_experiment_runs(plan_file):
    """A plan's seeds, stopping rule and arms are the ones its experiment sweeps, each job is scored on the whole test
    set, and a stopping rule has room below its cap: so that the experiment's records can decide the plan."""
    plan = load_plan(plan_file)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={plan.experiment}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert [int(s) for s in str(params.seed).split(",")] == plan.seeds
    assert {k: cfg.eval.stopping[k] for k in plan.stopping} == plan.stopping
    assert not plan.stopping["enabled"] or cfg.trainer.max_steps > plan.stopping["min_steps"]
    assert cfg.eval.num_images == cfg.data.val_size - cfg.data.validation_size
    for claim in plan.claims:
        for selector in claim.treatment + (claim.control or []):
            key, value = selector.split("=", 1)
            runs = str(params[key]).split(",") if key in params else [str(cfg.hydra.runtime.choices.get(key, OmegaConf.select(cfg, key)))]
            assert value in runs, f"{plan_file}: {claim.name}: {selector} is not among the experiment's {key} {runs}"


def test_run_seeds_share_one_locked_base(tiny_data):
    keys = {cache_key(OmegaConf.to_container(compose_train([f"seed={seed}"]).model.base, resolve=True), "split", 16) for seed in (0, 1)}
    assert len(keys) == 1
    other = cache_key(OmegaConf.to_container(compose_train(["model.base.pretrain.seed=1"]).model.base, resolve=True), "split", 16)
    assert other not in keys


def test_the_domain_feature_net_does_not_depend_on_the_training_size(tiny_data, tmp_path):
    """One FID feature space per dataset, so fid_domain compares across a dataset-size sweep."""
    for size in (10, 30):
        cfg = compose_train(["data=fill50k", f"data.root={tiny_data}", "data.resolution=16", "data.val_size=8", "data.validation_size=4", f"data.size={size}",
                             "eval.fid_domain.steps=2", "eval.fid_domain.count=16", f"paths.cache_dir={tmp_path}"])
        metric_suite(cfg, build_datamodule(cfg.data))
    assert len(list((tmp_path / "fid_domain").glob("*.safetensors"))) == 1


@pytest.mark.slow
def test_a_failed_sweep_job_is_recorded_and_the_others_run(sweep_with_a_failed_job):
    result, sweep = sweep_with_a_failed_job
    assert result.returncode != 0  # the sweep reports its failure at the end
    (failed_dir,) = sweep.glob("0_*data.prompt_dropout=7*")
    failed = json.loads((failed_dir / "failed.json").read_text())
    assert failed["status"] == "failed" and failed["error"] == "ConfigError: data.prompt_dropout must be in [0, 1], got 7"
    (finished,) = sweep.glob("1_*data.prompt_dropout=0.5*/results.json")
    assert json.loads(finished.read_text())["global_step"] == 6  # ran after the failure
    output = result.stdout + result.stderr
    assert "1 job(s) of this sweep failed so far" in output and f"{failed_dir.name}: ConfigError" in output
    write_tables(sweep)
    assert f"{failed_dir.name}: failed (ConfigError: data.prompt_dropout must be in [0, 1], got 7)" in (sweep / "table.md").read_text()
