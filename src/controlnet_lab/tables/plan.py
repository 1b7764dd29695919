"""An experiment's analysis plan, committed before its runs, and the verdicts computed from it.

``experiments/<name>/plan.yaml``::

    experiment: ablation_gauss_pixel          # conf/experiment/<name>.yaml
    seeds: [0, 1, 2, 3, 4, 5]                 # fixed before the runs; more seeds in the records are left out (and named)
    level: 0.95                               # of the paired t-interval
    stopping: {enabled: true, points: 16, max_slope_per_1k: 0.05}   # eval.stopping every job must have run with
    claims:
      - name: zero convolutions beat a Gaussian init
        claim: "..."                          # the paper's words and where
        treatment: ["block=gauss"]            # the records of each arm (key=value, as eval/tables.py only=)
        control: ["block=zero"]
        metric: mask_iou                      # the primary metric ...
        prompt: perfect                       # ... under this prompt setting; or a contrast {none: 1, perfect: -1};
                                              # or null for a metric outside the prompt settings (metrics.<metric>)
        direction: lower                      # what the paper predicts for treatment - control: lower, higher, none
        margin: 0.05                          # the equivalence margin
        secondary: [metrics.edge_f1]          # reported beside, decide nothing
      - name: the rise is sudden              # a one-arm claim: the treatment's value against a fixed reference
        treatment: ["block=zero"]
        reference: 0.25                       # in place of a control arm
        metric: rise.rise_share
        prompt: null
        direction: lower
        margin: 0.1

The verdict of a claim comes from the paired interval of treatment - control on the primary metric (intervals.py), or
for a one-arm claim the t-interval of treatment - reference over the seeds:
*reproduced* when it excludes 0 in the predicted direction, *contradicted* when it excludes 0 the other way (or, for
``direction: none``, either way), *equivalent* when it lies within [-margin, +margin] (two one-sided tests at the
interval's level), *undecided* otherwise. A claim whose arms lack some of the plan's seeds is *incomplete* instead.
Whether the plan was registered before the runs is read from git: every job records the commit it ran at, and the plan
counts as pre-registered only if each of those commits already holds this plan.yaml, unchanged.
"""
from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from controlnet_lab.intervals import Difference, difference, t_interval
from controlnet_lab.metrics.convergence import first_converged_step
from controlnet_lab.tables.sweeps import SweepError, rows_where

DIRECTIONS = ("lower", "higher", "none")
STOPPING_KEYS = ("enabled", "points", "max_slope_per_1k", "min_steps", "min_rise")


@dataclass(frozen=True)
class Claim:
    name: str
    claim: str
    treatment: list[str]
    control: list[str] | None  # None: a one-arm claim against ``reference``
    reference: float | None
    metric: str
    prompt: str | dict | None
    direction: str
    margin: float
    secondary: list[str] = field(default_factory=list)

    def weights(self) -> dict[str, float]:
        """The record columns the primary value sums, with their weights."""
        if self.prompt is None:
            return {f"metrics.{self.metric}": 1.0}
        if isinstance(self.prompt, dict):
            return {f"metrics.prompt_settings.{p}.{self.metric}": float(w) for p, w in self.prompt.items()}
        return {f"metrics.prompt_settings.{self.prompt}.{self.metric}": 1.0}

    def primary_label(self) -> str:
        if isinstance(self.prompt, dict):
            label = f"{self.metric}, " + " ".join(f"{w:+g} x {p}" for p, w in self.prompt.items())
        else:
            label = self.metric if self.prompt is None else f"{self.metric} ({self.prompt} prompt)"
        return label if self.reference is None else f"{label} - {self.reference:g}"


@dataclass(frozen=True)
class Plan:
    path: Path
    experiment: str
    seeds: list[int]
    level: float
    stopping: dict | None
    claims: list[Claim]


def load_plan(path: Path) -> Plan:
    """The plan at ``path``, checked: every key present and every value possible (errors name the file and key)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"plan={path}: no such file")
    raw = yaml.safe_load(path.read_text()) or {}
    for key in ("experiment", "seeds", "claims"):
        if key not in raw:
            raise SweepError(f"{path}: the plan has no {key!r}")
    level = float(raw.get("level", 0.95))
    if not 0.5 < level < 1:
        raise SweepError(f"{path}: level must be in (0.5, 1), got {level}")
    stopping = raw.get("stopping")
    if stopping is not None and (unknown := sorted(set(stopping) - set(STOPPING_KEYS))):
        raise SweepError(f"{path}: stopping.{unknown[0]} is not an eval.stopping key ({', '.join(STOPPING_KEYS)})")
    claims = []
    for i, entry in enumerate(raw["claims"] or []):
        where = f"{path}: claims[{i}]"
        missing = [k for k in ("name", "treatment", "metric", "direction", "margin") if k not in entry]
        if missing:
            raise SweepError(f"{where} has no {missing[0]!r}")
        if (entry.get("control") is None) == (entry.get("reference") is None):
            raise SweepError(f"{where} needs exactly one of control (an arm) and reference (a number)")
        if entry["direction"] not in DIRECTIONS:
            raise SweepError(f"{where}.direction={entry['direction']!r}: choose one of {', '.join(DIRECTIONS)}")
        if not float(entry["margin"]) > 0:
            raise SweepError(f"{where}.margin must be > 0 (fixed before the runs), got {entry['margin']}")
        claims.append(Claim(name=str(entry["name"]), claim=str(entry.get("claim", "")), treatment=list(entry["treatment"]),
                            control=list(entry["control"]) if entry.get("control") is not None else None,
                            reference=float(entry["reference"]) if entry.get("reference") is not None else None,
                            metric=str(entry["metric"]), prompt=entry.get("prompt"),
                            direction=entry["direction"], margin=float(entry["margin"]), secondary=list(entry.get("secondary") or [])))
    if not claims:
        raise SweepError(f"{path}: the plan names no claim")
    return Plan(path, str(raw["experiment"]), [int(s) for s in raw["seeds"]], level, stopping, claims)


def verdict(d: Difference, direction: str, margin: float) -> str:
    """reproduced / contradicted / equivalent / undecided (the module's docstring)."""
    if math.isnan(d.low):
        return "undecided"
    below, above = d.high < 0, d.low > 0
    equivalent = d.within(margin)
    if direction == "none":
        return "equivalent" if equivalent else "contradicted" if below or above else "undecided"
    if (below and direction == "lower") or (above and direction == "higher"):
        return "reproduced"
    if below or above:
        return "contradicted"
    return "equivalent" if equivalent else "undecided"


def arm_values(frame: pd.DataFrame, select: list[str], columns: dict[str, float], seeds: list[int], where: str) -> dict[int, float]:
    """{seed: primary value} of the arm's jobs among the plan's seeds (one job per seed, or the plan is ambiguous)."""
    missing = [c for c in columns if c not in frame]
    if missing:
        raise SweepError(f"{where}: no job records {missing[0]}")
    arm = rows_where(frame, select)
    values = {}
    for _, row in arm.iterrows():
        seed = int(row["seed"])
        if seed not in seeds:
            continue
        if seed in values:
            raise SweepError(f"{where}: two jobs of {select} have seed {seed}; narrow the arm's selection")
        values[seed] = float(sum(weight * float(row[column]) for column, weight in columns.items()))
    return values


def registration(plan: Plan, frame: pd.DataFrame) -> dict:
    """Whether every job ran at a commit that already held this plan.yaml unchanged (git; unknown without it)."""
    text = plan.path.read_text()
    try:
        top = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=plan.path.parent, capture_output=True, text=True,
                                  check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return {"pre_registered": None, "why": "not in a git checkout"}
    relative = plan.path.resolve().relative_to(top.resolve())
    commits = sorted({str(c) for c in frame.get("provenance.commit", pd.Series(dtype=object)).dropna()})
    if not commits:
        return {"pre_registered": None, "why": "the records name no commit"}
    without = []
    for commit in commits:
        shown = subprocess.run(["git", "show", f"{commit}:{relative}"], cwd=top, capture_output=True, text=True)
        if shown.returncode != 0 or shown.stdout != text:
            without.append(commit[:7])
    return {"pre_registered": not without, "job_commits": [c[:7] for c in commits], "commits_without_this_plan": without}


def plan_verdicts(plan: Plan, frame: pd.DataFrame) -> pd.DataFrame:
    """One row per claim: the primary difference, its interval, the verdict, the seeds, and the secondary metrics'
    differences (reported, deciding nothing)."""
    rows = []
    for claim in plan.claims:
        where = f"{plan.path}: claim {claim.name!r}"
        d, seeds = compared(frame, claim, claim.weights(), plan, where, claim.reference)
        complete = seeds == sorted(plan.seeds)
        secondary = {}
        for column in claim.secondary:
            s, _ = compared(frame, claim, {column: 1.0}, plan, where, 0.0)  # one-arm: the treatment's own mean
            secondary[column] = f"{s.mean:+.3f} [{s.low:+.3f}, {s.high:+.3f}]"
        rows.append({"claim": claim.name, "primary": claim.primary_label(), "predicted": claim.direction, "margin": claim.margin,
                     "difference": d.mean, "low": d.low, "high": d.high, "level": plan.level, "seeds": len(seeds),
                     "seeds_planned": len(plan.seeds), "verdict": verdict(d, claim.direction, claim.margin) if complete else "incomplete",
                     "missing_seeds": sorted(set(plan.seeds) - set(seeds)), "secondary": secondary})
    return pd.DataFrame(rows)


def compared(frame: pd.DataFrame, claim: Claim, columns: dict[str, float], plan: Plan, where: str,
             reference: float | None) -> tuple[Difference, list[int]]:
    """treatment - control paired by seed (for a one-arm claim treatment - ``reference`` over seeds) of the weighted
    ``columns``, and the seeds it is over."""
    treatment = arm_values(frame, claim.treatment, columns, plan.seeds, where)
    if claim.control is None:
        seeds = sorted(treatment)
        mean, low, high = t_interval([treatment[s] - reference for s in seeds], plan.level)
        return Difference(mean, low, high, len(seeds), True, math.nan, None), seeds
    control = arm_values(frame, claim.control, columns, plan.seeds, where)
    seeds = sorted(set(treatment) & set(control))
    return difference({s: treatment[s] for s in seeds}, {s: control[s] for s in seeds}, plan.level), seeds


def stopping_deviations(plan: Plan, frame: pd.DataFrame) -> list[str]:
    """The jobs whose stopping rule differs from the plan's (none when the plan names none), except those that the
    plan's rule, replayed on the job's recorded curve, would have stopped at the same step."""
    if not plan.stopping:
        return []
    deviations = []
    for _, row in frame.iterrows():
        used = {"enabled": row.get("metrics.stopping.enabled"), **{k: row.get(f"metrics.stopping.rule.{k}") for k in STOPPING_KEYS[1:]}}
        differing = [k for k, v in plan.stopping.items() if used.get(k) != v]
        if differing and not stops_as_planned(plan.stopping, row):
            deviations.append(f"{Path(row['job_dir']).name}: " + ", ".join(f"{k}={used.get(k)} (plan: {plan.stopping[k]})" for k in differing))
    return deviations


def stops_as_planned(stopping: dict, row: pd.Series) -> bool:
    """Whether the plan's stopping rule, replayed point by point on the job's recorded fidelity curve, first holds at the
    step where the job's own rule stopped it (not before), or, for a job that ran to its cap, nowhere on its curve."""
    curve, stopped = row.get("metrics.curve"), row.get("metrics.stopping.converged_at_step")
    if not stopping.get("enabled") or row.get("metrics.stopping.enabled") not in (True,) or not isinstance(curve, list):
        return False
    metric = row.get("metrics.stopping.rule.metric")
    metric = metric if isinstance(metric, str) else row.get("metrics.curve_metric")
    points = sorted((p for p in curve if p.get(metric) is not None), key=lambda p: p["step"])
    rule = {"points": stopping.get("points", 16), "max_slope_per_1k": stopping.get("max_slope_per_1k", 0.05),
            "min_steps": stopping.get("min_steps", 0), "min_rise": stopping.get("min_rise", 0.0)}
    replayed = first_converged_step([p["step"] for p in points], [p[metric] for p in points], **rule)
    return replayed == (None if pd.isna(stopped) else int(stopped))


def write_verdicts(plan_path: Path, frame: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """verdicts.md (the table an experiment's README leads with) and verdicts.csv, from the plan."""
    plan = load_plan(plan_path)
    table = plan_verdicts(plan, frame)
    registered = registration(plan, frame)
    deviations = stopping_deviations(plan, frame)
    shown = pd.DataFrame({
        "claim": table["claim"], "primary (treatment - control or reference)": table["primary"], "predicted": table["predicted"],
        "difference [interval]": [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in zip(table["difference"], table["low"], table["high"])],
        "margin": table["margin"], "seeds": [f"{n} of {m}" for n, m in zip(table["seeds"], table["seeds_planned"])],
        "verdict": table["verdict"],
        "secondary (decide nothing)": ["; ".join(f"{k}: {v}" for k, v in s.items()) for s in table["secondary"]],
    })
    note = (f"\nPlan: {plan_path} ({plan.level:.0%} paired t-intervals over seeds {plan.seeds}). Pre-registered: "
            + {True: "yes (every job ran at a commit holding this plan unchanged)", None: f"unknown ({registered.get('why')})"}.get(
                registered["pre_registered"], f"no (jobs at {', '.join(registered.get('commits_without_this_plan', []))} ran without it)")
            + ".\n" + ("".join(f"\nStopping rule differs from the plan: {d}" for d in deviations) + "\n" if deviations else ""))
    out_dir = Path(out_dir)
    paths = {"verdicts_markdown": out_dir / "verdicts.md", "verdicts_csv": out_dir / "verdicts.csv"}
    paths["verdicts_markdown"].write_text(shown.to_markdown(index=False, disable_numparse=True) + "\n" + note)
    table.assign(pre_registered=registered["pre_registered"], stopping_deviations=len(deviations)).to_csv(paths["verdicts_csv"], index=False)
    return paths
