"""The paper's prompt settings (Sec. 4.2, Fig. 8) and the prompts of each: what evaluation, sampling and the tables
share. Imports no torch, so that reading results (eval/tables.py) does not load the models' libraries."""
from __future__ import annotations

import numpy as np

from controlnet_lab.data.colors import make_prompt, parse_prompt

PROMPT_SETTINGS = ("none", "insufficient", "out_of_vocabulary", "conflicting", "perfect")
# On free-form captions: the paper's four settings, the insufficient prompt being the paper's sentence.
FREE_FORM_SETTINGS = ("none", "insufficient", "conflicting", "perfect")
# Uninformative but known: every word is in the fill50k tokenizer's vocabulary, and it names no color.
INSUFFICIENT_PROMPT = "circle with background"
# The paper's literal insufficient prompt; the tiny base's word tokenizer knows none of its words
# (six <unk>), so it tests an out-of-vocabulary input and is reported as a setting of its own.
OUT_OF_VOCABULARY_PROMPT = "a high-quality, detailed, and professional image"


def check_prompt_settings(settings: list[str] | None) -> None:
    """A subset of PROMPT_SETTINGS that includes ``perfect`` (the top-level scores and FID are the perfect prompt's)."""
    if settings is None:
        return
    unknown = [s for s in settings if s not in PROMPT_SETTINGS]
    if unknown:
        raise ValueError(f"unknown prompt setting(s) {', '.join(map(str, unknown))}; choose among {', '.join(PROMPT_SETTINGS)}")
    if "perfect" not in settings:
        raise ValueError("must include perfect: the top-level scores and the FIDs are the perfect prompt's")


def palette_of(prompts: list[str]) -> list[str]:
    """The colors a dataset's prompts name: the candidates for nearest-color matching."""
    names = set()
    for prompt in prompts:
        named = parse_prompt(prompt)
        if named:
            names.update(named)
    return sorted(names)


def setting_prompts(setting: str, true_prompts: list[str], palette: list[str], seed: int, fill50k: bool = True) -> list[str]:
    """The prompts of one of the paper's prompt settings (Sec. 4.2, Fig. 8) for these samples.

    none: ""; insufficient: a known but uninformative prompt (INSUFFICIENT_PROMPT; on
    free-form captions the paper's sentence); out_of_vocabulary (fill50k only): the
    paper's generic sentence, unknown words to the tiny base; conflicting: on fill50k, a
    prompt whose circle and background colors both differ from the true ones, on free-form
    captions the caption of another held-out sample that differs from the true one (both
    seeded); perfect: the true prompt.
    """
    if setting == "none":
        return [""] * len(true_prompts)
    if setting == "insufficient":
        return [INSUFFICIENT_PROMPT if fill50k else OUT_OF_VOCABULARY_PROMPT] * len(true_prompts)
    if setting == "conflicting" and not fill50k:
        return other_captions(true_prompts, seed)
    if setting == "out_of_vocabulary":
        return [OUT_OF_VOCABULARY_PROMPT] * len(true_prompts)
    if setting == "perfect":
        return list(true_prompts)
    if setting == "conflicting":
        rng = np.random.default_rng(seed)
        prompts = []
        for prompt in true_prompts:
            circle, background = parse_prompt(prompt)
            other_circle = rng.choice([c for c in palette if c not in (circle, background)])
            other_background = rng.choice([c for c in palette if c not in (circle, background, other_circle)])
            prompts.append(make_prompt(str(other_circle), str(other_background)))
        return prompts
    raise ValueError(f"unknown prompt setting {setting!r}; choose one of {', '.join(PROMPT_SETTINGS)}")


def other_captions(true_prompts: list[str], seed: int) -> list[str]:
    """For each sample, the caption of another sample drawn at random (seeded) among those whose caption differs."""
    rng = np.random.default_rng(seed)
    captions = []
    for caption in true_prompts:
        others = [other for other in true_prompts if other != caption]
        if not others:
            raise ValueError("the conflicting setting takes another held-out sample's caption; every held-out caption is the same")
        captions.append(others[int(rng.integers(len(others)))])
    return captions
