"""One record shape for every scored run (imports no torch): src/train.py's results.json and eval/evaluate.py's
eval.json are both built by ``run_record`` (the run's method, its metrics, what it cost) and written by ``Recording``
(which code, which machine, what else ran); eval/tables.py and sweepers read either back through ``read_record``.

Every record holds ``kind`` (train or eval), ``block``, ``block_std``, ``model``, ``data`` (name, size,
prompt_dropout, condition, resolution), ``seed``, ``sampling``, ``metrics``, ``wall_time_s`` (``total`` and the
phases timed) and ``provenance``; an eval record adds ``checkpoint``, ``composition``, ``controlnets`` and ``eval``,
a train record the base, split, resume and memory facts of its run."""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from controlnet_lab.provenance import OtherLoad, commit, machine

RECORD_FILES = ("results.json", "eval.json")  # what a job of src/train.py, or of eval/evaluate.py, leaves
KIND_OF_FILE = {"results.json": "train", "eval.json": "eval"}


def run_record(kind: str, run_cfg: DictConfig, metrics: dict, **details) -> dict:
    """The record of a run trained (``kind`` train) or scored again (eval) with the composed config ``run_cfg`` (for
    eval: the trained run's config with the evaluation's sampling), its metrics, and the details of its kind."""
    return {
        "kind": kind,
        "block": run_cfg.block.name,
        "block_std": OmegaConf.select(run_cfg, "block.std"),  # gauss only: "standard", "standard_x<factor>" or one number
        "model": run_cfg.model.name,
        "data": {key: OmegaConf.select(run_cfg, f"data.{key}") for key in ("name", "size", "prompt_dropout", "condition", "resolution")},
        "seed": run_cfg.seed,
        "sampling": OmegaConf.to_container(run_cfg.model.sampling, resolve=True),
        "metrics": metrics,
        **details,
    }


class Recording:
    """Context manager around a run's work: the commit it started from, its wall time, and the CPU other programs took
    meanwhile; ``write`` then adds them to the record (as ``provenance`` and ``wall_time_s.total``) and writes it."""

    def __enter__(self) -> Recording:
        self.code, self.started = commit(), time.time()  # the code the run starts with (the tree may change meanwhile)
        self.load = OtherLoad().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.load.__exit__(*exc)

    def seconds(self) -> float:
        return time.time() - self.started

    def write(self, record: dict, path: Path) -> str:
        """Write ``record`` to ``path`` (after the context closed); raises MetricFailed, once it is written, when a
        metric failed. Returns the JSON written."""
        record["wall_time_s"] = {"total": round(self.seconds(), 1), **record.get("wall_time_s", {})}
        record["provenance"] = {**self.code, "machine": machine(), "other_load": self.load.result}
        text = json.dumps(record, indent=2)
        Path(path).write_text(text)
        check_no_metric_failed(record["metrics"], Path(path))
        return text


def read_record(path: Path) -> dict:
    """A results.json or eval.json, in this version's shape: records written before ``kind`` existed get it from their
    file's name, and an eval record's wall time in seconds becomes ``wall_time_s.total``."""
    record = json.loads(Path(path).read_text())
    record.setdefault("kind", KIND_OF_FILE.get(Path(path).name, "eval"))
    if isinstance(record.get("wall_time_s"), (int, float)):
        record["wall_time_s"] = {"total": record["wall_time_s"]}
    return record


def evaluation_share(metrics: dict, total_seconds: float) -> dict:
    """What measuring cost: the fidelity curve's seconds over the training loop's (FidelityCurve), the final
    evaluation's over the whole run's."""
    final = sum((metrics.get("seconds") or {}).values())
    return {"curve_of_training": metrics.get("curve_share_of_training"),
            "final_evaluation_of_run": round(final / total_seconds, 4) if total_seconds else None}


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def optimized_value(record: dict, name: str | None) -> float | None:
    """``record["metrics"][name]`` (a dotted path, e.g. ``prompt_settings.none.edge_f1``), what a sweeper optimises."""
    if not name:
        return None
    value = record["metrics"]
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            skipped = record["metrics"].get("skipped", {})
            why = f" (skipped: {skipped[name]})" if name in skipped else ""
            raise KeyError(f"optimized_metric={name}: results.json has no metrics.{name}{why}; numbers there: "
                           f"{', '.join(k for k, v in record['metrics'].items() if isinstance(v, (int, float)))}")
        value = value[part]
    return float(value)


class MetricFailed(RuntimeError):
    """A metric raised during the final evaluation; the record with every other score was written first."""


def check_no_metric_failed(metrics: dict, record: Path) -> None:
    """Raise (so the exit status says so) when a metric failed; its error is in the record beside the other scores."""
    if metrics.get("failed"):
        raise MetricFailed(f"{record} holds the scores that computed and the checkpoint is kept, but these metrics failed: "
                           + "; ".join(f"{name} ({error})" for name, error in metrics["failed"].items()))
