"""The embedded default's base shipped with the project: used in place of pretraining only for its own recipe, checked
against its recorded fingerprint, and rebuilt bit for bit from the recipe by src/build_base.py (`make base`)."""
import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from conftest import ROOT, SHARED_DATA, SMOKE_DATA_COUNT, compose_train
from controlnet_lab import base_rebuild
from controlnet_lab.bases import pretraining
from controlnet_lab.bases.fingerprint import base_fingerprint
from controlnet_lab.bases.pretraining import NOT_IN_KEY, SHIPPED_BASES, build_once


def ship(base: Path, shipped_dir: Path, key: str) -> Path:
    shipped = shipped_dir / key
    shutil.copytree(base, shipped)
    (shipped / "pretrain_config.json").write_text(json.dumps({"steps": 0, "fingerprint": base_fingerprint(base)}))
    return shipped


def test_a_shipped_base_is_copied_to_the_cache_instead_of_pretrained(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setattr(pretraining, "SHIPPED_BASES", tmp_path / "shipped")
    shipped = ship(tiny_base, tmp_path / "shipped", "base-key")
    builds = []

    def build(staging: Path) -> dict:
        builds.append(staging)
        shutil.copytree(tiny_base, staging, dirs_exist_ok=True)
        return {"steps": 0}

    folder = build_once(tmp_path / "cache" / "base-key", build, use_shipped=True)
    assert not builds and base_fingerprint(folder) == base_fingerprint(tiny_base)
    assert json.loads((folder / "pretrain_config.json").read_text())["shipped_from"] == str(shipped)
    # Another key, or model.base.shipped=false, pretrains as before.
    build_once(tmp_path / "cache" / "base-other", build, use_shipped=True)
    build_once(tmp_path / "elsewhere" / "base-key", build, use_shipped=False)
    assert len(builds) == 2


@pytest.mark.bad_input
def test_a_damaged_shipped_base_is_refused_naming_the_file_to_restore(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setattr(pretraining, "SHIPPED_BASES", tmp_path / "shipped")
    shipped = ship(tiny_base, tmp_path / "shipped", "base-key")
    (weights,) = (shipped / "unet").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"shipped base {shipped} has weights fingerprint .* restore it .*model.base.shipped=false"):
        build_once(tmp_path / "cache" / "base-key", lambda staging: {}, use_shipped=True)
    assert not (tmp_path / "cache" / "base-key").exists()


def recipe(overrides: list[str]) -> dict:
    settings = OmegaConf.to_container(compose_train(overrides).model.base, resolve=True)
    return {k: v for k, v in settings.items() if k not in NOT_IN_KEY}


# The configs whose base ships: the embedded defaults, and the experiment whose base differs from its model's (two layers).
SHIPPED_RECIPES = (["model=tiny"], ["model=tiny_sd"], ["experiment=ablation_architecture"], ["model=tiny_sd3"], ["model=tiny_sdxl"])


def test_each_shipped_base_is_intact_and_is_the_current_recipe_of_an_embedded_model():
    """A change to a shipped recipe in conf/ leaves the shipped copy unused (another key): this says which to rebuild."""
    shipped = sorted(SHIPPED_BASES.glob("base-*"))
    assert shipped, f"no base ships in {SHIPPED_BASES}"
    recipes = [recipe(overrides) for overrides in SHIPPED_RECIPES]
    for folder in shipped:
        report = json.loads((folder / "pretrain_config.json").read_text())
        assert base_fingerprint(folder) == report["fingerprint"], folder
        assert {k: v for k, v in report["model"].items() if k not in NOT_IN_KEY} in recipes, \
            f"{folder} was built from none of the shipped recipes in conf/ ({SHIPPED_RECIPES}): rebuild it with `make base ARGS=\"ship=true <its overrides>\"`"
        assert report["resolution"] == compose_train().data.resolution and report["built_by"]["commit"]


def test_make_base_rebuilds_the_recipe_bit_for_bit(tmp_path, monkeypatch):
    """Two pretrainings of one recipe (seeded, one process) give the same weights: what `make base` compares."""
    monkeypatch.setattr(pretraining, "SHIPPED_BASES", tmp_path / "shipped")
    monkeypatch.setattr(base_rebuild, "SHIPPED_BASES", tmp_path / "shipped")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="build_base", overrides=["experiment=smoke", SMOKE_DATA_COUNT, f"data.cache_dir={SHARED_DATA[0]}",
                                                           "model.base.pretrain.max_steps=3", "ship=true"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "first")
        cfg.paths.cache_dir = str(tmp_path / "cache-first")
    first = base_rebuild.rebuild_and_compare(cfg)
    assert first["shipped"] is None and first["shipped_now"] and first["rebuilt"]["built_by"]["machine"]["cores"] >= 1
    shipped = tmp_path / "shipped" / first["recipe_key"]
    assert base_fingerprint(shipped) == first["rebuilt"]["fingerprint"]

    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.cache_dir, cfg.ship = str(tmp_path / "second"), str(tmp_path / "cache-second"), False
    second = base_rebuild.rebuild_and_compare(cfg)
    assert second["recipe_key"] == first["recipe_key"] and second["bit_for_bit_equal"] is True
    assert json.loads((tmp_path / "second" / "build_base.json").read_text()) == second
    assert "bit for bit equal to the shipped copy" in base_rebuild.summary(second)
