"""W&B settings shared by training, re-evaluation and the tables (imports no torch): the mode, the run's group and
tags, the config as W&B groups and filters by it, and tables with their numbers typed."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import yaml


def wandb_mode() -> str:
    """W&B's mode, as every run of the harness takes it (conf/logger/default.yaml): WANDB_MODE (online, offline,
    disabled), offline when unset."""
    return os.environ.get("WANDB_MODE", "offline")


def group_name(task_name: str, sweep_dir: Path | str | None) -> str:
    """The W&B group: the experiment's name and its sweep's time (``ablation_block-2026-12-06_08-40-00``), so each
    sweep is one group; runs outside a sweep are ``<task_name>-single-runs``."""
    return f"{task_name}-{Path(sweep_dir).name if sweep_dir else 'single-runs'}"


def sweep_group(sweep_dir: Path | str) -> str:
    """The group of a sweep's runs, from the task name its multirun.yaml records."""
    recorded = Path(sweep_dir) / "multirun.yaml"
    if not recorded.is_file():
        raise FileNotFoundError(f"{recorded}: missing; it names the sweep's experiment, which groups its W&B runs")
    return group_name(yaml.safe_load(recorded.read_text())["task_name"], sweep_dir)


def run_tags(config: dict) -> list[str]:
    """Tags W&B filters by: the experiment, the connection block, the base and the data."""
    return [f"experiment:{config['task_name']}", f"block:{config['block']['name']}", f"base:{config['model']['name']}",
            f"data:{config['data']['name']}"]


def flat(nested: dict, separator: str = ".", prefix: str = "") -> dict:
    """Nested dicts as one level of keys joined by ``separator``: the run config as ``block.name``,
    ``data.prompt_dropout`` (so W&B's panels and sweeps group and filter by each setting), scores as ``final/a/b``."""
    leaves = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            leaves.update(flat(value, separator, f"{name}{separator}"))
        else:
            leaves[name] = value
    return leaves


def typed_tables(paths: dict[str, Path]) -> dict[str, pd.DataFrame]:
    """The sweep's tables with their numbers as numbers (the CSV files eval/tables.py writes), for W&B tables."""
    names = {"csv": "table", "differences_csv": "differences"}
    return {name: pd.read_csv(paths[key]) for key, name in names.items() if key in paths}
