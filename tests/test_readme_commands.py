"""Every command line of an entry point that the README and docs/ quote composes with that entry point's config, and
the training ones do what their words promise."""
import re
import shlex
import textwrap

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT, compose_train

ENTRY_POINTS = {"src/train.py": "train", "src/sample.py": "sample", "src/export.py": "export", "eval/evaluate.py": "eval",
                "eval/tables.py": "tables", "src/build_base.py": "build_base"}  # each script's Hydra config


def quoted_commands() -> list[str]:
    """The code-block lines of the README and docs/ (comments removed, <placeholders> as x); ``make train ARGS="..."``
    as the src/train.py line it runs."""
    text = "\n".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [re.split(r"\s#\s", re.sub(r"<[^>]*>", "x", line))[0].strip() for block in blocks for line in block.splitlines()]
    lines = [f"src/train.py {shlex.split(line)[2].removeprefix('ARGS=')}" if line.startswith("make train ARGS=") else line for line in lines]
    return [line for line in lines if script_of(line)]


def script_of(command: str) -> str | None:
    return next((script for script in ENTRY_POINTS if f"{script} " in f"{command} "), None)


def overrides(command: str) -> list[str] | None:
    """The Hydra overrides of one command line, sweeps reduced to their first value and [optional] parts kept (None: not
    a composable line)."""
    words = shlex.split(command.split(script_of(command), 1)[1])
    if "..." in words or "--cfg" in words:
        return None
    result = []
    for word in words:
        if word == "-m":
            continue
        if word.startswith("[") and word.endswith("]"):  # an optional part of the line: [data.split=train]
            word = word[1:-1]
        key, _, value = word.partition("=")
        if "," in value and not value.startswith("["):
            value = value.split(",")[0]
        result.append(f"{key}={value}")
    return result


ALL_COMMANDS = [c for c in quoted_commands() if overrides(c) is not None]
COMMANDS = [c for c in ALL_COMMANDS if script_of(c) == "src/train.py"]


def test_the_readme_quotes_the_real_use_commands():
    for words in ("experiment=sd15_folder", "hydra/launcher=slurm", "hparams_search=optuna", "data=hf", "ckpt_path=last", "src/sample.py",
                  "src/export.py", "eval/tables.py", "eval/evaluate.py", "block=zero,gauss,single"):
        assert any(words in c for c in ALL_COMMANDS), words


@pytest.mark.parametrize("command", [c for c in ALL_COMMANDS if script_of(c) != "src/train.py"])
def test_each_quoted_command_of_the_other_entry_points_composes(command):
    words = [w for w in overrides(command) if not w.startswith("hydra.")]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=ENTRY_POINTS[script_of(command)], overrides=words)
    for word in words:  # each override lands where the line says
        key, _, value = word.partition("=")
        if "/" not in key and not value.startswith("["):
            assert OmegaConf.select(cfg, key) == yaml.safe_load(value), word


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
        assert cfg.eval.num_images == 192 and cfg.eval.batch_size == 16
    if "data.streaming=true" in command:
        assert cfg.data.streaming and cfg.data._target_.endswith("hub_datamodule"), command
    if "model=tiny_sd" in command or command.endswith("src/train.py"):
        assert cfg.trainer.accelerator == "cpu" and cfg.eval.every_n_steps == 50 and cfg.eval.curve_images == 64


def test_every_trial_of_the_documented_wandb_sweep_composes():
    """The W&B sweep in docs/: the agent runs the program with each trial's values as key=value (${args_no_hyphens})."""
    import itertools

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
