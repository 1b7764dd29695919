"""What W&B gets: the sweep's tables typed, the run config and scores flat, and the sweep's workspace (built offline)."""
from pathlib import Path

from controlnet_lab.evaluation.task import flat_metrics
from controlnet_lab.tables.dashboard import panel_keys, sweep_workspace
from controlnet_lab.tables.sweeps import load_sweep
from controlnet_lab.tracking import flat, sweep_group, typed_tables


def test_the_tables_go_to_wandb_with_their_numbers_typed(tmp_path):
    (tmp_path / "table.csv").write_text("block,metrics.mask_iou.mean,n\nzero,0.83,3\ngauss,0.80,3\n")
    (tmp_path / "multirun.yaml").write_text("task_name: ablation_block\n")
    frames = typed_tables({"csv": tmp_path / "table.csv"})
    assert frames["table"]["metrics.mask_iou.mean"].dtype == float and frames["table"]["n"].dtype == int
    assert sweep_group(tmp_path) == f"ablation_block-{tmp_path.name}"  # the group the sweep's training runs are in


def test_the_run_config_and_the_scores_are_logged_flat():
    config = {"block": {"name": "zero", "std": None}, "data": {"prompt_dropout": 0.5, "held_out": {}}, "tags": ["a"]}
    assert flat(config) == {"block.name": "zero", "block.std": None, "data.prompt_dropout": 0.5, "data.held_out": {}, "tags": ["a"]}
    metrics = {"mask_iou": 0.8, "prompt_settings": {"none": {"mask_iou": 0.5, "color_accuracy": None}}, "ok": True, "label": "x"}
    assert flat_metrics(metrics, "final") == {"final/mask_iou": 0.8, "final/prompt_settings/none/mask_iou": 0.5}


def test_a_sweeps_dashboard_groups_its_runs_by_what_varies_and_plots_what_the_jobs_logged():
    frame, _ = load_sweep(Path(__file__).resolve().parents[1] / "experiments" / "ablation_prompt_dropout")
    workspace = sweep_workspace(frame, "ablation_prompt_dropout-2026-12-01_10-00-00-000000", "controlnet-lab", "someone")
    assert [str(g.name) for g in workspace.runset_settings.groupby] == ["data.prompt_dropout"]
    assert "ablation_prompt_dropout-2026-12-01_10-00-00-000000" in workspace.runset_settings.filters
    keys = panel_keys(workspace)
    assert keys["Fidelity curves by arm"][0] == "curve/mask_iou"
    settings = set(frame.filter(like="metrics.prompt_settings.").columns.str.split(".").str[2])
    assert {f"final/prompt_settings/{s}/mask_iou" for s in settings} <= set(keys["Final scores by prompt setting"])
    assert "eval/samples" in keys["Samples"]
