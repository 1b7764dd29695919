"""Every `src/train.py` command line the README and docs/ quote composes, and does what its words promise."""
import re
import shlex
import textwrap

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose_train

PLACEHOLDERS = {"PATH": "/data/folder", "...": None}


def readme_train_commands() -> list[str]:
    """The code-block lines of the README and docs/ that run src/train.py, comments removed."""
    text = "\n".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [re.split(r"\s#\s", re.sub(r"<[^>]*>", "x", line))[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if "src/train.py" in line]


def overrides(command: str) -> list[str] | None:
    """The Hydra overrides of one command line, sweeps reduced to their first value (None: not a composable line)."""
    words = shlex.split(command.split("src/train.py", 1)[1])
    if "..." in words or "--cfg" in words:
        return None
    result = []
    for word in words:
        if word == "-m":
            continue
        word = word.strip("[]")
        key, _, value = word.partition("=")
        if "," in value and not value.startswith("["):
            value = value.split(",")[0]
        result.append(f"{key}={value}")
    return result


COMMANDS = [c for c in readme_train_commands() if overrides(c) is not None]


def test_the_readme_quotes_the_real_use_commands():
    assert any("experiment=sd15_folder" in c for c in COMMANDS) and any("hydra/launcher=slurm" in c for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_readme_command_composes_and_does_what_it_says(command):
    words = overrides(command)
    cfg = compose_train([w for w in words if not w.startswith("hydra/launcher=") and not w.startswith("hydra.")])
    if "hydra/launcher=slurm" in command or ("model=sd15" in command and "experiment=smoke" not in command):
        # a job that books a GPU, or SD 1.5 for real, trains on the GPU
        assert cfg.trainer.accelerator == "gpu", command
    if "data.root=" in command:
        assert cfg.data.root == dict(w.split("=", 1) for w in words)["data.root"], command
    if "experiment=sd15_folder" in command:
        assert cfg.model.name == "sd15" and cfg.data._target_.endswith("FolderDataModule")
        assert cfg.data.resolution == 512 and cfg.data.batch_size == 4 and cfg.data.condition == "canny"
        assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 1.0
        assert cfg.eval.every_n_steps == 500 and cfg.eval.curve_images == 16 and cfg.eval.curve_batch_size == 8
        assert cfg.eval.num_images == 256 and cfg.eval.batch_size == 16
    if "data.streaming=true" in command:
        assert cfg.data.streaming and cfg.data._target_.endswith("hub_datamodule"), command
    if "model=tiny_sd" in command or command.endswith("src/train.py"):
        assert cfg.trainer.accelerator == "cpu" and cfg.eval.every_n_steps == 50 and cfg.eval.curve_images == 64


def test_every_trial_of_the_documented_wandb_sweep_composes():
    """The W&B sweep in docs/: the agent runs the program with each trial's values as key=value (${args_no_hyphens})."""
    import itertools

    import yaml

    text = (ROOT / "docs" / "scale-out.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "program: src/train.py" in b]
    sweep = yaml.safe_load(textwrap.dedent(block))
    assert (ROOT / sweep["program"]).is_file() and sweep["command"][-1] == "${args_no_hyphens}"
    names = list(sweep["parameters"])
    trials = list(itertools.product(*(sweep["parameters"][name]["values"] for name in names)))
    assert len(trials) == 6
    for values in trials:
        cfg = compose_train([f"{name}={value}" for name, value in zip(names, values)])
        assert OmegaConf.select(cfg, "block.name") == values[0] and cfg.data.prompt_dropout == values[1]
