"""Tabulate a sweep: `python eval/tables.py sweep=<multirun dir> [out=<dir>]`.

Reads every job's results.json (of a multirun directory, or of a folder that `archive=true` wrote: a committed
experiment's tables remake from its own files in a fresh clone) and writes table.md, table.csv and table.tex (one row
per method, mean ± std [95% interval] over seeds), differences.md/.csv/.tex (each method
against the first, or every pair: the difference, its interval, paired by seed, and the
verdict; `comparisons=all_pairs correction=bonferroni`; fidelity-curve values at chosen steps join the metrics with
`curve_steps=[0,25,100]`; jobs of other multiruns, e.g. an arm launched later, join with
`extra_sweeps=[<dir>,...]`, and only the jobs whose records match with `"only=['data.prompt_dropout=0.5']"` (quoted: Hydra reads an unquoted = as an override); an evaluation sweep's seeds of one checkpoint averaged into one row with
`average_eval_seeds=true`; where each interval lies against an equivalence margin fixed before the runs with
`"margins={metrics.edge_f1:0.05}"`) and two plots (mask IoU per prompt setting;
each method's sample grid; fidelity curves when the jobs recorded them) into the sweep
directory, or ``out``, and logs the table and plots to W&B, grouped with the sweep's runs; `dashboard=true` makes the
sweep's W&B workspace (controlnet_lab/tables/dashboard.py). With an analysis plan (`plan=<plan.yaml>`, or a plan.yaml in
`out` or the sweep directory) it also writes verdicts.md/.csv: each claim's verdict computed from the plan
(controlnet_lab/tables/plan.py).
"""
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from controlnet_lab.tables.dashboard import save_dashboard
from controlnet_lab.tables.plan import write_verdicts
from controlnet_lab.tables.report import log_to_wandb, write_tables
from controlnet_lab.tables.sweeps import archive_sweep, load_sweeps, rows_where
from controlnet_lab.tracking import sweep_group


@hydra.main(version_base="1.3", config_path="../conf", config_name="tables")
def main(cfg: DictConfig) -> None:
    extra = list(cfg.extra_sweeps or ())
    only = list(cfg.only or ())
    _, paths = write_tables(cfg.sweep, cfg.out, cfg.rescored, cfg.level, cfg.comparisons, cfg.correction, cfg.curve_steps or (), extra,
                            cfg.average_eval_seeds, only, OmegaConf.to_container(cfg.margins) if cfg.margins else None)
    plan = Path(cfg.plan) if cfg.plan else next((p for p in (Path(cfg.out or cfg.sweep) / "plan.yaml", Path(cfg.sweep) / "plan.yaml")
                                                  if p.is_file()), None)
    if plan is not None:
        frame, _ = load_sweeps([cfg.sweep, *extra], cfg.rescored)
        paths.update(write_verdicts(plan, rows_where(frame, only), Path(cfg.out or cfg.sweep)))
    if cfg.archive:
        out = Path(cfg.out or cfg.sweep)
        copied = archive_sweep(cfg.sweep, out, only) + [path for sweep in extra
                                                        for path in archive_sweep(sweep, out / "extra_sweeps" / Path(sweep).name, only)]
        print(f"archived {len(copied)} files (multirun.yaml, each job's record)")
    if cfg.wandb:
        log_to_wandb(paths, cfg.sweep)
    if cfg.dashboard:
        frame, _ = load_sweeps([cfg.sweep, *extra])
        saved = save_dashboard(rows_where(frame, only), cfg.dashboard_group or sweep_group(cfg.sweep), Path(cfg.out or cfg.sweep),
                               entity=cfg.dashboard_entity)
        print(f"dashboard: {saved}")
    print(paths["markdown"].read_text())
    if "verdicts_markdown" in paths:
        print(paths["verdicts_markdown"].read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
