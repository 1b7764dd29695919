"""Evaluate a trained checkpoint again: `python eval/evaluate.py ckpt=<run dir or .ckpt> [eval.num_images=N eval.seed=S]`.

The run's own composed config supplies the data and sampling settings; these overrides change only the evaluation, and
``sampling.*`` (guidance scale, CFG resolution weighting, conditioning scale) the sampling, e.g. as a sweep:
`python eval/evaluate.py -m ckpt=... sampling.guidance_scale=2,3 sampling.resolution_weighting=off,paper,code`.
``compose=[<run>,...]`` samples further ControlNets together with ``ckpt``'s. Writes eval.json (the shape of training's
results.json) and eval_samples.png into its own output directory, with every metric ``eval`` enables
(conf/eval/default.yaml); controlnet_lab/evaluation/rescoring.py does the work.
"""
import json
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig


os.environ.setdefault("CONTROLNET_LAB_ROOT", str(Path(__file__).resolve().parents[1]))  # conf/paths: root_dir


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from controlnet_lab.evaluation.rescoring import rescore  # torch loads after Hydra has parsed the command line

    print(json.dumps(rescore(cfg), indent=2))


if __name__ == "__main__":
    main()
