"""A W&B workspace per sweep, made by code with wandb-workspaces: the sweep's runs (its W&B group) grouped by the
settings the sweep varies, the fidelity curves by arm, each final score by prompt setting, and the sample grids.
``workspace.save()`` needs W&B's API (WANDB_MODE=online); offline, the workspace is written as dashboard.json and
saved by running the same command online."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import wandb
import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws
from pydantic import TypeAdapter
from wandb_workspaces import expr

from controlnet_lab.tables.sweeps import CURVE_QUANTITIES, method_columns
from controlnet_lab.tracking import wandb_mode

STEP = "trainer/global_step"  # the x axis Lightning's WandbLogger logs every metric against
SAMPLE_KEYS = ("eval/samples", "validation/images", "val/samples")  # the final grid, the validation callback's, the module's


def config_key(method: str) -> str:
    """The run-config key W&B groups by (the flat config training logs) for a record's method key."""
    if method in ("block", "block_std"):
        return {"block": "block.name", "block_std": "block.std"}[method]
    return f"model.{method}" if method.startswith("sampling.") else method


def prompt_settings_scored(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Per score (mask_iou, edge_f1, ...), the prompt settings some job has a number for (none where it does not apply:
    color accuracy without a color in the prompt), in the records' order."""
    scored: dict[str, list[str]] = {}
    for column in frame.columns:
        parts = column.split(".")
        if len(parts) == 4 and parts[:2] == ["metrics", "prompt_settings"] and frame[column].notna().any():
            scored.setdefault(parts[3], []).append(parts[2])
    return scored


def curve_quantities(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """The fidelity-curve quantities the jobs recorded, as (key, label)."""
    recorded = {key for curve in frame.get("metrics.curve", []) if isinstance(curve, list) for point in curve for key in point}
    return [(key, label) for key, label in CURVE_QUANTITIES if key in recorded]


def sweep_workspace(frame: pd.DataFrame, group: str, project: str, entity: str) -> ws.Workspace:
    """The workspace of a sweep whose records are ``frame`` (tables.sweeps.load_sweep) and whose runs form ``group``."""
    keys = [config_key(m) for m in method_columns(frame) if m != "composition"]
    by = wr.Config(keys[0]) if keys else None  # panels group by the first setting the sweep varies
    curves = [wr.LinePlot(title=f"{label} (fidelity curve)", x=STEP, y=[f"curve/{key}"], groupby=by, groupby_aggfunc="mean",
                          groupby_rangefunc="stderr") for key, label in curve_quantities(frame)]
    scores = [wr.BarPlot(title=f"{score} by prompt setting", metrics=[f"final/prompt_settings/{s}/{score}" for s in settings],
                         groupby=by, groupby_aggfunc="mean", groupby_rangefunc="stderr")
              for score, settings in prompt_settings_scored(frame).items()]
    samples = [wr.MediaBrowser(title=key, media_keys=[key]) for key in SAMPLE_KEYS]
    sections = [ws.Section(name=name, panels=panels, is_open=True)
                for name, panels in (("Fidelity curves by arm", curves), ("Final scores by prompt setting", scores), ("Samples", samples))
                if panels]
    return ws.Workspace(entity=entity, project=project, name=group, sections=sections,
                        runset_settings=ws.RunsetSettings(filters=expr.And(expr.Metric("Group") == group), groupby=[expr.Config(k) for k in keys]))


def panel_keys(workspace: ws.Workspace) -> dict[str, list[str]]:
    """Each section's panels by the keys they plot: what the dashboard shows, readable without W&B."""
    def keys(panel) -> list[str]:
        return list(getattr(panel, "y", None) or getattr(panel, "metrics", None) or getattr(panel, "media_keys", None) or [])
    return {section.name: [key for panel in section.panels for key in keys(panel)] for section in workspace.sections}


def save_dashboard(frame: pd.DataFrame, group: str, out_dir: Path, project: str = "controlnet-lab", entity: str | None = None) -> str:
    """Save the sweep's workspace to W&B when WANDB_MODE is online and return its address; otherwise write it to
    ``out_dir/dashboard.json`` and return that path."""
    online = wandb_mode() == "online"
    entity = entity or os.environ.get("WANDB_ENTITY") or (wandb.Api().default_entity if online else "your-entity")
    workspace = sweep_workspace(frame, group, project, entity)
    if online:
        workspace.save()
        return workspace.url
    path = Path(out_dir) / "dashboard.json"
    path.write_text(json.dumps({"panel_keys": panel_keys(workspace), "workspace": TypeAdapter(ws.Workspace).dump_python(workspace, mode="json")},
                               indent=2))
    return str(path)
