"""Tabulate a sweep: `python eval/tables.py sweep=<multirun dir> [out=<dir>]`.

Reads every job's results.json and writes table.md, table.csv and table.tex (one row
per method, mean ± std over seeds) and two plots (mask IoU per prompt setting;
each method's sample grid) into the sweep directory, or ``out``.
"""
import hydra
from omegaconf import DictConfig

from controlnet_lab.tables import write_tables


@hydra.main(version_base="1.3", config_path="../conf", config_name="tables")
def main(cfg: DictConfig) -> None:
    paths = write_tables(cfg.sweep, cfg.out, cfg.rescored)
    print(paths["markdown"].read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
