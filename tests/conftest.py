from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Under pytest-xdist each worker gets its share of the cores (torch and the runs it starts read OMP_NUM_THREADS), so
# that workers do not oversubscribe the CPU: set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from controlnet_lab.bases import build_pixel_base
from controlnet_lab.data.dataset import ControlDataset
from controlnet_lab.data.fill50k import fill50k_samples, read_index
from controlnet_lab.data.synthetic import SyntheticFill50kSpec, write_fill50k
from sd_fixtures import sd_data, sd_folder, sd_folder_two_layers, sdxl_folder, tiny_sd3_folder, tiny_sdxl_folder  # noqa: F401  (session fixtures of the latent-path tests)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("CONTROLNET_LAB_ROOT", str(ROOT))
PALETTE = ("red", "green", "blue", "yellow")


@pytest.fixture(autouse=True)
def _quiet_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)


def compose_train(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides or [])


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    spec = SyntheticFill50kSpec(count=48, resolution=16, palette=PALETTE, radius_range=(0.2, 0.35), outline_thickness=1, seed=0)
    return write_fill50k(spec, tmp_path_factory.mktemp("data") / "fill")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tiny_data) -> Path:
    """An untrained tiny base saved with save_pretrained (the real loading path, no training cost)."""
    cfg = compose_train(["data.resolution=16"])
    pipeline = build_pixel_base(OmegaConf.to_container(cfg.model.base, resolve=True), 16, [record.prompt for record in read_index(tiny_data)])
    folder = tmp_path_factory.mktemp("base") / "tiny"
    pipeline.save_pretrained(folder)
    return folder


def fill50k_dataset(root: Path, resolution: int, count: int | None = None, **settings) -> ControlDataset:
    """The first ``count`` samples (all with None) of a fill50k-format folder, as training reads them."""
    samples = fill50k_samples(root)
    return ControlDataset(samples, range(len(samples) if count is None else count), resolution, **settings)


def stored_paths(data, part: str) -> list[str]:
    """The stored condition files (fill50k sources) of a set-up data module's training or held-out rows."""
    samples, rows = (data.train_samples, data.train_rows) if part == "train" else (data.val_samples, data.val_rows)
    return [samples.conditions.paths[int(row)] for row in rows]


# Generated datasets, shared by every training run of the session (content-keyed and published atomically, as in
# a real cache): generating the synthetic default's 20,000 images takes about 20 s.
SHARED_DATA: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _shared_data_cache(tmp_path_factory):
    SHARED_DATA.append(tmp_path_factory.mktemp("data-cache"))


# The tests' smoke runs on synthetic data generate 2,000 samples, not the default's 20,000: the held-out check, which
# reads every stored condition, then takes about 1 s a run instead of 6.5 s. (experiment=smoke cannot set it itself:
# data=folder and data=hf have no generator.)
SMOKE_DATA_COUNT = "data.generator.count=2000"


def train_command(args: list[str], tmp: Path, script: str = "src/train.py") -> dict:
    """subprocess keyword arguments that run an entry point (src/train.py by default) through Hydra, with outputs and
    caches under ``tmp`` (a training run's generated data in the session's shared data cache)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags (-m) go before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    if script == "src/train.py" and not any(a.startswith(("data.cache_dir=", "data=folder", "data=hf")) for a in overrides):
        overrides.insert(0, f"data.cache_dir={SHARED_DATA[0]}")
    if script == "src/train.py" and "experiment=smoke" in overrides and not any(a.startswith("data=") for a in overrides):
        overrides.insert(0, SMOKE_DATA_COUNT)
    command = [sys.executable, str(ROOT / script), *flags, f"paths.log_dir={tmp / 'outputs'}", f"paths.cache_dir={tmp / 'cache'}", *overrides]
    return {"args": command, "cwd": ROOT, "env": env}


def run_train(args: list[str], tmp: Path, timeout: int = 300, script: str = "src/train.py") -> subprocess.CompletedProcess:
    """An entry point (src/train.py by default) through Hydra, with outputs and caches under ``tmp``."""
    return subprocess.run(**train_command(args, tmp, script), capture_output=True, text=True, timeout=timeout)


def every_traceback(stderr: str, tail: int = 3000) -> str:
    """Each Python traceback in ``stderr`` (a multi-process run's may come from any rank, not only the last lines),
    then its last ``tail`` characters: what a failed run's assertion shows."""
    blocks = [block.split("\n\n")[0] for block in stderr.split("Traceback (most recent call last):")[1:]]
    return "\n---\n".join([*(f"Traceback{b[:4000]}" for b in blocks), stderr[-tail:]])


def train_checkpoint(base: Path, data: Path, block: str, folder: Path, steps: int = 2) -> Path:
    """A Lightning checkpoint of a ControlNet trained ``steps`` steps at a high learning rate, so its connection convs are no longer zero."""
    import lightning as L
    from torch.utils.data import DataLoader

    from controlnet_lab.module import ControlNetModule

    L.seed_everything(0)
    module = ControlNetModule(str(base), block=block, block_std=0.02, lr=1e-2, num_val_images=0)
    loader = DataLoader(fill50k_dataset(data, 16), batch_size=8)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(folder))
    trainer.fit(module, train_dataloaders=loader)
    path = folder / f"{block}.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def trained_checkpoints(tmp_path_factory, tiny_base, tiny_data) -> dict[str, Path]:
    """One briefly trained checkpoint per connection block, on the tiny base."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return {block: train_checkpoint(tiny_base, tiny_data, block, folder) for block in ("zero", "gauss", "single")}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One smoke run of src/train.py (CSV logger), shared by the tests that read, re-score or resume it."""
    tmp = tmp_path_factory.mktemp("smoke")
    result = run_train(["experiment=smoke", "logger=csv", "eval.train_images=8"], tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp / "outputs" / "smoke" / "runs").iterdir()
    return tmp, run_dir


def pytest_collection_modifyitems(items):
    """The default run's file first: under ``make test``'s two workers it holds one worker for about 16 minutes while
    the other runs every other file; started after them, it left a worker idle at the end. (The Makefile's
    ``--no-loadscope-reorder`` keeps this order: pytest-xdist otherwise starts the files with the most tests first.)"""
    items.sort(key=lambda item: item.path.name != "test_end_to_end.py")
