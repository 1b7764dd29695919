"""A sweep's tables as a reader sees them: mean ± std [interval] cells, differences, method labels, the paper's own
numbers beside ours."""
from __future__ import annotations


import numpy as np
import pandas as pd

from controlnet_lab.tables.statistics import METRICS, summary_methods
from controlnet_lab.tables.sweeps import readable_methods

# The paper's numbers where it has them (SD 1.5 on ADE20K segmentation; Tables 2 and 3), by block.
PAPER = {
    "zero": {"FID (Inception)": 15.27, "CLIP score": 0.26, "seg IoU (OneFormer re-detection)": 0.35},
    "single": {"FID (Inception)": 17.92, "CLIP score": 0.26, "seg IoU (OneFormer re-detection)": 0.32},
}


def display_table(summary: pd.DataFrame, metrics=METRICS) -> pd.DataFrame:
    """'mean ± std' strings under readable labels; counts as integers."""
    methods = summary_methods(summary)
    table = readable_methods(summary, methods)
    for column, label in metrics:
        if f"{column}:mean" not in summary:
            continue
        mean, std = summary[f"{column}:mean"], summary[f"{column}:std"]
        if column.endswith("trainable_params"):
            table[label] = mean.map(lambda v: f"{v / 1e6:.3f} M")
        else:
            table[label] = [_mean_std(m, s, lo, hi) for m, s, lo, hi in zip(mean, std, summary[f"{column}:low"], summary[f"{column}:high"])]
    table["seeds"] = summary["seeds"]
    table["images / setting"] = summary["eval_images"]
    return table


def _mean_std(mean: float, std: float, low: float, high: float) -> str:
    """"mean ± std [low, high]" (the interval of the mean); the mean alone for one seed."""
    if np.isnan(mean):
        return ""  # the jobs of this method have no such metric (e.g. the fill50k oracle scores on other data)
    return f"{mean:.3f}" if np.isnan(std) else f"{mean:.3f} ± {std:.3f} [{low:.3f}, {high:.3f}]"


def display_differences(table: pd.DataFrame) -> pd.DataFrame:
    """The differences as text: the interval, the pairing, and for an inconclusive one the seeds that would decide it."""
    def decide(row) -> str:
        if row["verdict"] != "inconclusive":
            return ""
        return f"{int(row['seeds_to_decide'])}" if not pd.isna(row["seeds_to_decide"]) else "> 1000 or no effect"

    shown = pd.DataFrame({
        "method": table["method"], "vs": table["vs"], "metric": table["metric"],
        "difference [interval]": [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in zip(table["difference"], table["low"], table["high"])],
        "level": table["level"], "seeds": [f"{n} {'paired' if p else 'unpaired'}" for n, p in zip(table["seeds"], table["paired"])],
        "detectable (80% power)": table["detectable_80pct_power"].map(lambda v: f"{v:.3f}"),
        "verdict": table["verdict"], "seeds that would decide": table.apply(decide, axis=1),
    })
    if "against_margin" in table:
        shown["against the margin"] = table["against_margin"].fillna("")
    return shown


def paper_note(summary: pd.DataFrame) -> str:
    """The paper's own numbers for the blocks in this table, labelled as such (empty if it has none)."""
    if "block" not in summary or not set(summary["block"]) & set(PAPER):
        return ""
    rows = [{"block": block, **PAPER[block]} for block in summary["block"] if block in PAPER]
    return ("\n**Paper's numbers (SD 1.5, ADE20K segmentation, Tables 2-3; not comparable in scale with ours):**\n\n"
            + pd.DataFrame(rows).to_markdown(index=False) + "\n")
