"""Which metrics a run measures, loaded before any training: what its config enables and its data and condition
allow; every one left out is named in ``skipped`` with the reason."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from controlnet_lab.data.datamodule import ControlDataModule
from controlnet_lab.evaluation.held_out import MetricSuite
from controlnet_lab.evaluation.prompts import palette_of
from controlnet_lab.metrics.clip_score import clip_scorer
from controlnet_lab.metrics.domain_features import domain_net
from controlnet_lab.metrics.fid import inception_extractor
from controlnet_lab.metrics.fidelity import FIDELITY_CONDITIONS, ConditionFidelity


def run_device(cfg: DictConfig) -> str:
    return "cuda" if cfg.trainer.accelerator == "gpu" else "cpu"


def dataset_palette(data: ControlDataModule) -> list[str]:
    return palette_of(data.prompts())


def metric_suite(cfg: DictConfig, data: ControlDataModule) -> MetricSuite:
    """The metrics ``cfg.eval`` enables and the data allows, loaded now: missing weights fail here, with the file
    they need, so training calls this before any training. Each one left out is in ``suite.skipped`` with the reason."""
    metrics = cfg.eval
    device = run_device(cfg)
    suite = MetricSuite(device=device)
    suite.fidelity = condition_fidelity(cfg)
    if suite.fidelity is None:
        suite.skipped["condition_fidelity"] = fidelity_skip_reason(cfg.data.condition)
    if metrics.fid.inception:
        suite.inception_features = inception_extractor(metrics.fid.inception_dir, device, metrics.fid.download)
    else:
        suite.skipped["fid"] = "eval.fid.inception=false (Inception FID needs inception-2015-12-05.pt in eval.fid.inception_dir)"
    if metrics.clip.enabled:
        suite.clip, suite.clip_model = clip_scorer(metrics.clip.model, device), metrics.clip.model
    else:
        suite.skipped["clip_score"] = "eval.clip.enabled=false (CLIP score needs a local CLIP model, eval.clip.model)"
    if not metrics.fid_domain.enabled:
        suite.skipped["fid_domain"] = "eval.fid_domain.enabled=false"
    elif data.streaming:
        suite.skipped["fid_domain"] = "data.streaming=true: its feature net trains on the whole training pool, which a stream does not hold"
    elif not data.fill50k_style:
        suite.skipped["fid_domain"] = "its feature net learns fill50k attributes (colors named by the prompt, the outline's circle); this data is not fill50k-format"
    else:
        net = domain_net(data.pool_dataset(0.0), dataset_palette(data), Path(cfg.paths.cache_dir) / "fid_domain",
                         steps=metrics.fid_domain.steps, count=metrics.fid_domain.count)
        suite.domain_features = net.to(device).clean_fid_extractor()
    return suite


def condition_fidelity(cfg: DictConfig) -> ConditionFidelity | None:
    """The re-detection fidelity of the run's condition type (None where it has none: fidelity_skip_reason)."""
    if fidelity_skip_reason(cfg.data.condition):
        return None
    return ConditionFidelity(cfg.data.condition, cfg.data.resolution, cfg.eval.edge_tolerance, cfg.data.detector_weights,
                             tuple(cfg.data.canny_thresholds), cfg.data.detector_device)


def fidelity_skip_reason(condition: str) -> str | None:
    """Why condition fidelity cannot be measured for ``data.condition`` (None when it can)."""
    if condition in FIDELITY_CONDITIONS:
        return None
    return (f"data.condition={condition}: no detector re-detects this condition type (edge F1 covers "
            f"{', '.join(c for c in FIDELITY_CONDITIONS if c != 'seg')}; seg has mIoU)")
