"""Sweeps on Hydra's launchers and sweepers, and the training knobs: optimizer, learning-rate schedule, config tree."""
import csv
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.distributed.fsdp.wrap import enable_wrap
from torch.utils.data import DataLoader

from conftest import ROOT, compose_train, every_traceback, fill50k_dataset, run_train, train_command
from controlnet_lab.config_checks import ConfigError, check_train_config
from controlnet_lab.export import export
from controlnet_lab.module import ControlNetModule
from controlnet_lab.search_space import block_parameters

FAST = ["experiment=smoke", "eval.fid_domain.enabled=false", "~callbacks.fidelity_curve"]  # the default loggers: W&B (offline) and CSV


def test_an_optuna_search_runs_on_any_block_and_searches_the_std_only_with_gauss():
    assert compose_train(["hparams_search=optuna"]).block.name == "zero"  # the default block, not forced to gauss
    for block, searched in (("zero", set()), ("single", set()), ("gauss", {"block.std"})):
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        block_parameters(OmegaConf.create({"block": {"name": block}}), trial)
        assert set(trial.params) == searched


@pytest.mark.slow
def test_an_optuna_search_returns_each_jobs_metric(tmp_path):
    result = run_train(["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "block=gauss", *FAST], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "smoke" / "multiruns").iterdir()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    scores = [json.loads(p.read_text())["metrics"]["edge_f1"] for p in sweep.glob("*/results.json")]
    assert len(scores) == 2 and best["best_value"] == pytest.approx(max(scores))
    jobs = [yaml.safe_load((p.parent / ".hydra" / "config.yaml").read_text()) for p in sweep.glob("*/results.json")]
    assert all(job["block"]["name"] == "gauss" and isinstance(job["block"]["std"], float) for job in jobs)
    assert "CONFIG" in result.stdout and "optimized_metric" in result.stdout  # the config tree, printed by each job


def submitit_tasks(sweep_root: Path) -> dict[int, Path]:
    """The running submitit tasks of a sweep under ``sweep_root``: process id -> the job directory whose train.log it
    has open."""
    tasks = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or b"submitit.core._submit" not in (proc / "cmdline").read_bytes():
                continue
            logs = [Path(os.readlink(fd)) for fd in (proc / "fd").iterdir()]
        except OSError:  # the process ended meanwhile
            continue
        tasks.update({int(proc.name): log.parent for log in logs if log.name == "train.log" and sweep_root in log.parents})
    return tasks


@pytest.mark.slow
def test_a_submitit_job_sent_the_time_limit_signal_is_requeued_and_resumes(tmp_path):
    """hydra/launcher=local: two jobs as local processes, one locked base. Each job is sent submitit's signal (USR2,
    what SLURM sends before the time limit) after its first checkpoint: it writes interrupted.ckpt after the batch in
    progress, submitit requeues it, and it continues from that checkpoint in its own directory to the last step."""
    sweep_root = tmp_path / "outputs" / "smoke" / "multiruns"
    command = train_command(["-m", "hydra/launcher=local", "seed=0,1", *FAST, "trainer.max_steps=30"], tmp_path)
    command["env"]["OMP_NUM_THREADS"] = "1"  # two jobs at once on two cores: one thread each (two each run 10x slower)
    process = subprocess.Popen(**command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    signalled, deadline = set(), time.time() + 300
    while len(signalled) < 2 and process.poll() is None and time.time() < deadline:
        for pid, job_dir in submitit_tasks(sweep_root).items():
            if job_dir not in signalled and (job_dir / "checkpoints" / "last.ckpt").is_file():
                os.kill(pid, signal.SIGUSR2)
                signalled.add(job_dir)
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0 and len(signalled) == 2, stderr[-3000:]
    (sweep,) = sweep_root.iterdir()
    records = sorted((json.loads(p.read_text()) for p in sweep.glob("*/results.json")), key=lambda r: r["seed"])
    assert [r["seed"] for r in records] == [0, 1] and all(r["global_step"] == 30 for r in records)
    assert all(r["resumed_from"]["checkpoint"].endswith("interrupted.ckpt") and 3 <= r["resumed_from"]["global_step"] < 30 for r in records)
    assert len({r["base"]["fingerprint"] for r in records}) == 1  # two processes, one locked base
    for job_dir in signalled:  # one log, every step once, in the job's own directory
        with (job_dir / "csv" / "version_0" / "metrics.csv").open() as log:
            assert sorted(int(row["step"]) for row in csv.DictReader(log) if row["train/loss"]) == list(range(30))
    assert len(list(sweep.glob(".submitit/*/*_submitted.pkl"))) == 2


@pytest.mark.slow
def test_two_process_ddp_gives_one_result_equal_to_a_one_process_evaluation(tmp_path):
    result = run_train(["experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                        "trainer.precision=32-true", "eval.fid_domain.enabled=false"], tmp_path, timeout=600)
    assert result.returncode == 0, every_traceback(result.stderr)
    assert "Starting with 2 processes" in result.stderr
    (run_dir,) = (tmp_path / "outputs" / "smoke" / "runs").iterdir()
    assert len(list(tmp_path.glob("outputs/**/results.json"))) == 1 and len(list((tmp_path / "cache" / "base").iterdir())) == 1
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1  # the default W&B logger, on rank 0 only
    record = json.loads((run_dir / "results.json").read_text())
    assert record["global_step"] == 6
    # Rank 0 evaluated; the same checkpoint evaluated again in one process scores the same.
    again = run_train([f"ckpt={run_dir}", "eval.num_images=8", "eval.fid_domain.enabled=false"], tmp_path, script="eval/evaluate.py")
    assert again.returncode == 0, again.stderr[-3000:]
    scores = json.loads((run_dir / "checkpoints" / "eval.json").read_text())["metrics"]
    assert scores["edge_f1"] == record["metrics"]["edge_f1"] and scores["mask_iou"] == record["metrics"]["mask_iou"]


def test_only_rank_zero_samples_the_validation_grid(tiny_base, tiny_data, tmp_path, monkeypatch):
    module = ControlNetModule(str(tiny_base), num_val_images=2, sample_dir=str(tmp_path), sampling={"num_inference_steps": 2})
    batch = next(iter(DataLoader(fill50k_dataset(tiny_data, 16, count=4), batch_size=4)))
    monkeypatch.setattr(ControlNetModule, "global_rank", property(lambda self: 1))
    module.validation_step(batch, 0)
    assert list(tmp_path.iterdir()) == []  # another rank's grid would overwrite rank 0's file while W&B reads it
    monkeypatch.setattr(ControlNetModule, "global_rank", property(lambda self: 0))
    module.validation_step(batch, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000000.png"]


def test_the_slurm_preset_composes():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=a100"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "a100"
    assert launcher["gpus_per_node"] == 1 and launcher["timeout_min"] == 240 and launcher["mem_gb"] == 64


@pytest.mark.bad_input
def test_an_optimizer_that_cannot_be_imported_names_the_key():
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"optimizer._target_=bitsandbytes.optim.AdamW8bit cannot be imported .*pip install bitsandbytes"):
        check_train_config(compose_train(["optimizer=adamw8bit"]))
    with pytest.raises(ConfigError, match="lr_scheduler.name='wobbly'"):
        check_train_config(compose_train(["lr_scheduler.name=wobbly"]))


def test_the_optimizer_and_schedule_follow_the_config(tiny_base):
    cfg = compose_train(["optimizer.weight_decay=0.5", "lr_scheduler.name=cosine", "lr_scheduler.warmup_steps=2", "model.controlnet.lr=0.01"])
    module = ControlNetModule(str(tiny_base), num_val_images=0, optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
                              lr_scheduler=OmegaConf.to_container(cfg.lr_scheduler, resolve=True), max_steps=10)
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.5 and optimizer.defaults["eps"] == 1e-8
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # Linear warmup over 2 steps, then a half cosine from 0.01 to 0 over the remaining 8.
    assert rates[:3] == pytest.approx([0.0, 0.005, 0.01]) and rates[-1] == pytest.approx(0.01 * 0.5 * (1 + torch.cos(torch.tensor(7 / 8 * torch.pi)).item()))
    assert configured["lr_scheduler"]["interval"] == "step"


KNOBS = ["trainer.precision=bf16-mixed", "model.base.dtype=bfloat16", "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=1",
         "model.controlnet.gradient_checkpointing=true", "lr_scheduler.name=cosine", "lr_scheduler.warmup_steps=2",
         "model.ema.enabled=true", "model.ema.decay=0.9"]


@pytest.mark.slow
def test_every_training_knob_at_once_trains_the_controlnet_alone_and_exports_its_average(tmp_path):
    result = run_train([*FAST, *KNOBS], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "smoke" / "runs").iterdir()
    record = json.loads((run_dir / "results.json").read_text())
    assert record["global_step"] == 6 and record["base"]["dtype"] == "bfloat16"
    with (run_dir / "csv" / "version_0" / "metrics.csv").open() as log:
        rates = [(int(row["step"]), float(row["lr-AdamW"])) for row in csv.DictReader(log) if row["lr-AdamW"]]
    # One rate per optimizer step (two batches each): a 2-step warmup to model.controlnet.lr, then the half cosine.
    peak = 1e-3
    assert sorted(set(rates)) == [(i, pytest.approx(r)) for i, r in enumerate(
        [0.0, peak / 2, peak, *(peak * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3))])]

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    raw = checkpoint["state_dict"]
    assert raw and all(key.startswith("controlnet.") for key in raw)
    # The optimizer holds the ControlNet's parameters and nothing else.
    assert len(checkpoint["optimizer_states"][0]["param_groups"][0]["params"]) == len(raw)
    assert checkpoint["controlnet_ema"]["optimization_step"] == 6  # one average step per optimizer step, not per batch

    export(run_dir / "checkpoints" / "last.ckpt", tmp_path / "export")  # what src/export.py runs
    weights = load_file(tmp_path / "export" / "controlnet" / "diffusion_pytorch_model.safetensors")
    averaged = dict(zip((key.removeprefix("controlnet.") for key in raw), checkpoint["controlnet_ema"]["shadow_params"]))
    assert weights.keys() == averaged.keys() and all(torch.equal(weights[k], averaged[k]) for k in weights)
    assert all(not torch.equal(weights[k], raw[f"controlnet.{k}"]) for k in weights)


def test_the_optimizer_holds_only_controlnet_parameters_under_every_knob(tiny_base):
    cfg = compose_train(["optimizer=adamw", "lr_scheduler.name=cosine_with_restarts", "model.ema.enabled=true"])
    module = ControlNetModule(str(tiny_base), num_val_images=0, gradient_checkpointing=True, base_dtype="bfloat16",
                              optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
                              lr_scheduler=OmegaConf.to_container(cfg.lr_scheduler, resolve=True), max_steps=10,
                              ema={"decay": 0.9})
    optimizer = module.configure_optimizers()["optimizer"]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in module.controlnet.parameters()}
    assert not any(p.requires_grad for name in module.locked_names for p in getattr(module, name).parameters())
    assert module.locked_unet.dtype == torch.bfloat16 and module.controlnet.dtype == torch.float32


class RecordedWrap(torch.nn.Module):
    """Stands in for FullyShardedDataParallel (which Lightning runs on GPUs only) to see what would be sharded."""
    def __init__(self, module, **settings):
        super().__init__()
        self.module, self.settings = module, settings


def test_fsdp_would_shard_the_controlnet_alone(tiny_base):
    module = ControlNetModule(str(tiny_base), num_val_images=0)
    controlnet = module.controlnet
    with enable_wrap(wrapper_cls=RecordedWrap, sharding_strategy="FULL_SHARD"):
        module.configure_model()
    assert isinstance(module.controlnet, RecordedWrap) and module.controlnet.module is controlnet
    assert not any(isinstance(m, RecordedWrap) for name in module.locked_names for m in getattr(module, name).modules())
    module.configure_model()  # outside Lightning's FSDP context (every other strategy): nothing changes
    assert module.controlnet.module is controlnet


@pytest.mark.bad_input
def test_the_fsdp_trainer_composes_and_refuses_ema():
    cfg = compose_train(["trainer=fsdp"])
    assert cfg.trainer.strategy._target_.endswith("FSDPStrategy") and cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 2
    with pytest.raises(ConfigError, match="model.ema.enabled=true cannot be used with trainer=fsdp"):
        check_train_config(compose_train(["trainer=fsdp", "model.ema.enabled=true"]))
