"""data=hf data.streaming=true: a dataset streamed by datasets (a local folder of Parquet shards here, as a Hub
dataset is stored), held out by its first rows, trained on without a pass over it, resumable in the middle of an epoch."""
import json
from pathlib import Path

import datasets
import pytest
import torch

from conftest import compose_train, run_train
from controlnet_lab.config_checks import ConfigError, check_train_config
from controlnet_lab.data.datamodule import StreamedHubDataModule, hub_datamodule
from controlnet_lab.data.fill50k import read_index
from controlnet_lab.data.samples import DatasetFormatError
from controlnet_lab.data.streaming import StreamLoader

FEATURES = datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(), "text": datasets.Value("string")})
HELD_OUT = 8


@pytest.fixture(scope="module")
def parquet_dataset(tiny_data, tmp_path_factory) -> Path:
    """tiny_data's 48 rows in two Parquet shards, and a 49th row that repeats row 0's bytes (a held-out duplicate)."""
    records = read_index(tiny_data)
    rows = [{"image": {"bytes": r.target.read_bytes(), "path": None}, "conditioning_image": {"bytes": r.source.read_bytes(), "path": None},
             "text": r.prompt} for r in records]
    rows.append(dict(rows[0]))
    folder = tmp_path_factory.mktemp("streamed") / "data"
    (folder / "data").mkdir(parents=True)
    for shard, part in enumerate((rows[:24], rows[24:])):
        datasets.Dataset.from_list(part, features=FEATURES).to_parquet(str(folder / "data" / f"train-0000{shard}-of-00002.parquet"))
    return folder


def streamed(folder: Path, tmp_path: Path, **settings) -> StreamedHubDataModule:
    data = hub_datamodule(name=str(folder), streaming=True, resolution=16, batch_size=4, val_size=HELD_OUT, prompt_dropout=0.5,
                         cache_dir=tmp_path, shuffle_buffer=16, **settings)
    data.setup()
    return data


def test_a_stream_is_held_out_by_its_first_rows_and_trained_on_without_them(parquet_dataset, tiny_data, tmp_path):
    data = streamed(parquet_dataset, tmp_path)
    prompts = [r.prompt for r in read_index(tiny_data)]
    assert data.val_samples.prompts == prompts[:HELD_OUT] and data.split_report["streaming"]["held_out_rows"] == "the first 8 of split train"
    loader = data.train_dataloader()
    first, second = list(loader), list(loader)
    trained = [p for batch in first for p in batch["true_prompt"]]
    # The 40 rows after the held-out ones, each once; the 49th (row 0's bytes) dropped.
    assert sorted(trained) == sorted(prompts[HELD_OUT:]) and len(trained) == 40
    assert first[0]["condition"].shape == (4, 3, 16, 16) and first[0]["target"].min() >= -1
    assert [p for batch in second for p in batch["true_prompt"]] != trained  # the next epoch shuffles anew
    dropped = sum(p == "" for batch in first for p in batch["prompt"])
    assert 8 <= dropped <= 32  # prompt dropout 0.5 of 40


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumed_in_an_epoch_serves_the_rest_of_the_same_batches(parquet_dataset, tmp_path, workers):
    data = streamed(parquet_dataset, tmp_path, num_workers=workers)
    fresh = list(data.train_dataloader())
    # As train_dataloader builds it when Lightning restores a checkpoint taken after 4 batches of epoch 0.
    rest = list(StreamLoader(data.train_dataloader().dataset, resume_epoch=0, resume_batches=4, num_workers=workers))
    assert len(rest) == len(fresh) - 4
    for a, b in zip(fresh[4:], rest):
        assert a["prompt"] == b["prompt"] and torch.equal(a["condition"], b["condition"]) and torch.equal(a["target"], b["target"])


def test_data_size_takes_the_first_rows_of_the_training_stream(parquet_dataset, tiny_data, tmp_path):
    data = streamed(parquet_dataset, tmp_path, size=12)
    trained = [p for batch in data.train_dataloader() for p in batch["true_prompt"]]
    assert sorted(trained) == sorted(r.prompt for r in read_index(tiny_data)[HELD_OUT : HELD_OUT + 12])


@pytest.mark.bad_input
def test_a_stream_shorter_than_the_held_out_set_names_the_key(parquet_dataset, tmp_path):
    with pytest.raises(DatasetFormatError, match=r"data.val_size=100: the stream of .* ended after 49 rows"):
        hub_datamodule(name=str(parquet_dataset), streaming=True, resolution=16, batch_size=4, val_size=100, cache_dir=tmp_path).setup()


@pytest.mark.bad_input
def test_what_a_stream_cannot_give_is_refused_by_its_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.streaming=true: model=tiny pretrains its base on the whole training pool"):
        check_train_config(compose_train(["data=hf", "data.name=x", "data.streaming=true"]))
    with pytest.raises(ConfigError, match=r"eval.train_images > 0"):
        check_train_config(compose_train(["data=hf", "data.name=x", "data.streaming=true", "model.base.pretrained_model_name_or_path=b",
                                          "eval.train_images=4"]))
    with pytest.raises(ValueError, match=r"data.streaming=true streams data.name .* set data.streaming=false"):
        hub_datamodule(path=str(tmp_path), streaming=True, resolution=16, batch_size=4, val_size=4)


@pytest.mark.slow
def test_a_run_trains_and_evaluates_on_a_stream(parquet_dataset, tiny_base, tmp_path):
    result = run_train(["experiment=smoke", "data=hf", f"data.name={parquet_dataset}", "data.streaming=true", "data.size=null",
                        f"data.val_size={HELD_OUT}", "data.validation_size=4", f"model.base.pretrained_model_name_or_path={tiny_base}", "logger=csv"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next((tmp_path / "outputs").rglob("results.json")).read_text())
    assert results["global_step"] == 6 and results["split"]["streaming"]["shuffle_buffer"] == 1000
    assert results["metrics"]["skipped"]["fid_domain"].startswith("data.streaming=true")
    assert results["metrics"]["mask_iou"] is not None  # fill50k-style rows: the oracle scores the held-out set
