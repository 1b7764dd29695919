"""Two ControlNets composed at sampling time (paper Sec. 3.4, "Composing multiple ControlNets"), measured.

An outline ControlNet and a seg ControlNet, trained separately on the same locked base,
are given circles of different held-out samples (A: outline, B: seg map), alone and
composed (residuals summed, scales 1 and 1). Each generated image's circle (oracle
segmentation) is compared with A's circle, B's circle and their union. As a control,
both nets also get the same sample's conditions.

    python experiments/multi_controlnet/run.py --outline <outline run> --seg <seg run> [--count 32]

It calls src/sample.py once per case (each writes its own outputs/sample/runs/<time>/)
and writes table.md and grid_*.png beside this script.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from PIL import Image

from controlnet_lab.data.conditions import segmentation
from controlnet_lab.data.fill50k import load_rgb
from controlnet_lab.metrics.oracle import condition_mask, mask_iou, segment_circle
from controlnet_lab.training import build_datamodule, dataset_root

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def write_conditions(run: Path, count: int, work: Path) -> dict[str, Path]:
    """Outline and seg conditions of the run's first 2 x count held-out samples: A = the first count, B = the next."""
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cfg.paths.cache_dir = str(ROOT / ".cache")
    data = build_datamodule(cfg, dataset_root(cfg))
    records = data.val_records[: 2 * count]
    folders = {name: work / name for name in ("outline_A", "seg_A", "seg_B")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for i, record in enumerate(records):
        source, target = load_rgb(record.source, cfg.data.resolution), load_rgb(record.target, cfg.data.resolution)
        seg = segmentation(source, target, record.source.name)
        if i < count:
            Image.fromarray(source).save(folders["outline_A"] / f"{i:03d}.png")
            Image.fromarray(seg).save(folders["seg_A"] / f"{i:03d}.png")
        else:
            Image.fromarray(seg).save(folders["seg_B"] / f"{i - count:03d}.png")
    (work / "prompts.json").write_text(json.dumps([r.prompt for r in records[:count]]))
    return folders


def sample(ckpts: list[Path], conditions: list[Path], prompts: list[str], out: Path) -> Path:
    overrides = [f"ckpt=[{','.join(repr(str(c)) for c in ckpts)}]", f"condition=[{','.join(str(c) for c in conditions)}]",
                 "prompt=[" + ",".join(repr(p) for p in prompts) + "]", "seeds=[0]", f"hydra.run.dir={out}"]
    subprocess.run([sys.executable, str(ROOT / "src" / "sample.py"), *overrides], cwd=ROOT, check=True)
    return out


def scores(run: Path, references: dict[str, Path], resolution: int) -> dict:
    """Mean IoU of each image's circle with A's circle, B's circle and their union; the share of each it covers."""
    report = json.loads((run / "samples.json").read_text())
    masks = {name: [condition_mask(load_rgb(p, resolution)) for p in sorted(folder.iterdir())] for name, folder in references.items()}
    rows = []
    for i, record in enumerate(report["images"]):  # one seed: the images follow the conditions' order
        circle, _, _ = segment_circle(np.asarray(Image.open(run / record["file"]).convert("RGB")))
        row = {f"IoU with {name}": mask_iou(circle, m[i]) for name, m in masks.items()}
        row["IoU with A or B"] = mask_iou(circle, np.logical_or.reduce([m[i] for m in masks.values()]))
        row.update({f"covers {name}": float((circle & m[i]).sum() / max(1, m[i].sum())) for name, m in masks.items()})
        rows.append(row)
    return pd.DataFrame(rows).mean().to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outline", type=Path, required=True, help="run directory of an outline ControlNet")
    parser.add_argument("--seg", type=Path, required=True, help="run directory of a seg ControlNet on the same base")
    parser.add_argument("--count", type=int, default=32)
    args = parser.parse_args()
    work = ROOT / "outputs" / "multi_controlnet"
    shutil.rmtree(work / "conditions", ignore_errors=True)
    folders = write_conditions(args.outline, args.count, work / "conditions")
    prompts = json.loads((work / "conditions" / "prompts.json").read_text())
    cases = {
        "outline A alone": ([args.outline], [folders["outline_A"]]),
        "seg B alone": ([args.seg], [folders["seg_B"]]),
        "outline A + seg B": ([args.outline, args.seg], [folders["outline_A"], folders["seg_B"]]),
        "outline A + seg A": ([args.outline, args.seg], [folders["outline_A"], folders["seg_A"]]),
    }
    rows = []
    for name, (ckpts, conditions) in cases.items():
        run = sample(ckpts, conditions, prompts, work / "runs" / name.replace(" ", "_").replace("+", "and"))
        resolution = json.loads((run / "samples.json").read_text())["sampling"]["resolution"]
        rows.append({"case": name, **scores(run, {"A": folders["outline_A"], "B": folders["seg_B"]}, resolution)})
        shutil.copy(run / "grid.png", HERE / f"grid_{name.replace(' ', '_').replace('+', 'and')}.png")
    table = pd.DataFrame(rows)
    text = table.to_markdown(index=False, floatfmt=".3f")
    (HERE / "table.md").write_text(text + f"\n\n{args.count} held-out conditions per case, perfect prompt of A, seed 0, "
                                   "20 DDIM steps, no CFG; A and B are different samples.\n")
    print(text)


if __name__ == "__main__":
    main()
