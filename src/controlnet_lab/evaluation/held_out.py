"""Evaluation on held-out conditions: the locked base alone vs base + ControlNet under the paper's prompt settings, same noise; oracle scores, condition fidelity, FID and CLIP score.

Each metric is measured only where it means what its name says; the others are listed
in ``skipped`` with the reason: the fill50k oracle scores need fill50k-format data
(stored outlines, every held-out prompt in the fill50k grammar); the rest depend on the
condition's detector and the weights at hand (suite.py decides those).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from controlnet_lab.data.colors import parse_prompt
from controlnet_lab.data.dataset import ControlDataset
from controlnet_lab.evaluation.prompts import FREE_FORM_SETTINGS, PROMPT_SETTINGS, setting_prompts
from controlnet_lab.images import to_uint8
from controlnet_lab.metrics.clip_score import clip_score
from controlnet_lab.metrics.fid import FeatureExtractor, TooFewImages, fid
from controlnet_lab.metrics.fidelity import ConditionFidelity
from controlnet_lab.metrics.oracle import random_placement_iou, score_images
from controlnet_lab.sampling import Sampling

log = logging.getLogger(__name__)

ORACLE_METRICS = ("mask_iou", "color_accuracy", "centre_error_px", "base_mask_iou", "base_color_accuracy", "base_centre_error_px",
                  "random_placement_mask_iou")


@torch.no_grad()
def generate(base, controlnet, conditions: torch.Tensor, prompts: list[str], batch_size: int, seed: int, sampling: Sampling,
             desc: str) -> np.ndarray:
    """uint8 images, one per (condition, prompt); batch b always gets the same noise. ``controlnet`` and ``conditions``
    may be lists, one condition tensor per ControlNet: the nets are composed (residuals summed)."""
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        batch = slice(start, start + batch_size)
        generated = base(
            prompts[batch],
            condition=None if controlnet is None else
            [c[batch].to(base.denoiser.device) for c in conditions] if isinstance(conditions, list) else conditions[batch].to(base.denoiser.device),
            controlnet=controlnet,
            **sampling.kwargs(),
            generator=torch.Generator().manual_seed(seed + start),
        )
        images.append(to_uint8(generated, -1.0, 1.0))
    return np.concatenate(images)


def oracle_skip_reason(items: list[dict]) -> str | None:
    """None where the fill50k oracle scores apply to these held-out items, else why they do not."""
    unparsed = next((item["true_prompt"] for item in items if parse_prompt(item["true_prompt"]) is None), None)
    if unparsed is not None:
        return f"held-out prompt {unparsed!r} is not in the fill50k grammar '<color> circle with <color> background'"
    if "source" not in items[0]:
        return "the dataset stores no condition images, so no fill50k circle outline to score against"
    return None


@dataclass
class MetricSuite:
    """The scores beyond the oracle's, each optional: what a run's config enables."""

    fidelity: ConditionFidelity | None = None
    domain_features: FeatureExtractor | None = None
    inception_features: FeatureExtractor | None = None
    clip: object | None = None  # a torchmetrics CLIPScore
    clip_model: str | None = None
    device: str = "cpu"  # where the feature extractors live: clean-fid moves each batch there
    skipped: dict[str, str] = field(default_factory=dict)  # the metrics left out, with the reason


@dataclass
class ComposedNet:
    """A further ControlNet sampled together with the evaluated one (residuals summed, paper Sec. 3.4), given its own
    condition type of the same held-out samples; ``fidelity`` re-detects that condition in the composed images."""

    controlnet: object
    dataset: ControlDataset
    fidelity: ConditionFidelity | None


def composed_conditions(items: list[dict], composed: list[ComposedNet]) -> list[torch.Tensor]:
    """Each composed net's conditions of the evaluated samples, checked to be of the same samples (targets and prompts)."""
    conditions = []
    for net in composed:
        others = [net.dataset[i] for i in range(min(len(items), len(net.dataset)))]
        same = len(others) == len(items) and all(a["true_prompt"] == b["true_prompt"] and torch.equal(a["target"], b["target"])
                                                 for a, b in zip(items, others))
        if not same:
            raise ValueError("compose: the composed ControlNets' held-out samples differ from the evaluated one's; composing "
                             "needs runs on the same data and held-out split (only data.condition may differ)")
        conditions.append(torch.stack([item["condition"] for item in others]))
    return conditions


def evaluate_held_out(base, controlnet, dataset: ControlDataset, palette: list[str], count: int, batch_size: int, seed: int,
                      sampling: Sampling, suite: MetricSuite | None = None, prompt_settings: list[str] | None = None,
                      composed: list[ComposedNet] | None = None, references: bool = True) -> dict:
    """Scores of base + ControlNet (composed with the ``composed`` nets, each given its own condition of the same
    samples, all at ``sampling.conditioning_scale``) under each prompt setting (``prompt_settings``: those of them that apply to the
    data; None: all that apply) and of the base alone, and what was skipped.

    On fill50k-format data: the oracle scores, top-level ``mask_iou`` and ``color_accuracy``
    those of the perfect prompt, and the random-placement IoU; per setting,
    ``color_accuracy`` checks the colors the given prompt names (the true ones for
    perfect, the other ones for conflicting: does the model follow the text?), null where
    the prompt names no colors. On any data: the condition fidelity (``edge_f1`` or
    ``seg_miou``) per setting where the condition has a detector; FID (domain features /
    Inception) and CLIP score of the perfect prompt's images, FID against the same
    held-out conditions' real targets. ``skipped`` names each metric left out and why;
    ``seconds`` holds the time each part took, for images/s figures. A composed net's fidelity is scored against its
    own condition, where its metric is not the evaluated net's (else it is listed in ``skipped``).

    With ``references`` every setting also holds the floors of its scores, so that a score has its reference on any
    data, fill50k or a user's own: ``base_alone`` (the locked base with the setting's prompts, no control) and
    ``shuffled_condition`` (base + ControlNet given another held-out sample's condition, each sample's prompt: what
    the prompt and the data's regularities give without the right condition), both scored against each sample's own
    outline and condition.
    """
    suite, composed = suite or MetricSuite(), composed or []
    seconds = {"generation": 0.0}
    items = [dataset[i] for i in range(min(count, len(dataset)))]  # read once, used by every generation
    condition_tensor = torch.stack([item["condition"] for item in items])
    extra_conditions = composed_conditions(items, composed)
    controlnet_input = [controlnet, *(net.controlnet for net in composed)] if composed else controlnet
    control_conditions = [condition_tensor, *extra_conditions] if composed else condition_tensor
    true_prompts = [item["true_prompt"] for item in items]
    not_oracle = oracle_skip_reason(items)
    skipped = dict(suite.skipped)
    fidelities = [(suite.fidelity, condition_tensor)] if suite.fidelity is not None else []
    for net, conditions in zip(composed, extra_conditions, strict=True):
        if net.fidelity is not None and net.fidelity.metric in [f.metric for f, _ in fidelities]:
            skipped[f"condition_fidelity ({net.fidelity.condition})"] = f"{net.fidelity.metric} already scores another composed net's condition"
        elif net.fidelity is not None:
            fidelities.append((net.fidelity, conditions))
    if not_oracle:
        skipped.update({name: not_oracle for name in ORACLE_METRICS})
    outlines = None if not_oracle else to_uint8(torch.stack([item["source"] for item in items]), 0.0, 1.0)
    settings = dict(batch_size=batch_size, seed=seed, sampling=sampling)

    with timed(seconds, "generation"):
        base_images = generate(base, None, condition_tensor, true_prompts, desc="evaluating base alone", **settings)
    samples = {
        "conditions": to_uint8(condition_tensor, 0.0, 1.0),
        "targets": to_uint8(torch.stack([item["target"] for item in items]), -1.0, 1.0),
        "base": base_images,
    }
    results = {}
    if outlines is not None:
        with timed(seconds, "oracle"):
            base_scores = score_images(base_images, outlines, true_prompts, palette)
        results.update({"base_mask_iou": base_scores["mask_iou"], "base_color_accuracy": base_scores["color_accuracy"],
                        "base_centre_error_px": base_scores["centre_error_px"],
                        "random_placement_mask_iou": random_placement_iou(outlines), "palette_size": len(palette)})
    def scored(images: torch.Tensor, setting: str, prompts: list[str]) -> dict:
        """An image set's scores under ``setting``: the oracle's against each sample's own outline, each fidelity against
        each sample's own condition (whatever condition produced the images)."""
        scores = {}
        if outlines is not None:
            names_colors = setting in ("conflicting", "perfect")
            with timed(seconds, "oracle"):
                oracle = score_images(images, outlines, prompts if names_colors else true_prompts, palette)
            scores = {"mask_iou": oracle["mask_iou"], "centre_error_px": oracle["centre_error_px"],
                      "color_accuracy": oracle["color_accuracy"] if names_colors else None}
        for fidelity, conditions in fidelities:
            with timed(seconds, "fidelity"):
                scores[fidelity.metric] = fidelity.score(images, to_uint8(conditions, 0.0, 1.0))["value"]
        return scores

    per_setting = {}
    applicable = PROMPT_SETTINGS if outlines is not None else FREE_FORM_SETTINGS
    for setting in [s for s in applicable if prompt_settings is None or s in prompt_settings]:
        prompts = setting_prompts(setting, true_prompts, palette, seed, fill50k=outlines is not None)
        with timed(seconds, "generation"):
            images = generate(base, controlnet_input, control_conditions, prompts, desc=f"evaluating base + ControlNet, {setting} prompt", **settings)
        per_setting[setting] = scored(images, setting, prompts)
        samples[setting] = images
        if references:  # the floors of every score under this setting, on any data
            with timed(seconds, "generation"):
                alone = base_images if prompts == true_prompts else generate(base, None, condition_tensor, prompts,
                                                                             desc=f"evaluating base alone, {setting} prompt", **settings)
                mismatched = generate(base, controlnet_input, shuffled(control_conditions), prompts,
                                      desc=f"evaluating base + ControlNet on shuffled conditions, {setting} prompt", **settings)
            per_setting[setting]["base_alone"] = scored(alone, setting, prompts)
            per_setting[setting]["shuffled_condition"] = scored(mismatched, setting, prompts)
    results.update({key: per_setting["perfect"][key] for key in ("mask_iou", "color_accuracy", "centre_error_px") if outlines is not None})
    results.update({"prompt_settings": per_setting, "settings_evaluated": list(per_setting), "eval_images": len(items)})
    extra = extra_scores(suite, samples, true_prompts, seconds)
    skipped.update(extra.pop("skipped"))
    results.update(extra)
    for fidelity, _ in fidelities:
        results[fidelity.metric] = per_setting["perfect"][fidelity.metric]
    if composed:
        results["composed_fidelity"] = [fidelity.describe(len(items)) for fidelity, _ in fidelities if fidelity is not suite.fidelity]
    results["skipped"] = skipped
    results["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    results["samples"] = samples
    return results


def shuffled(conditions: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """Each sample's condition replaced by the next sample's (a derangement: no sample keeps its own); a list (composed
    nets) shifted alike, so that the conditions of one other sample stay together."""
    if isinstance(conditions, list):
        return [c.roll(1, dims=0) for c in conditions]
    return conditions.roll(1, dims=0)


def evaluate_seen(base, controlnet, dataset: ControlDataset, palette: list[str], count: int, batch_size: int, seed: int,
                  sampling: Sampling, suite: MetricSuite | None = None) -> dict:
    """The perfect prompt's scores on the first ``count`` samples of ``dataset`` (the training set: conditions the
    ControlNet trained on), with the same sampling as the held-out evaluation: what its gap to the held-out scores
    is measured with (over-fitting shows as seen scores above unseen ones)."""
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    conditions = torch.stack([item["condition"] for item in items])
    prompts = [item["true_prompt"] for item in items]
    images = generate(base, controlnet, conditions, prompts, batch_size=batch_size, seed=seed, sampling=sampling,
                      desc="evaluating on training conditions")
    scores = {"images": len(items)}
    if not oracle_skip_reason(items):
        oracle = score_images(images, to_uint8(torch.stack([item["source"] for item in items]), 0.0, 1.0), prompts, palette)
        scores.update({key: oracle[key] for key in ("mask_iou", "color_accuracy", "centre_error_px")})
    if suite is not None and suite.fidelity is not None:
        scores[suite.fidelity.metric] = suite.fidelity.score(images, to_uint8(conditions, 0.0, 1.0))["value"]
    return scores


def extra_scores(suite: MetricSuite, samples: dict, true_prompts: list[str], seconds: dict) -> dict:
    """Condition fidelity, FIDs and CLIP score of the perfect prompt's images, each with its image count and backbone.
    A metric that does not apply to these images goes into ``skipped`` with the reason; one that fails goes into
    ``failed`` with its error, beside the scores that did compute (the run keeps its record and its checkpoint)."""
    images, count = samples["perfect"], len(samples["perfect"])
    scores, skipped, failed = {}, {}, {}
    if suite.fidelity is not None:
        scores["condition_fidelity"] = suite.fidelity.describe(count)
    measured = []
    if suite.domain_features is not None:
        measured.append(("fid_domain", "fid_domain", lambda: fid(images, samples["targets"], suite.domain_features, device=suite.device),
                         {"label": "FID (domain features)", "backbone": "domain CNN trained on the data (metrics/domain_features.py)",
                          "images": count, "reference": "held-out targets of the same conditions"}))
    if suite.inception_features is not None:
        measured.append(("fid", "fid_inception", lambda: fid(images, samples["targets"], suite.inception_features, device=suite.device),
                         {"label": "FID (Inception, clean-fid clean mode)", "backbone": "inception-2015-12-05", "images": count}))
    if suite.clip is not None:
        measured.append(("clip_score", "clip_score", lambda: clip_score(suite.clip, images, true_prompts),
                         {"backbone": suite.clip_model, "images": count, "prompts": "true (perfect setting)"}))
    for name, timing, measure, info in measured:
        try:
            with timed(seconds, timing):
                scores[name] = measure()
            scores[f"{name}_info"] = info
        except TooFewImages as reason:
            skipped[name] = str(reason)
        except Exception as err:  # noqa: BLE001 - one metric's failure must not cost the run the others
            log.exception(f"{name} failed")
            failed[name] = f"{type(err).__name__}: {err}"
    return {**scores, "skipped": skipped, "failed": failed}


@contextmanager
def timed(seconds: dict, key: str):
    started = time.perf_counter()
    yield
    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - started
