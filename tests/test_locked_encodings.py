"""The locked encodings (VAE posteriors, text hidden states) cached on disk in shards: equal to computing them, keyed by
what they depend on, read row by row, and computed without touching the run's random state."""
from __future__ import annotations

import torch
import pytest
from torch.utils.data import DataLoader

from conftest import fill50k_dataset
from sd_fixtures import sd_module
from controlnet_lab.bases import load_base
from controlnet_lab.data import encoded as encoded_module
from controlnet_lab.data.datamodule import Fill50kDataModule
from controlnet_lab.data.encoded import EncodedDataset, EncodingStore, LockedEncodings, StoreWriter
from controlnet_lab.locked_encodings import TargetImages, cached_encodings


def stacked(rows) -> torch.Tensor:
    return torch.stack([rows[i] for i in range(len(rows))])


def test_cached_and_computed_encodings_give_the_same_loss(sd_folder, sd_data, tmp_path):
    module = sd_module(sd_folder, block="gauss", block_std=0.05)
    dataset = fill50k_dataset(sd_data, 32, count=6)
    encodings = cached_encodings(module.base, "fingerprint", dataset, tmp_path, batch_size=4)  # two batches, one shard
    images = stacked(encodings.images)
    assert images.shape == (6, 8, 4, 4)  # posterior mean and log-variance of 4 latent channels at 32/8
    assert set(encodings.prompt_rows) == set(dataset.prompts) | {""}
    with torch.no_grad():
        assert torch.equal(images, module.base.image_encoding(stacked(TargetImages(dataset))))  # what the VAE computes, bit for bit
    reread = cached_encodings(module.base, "fingerprint", dataset, tmp_path)  # from the store this time
    assert torch.equal(stacked(reread.images), images) and torch.equal(stacked(reread.text_hidden), stacked(encodings.text_hidden))
    computed = next(iter(DataLoader(dataset, batch_size=6)))
    without_targets = fill50k_dataset(sd_data, 32, count=6, with_target=False)  # as the training loader serves cached latents
    without_targets.samples.targets.read = None  # a target's pixels are never decoded
    cached = next(iter(DataLoader(EncodedDataset(without_targets, reread), batch_size=6, num_workers=2)))  # workers open the shards
    assert "target" not in cached and torch.equal(cached["condition"], computed["condition"])
    with torch.no_grad():  # a prompt's embedding rounds by its row's place in the batch on some CPUs (AVX-512: 5e-7 apart)
        torch.testing.assert_close(cached["text_hidden"], module.base.encode_prompt(computed["prompt"])[0], rtol=0, atol=1e-5)
    losses = [module.diffusion_loss(batch, torch.Generator().manual_seed(7)) for batch in (computed, cached)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    assert abs(losses[0] - module.diffusion_loss(computed, torch.Generator().manual_seed(8))) > 1e-3  # the draws matter


def test_the_encoding_store_is_written_in_shards_and_read_row_by_row(tmp_path, monkeypatch):
    writer = StoreWriter(tmp_path / "store", torch.bfloat16, shard_bytes=3 * 2 * 4)  # 3 rows of 4 bf16 values a shard
    rows = torch.randn(8, 4)
    for start in range(0, 8, 2):
        writer.add(x=rows[start : start + 2])
    writer.finish(note="kept")
    store = EncodingStore(tmp_path / "store")
    assert [s["rows"] for s in store.index["shards"]] == [4, 4] and store.extra == {"note": "kept"}
    column = store.column("x")
    assert len(column) == 8 and column[5].dtype == torch.float32
    assert torch.equal(stacked(column), rows.to(torch.bfloat16).float())
    assert store.column("absent") is None
    with pytest.raises(IndexError):
        column[8]
    monkeypatch.setattr(encoded_module, "OPEN_SHARDS", 1)  # one shard open at a time: each read reopens the other
    fresh = store.column("x")
    assert torch.equal(torch.stack([fresh[i] for i in (0, 5, 1, 7)]), rows[[0, 5, 1, 7]].to(torch.bfloat16).float())
    assert len(fresh._handles) == 1


def test_the_training_loader_reads_no_targets_when_their_latents_are_cached(sd_data, tmp_path):
    data = Fill50kDataModule(root=str(sd_data), name="sd", resolution=32, batch_size=4, val_size=4, cache_dir=tmp_path)
    data.setup()
    assert "target" in next(iter(data.train_dataloader()))
    data.train_encodings = LockedEncodings(images=torch.zeros(len(data.train_rows), 8, 4, 4))
    batch = next(iter(data.train_dataloader()))
    assert "target" not in batch and batch["image_encoding"].shape == (4, 8, 4, 4) and batch["condition"].shape == (4, 3, 32, 32)
    data.train_encodings = LockedEncodings(text_hidden=torch.zeros(1, 2, 3), prompt_rows={p: 0 for p in [*data.prompts(), ""]})
    assert "target" in next(iter(data.train_dataloader()))  # text alone cached: the VAE still encodes each target


def test_encodings_are_keyed_by_the_locked_parts_and_samples(sd_folder, sd_data, tmp_path):
    base = load_base(sd_folder)
    cached_encodings(base, "a", fill50k_dataset(sd_data, 32, count=4), tmp_path)
    cached_encodings(base, "b", fill50k_dataset(sd_data, 32, count=4), tmp_path)  # another base fingerprint, the same VAE
    cached_encodings(base, "a", fill50k_dataset(sd_data, 32, count=5), tmp_path)
    store = tmp_path / "encodings"
    assert len(list(store.glob("images-*"))) == 2 and len(list(store.glob("text-*"))) >= 2
    with torch.no_grad():
        base.vae.decoder.conv_out.bias.add_(1.0)  # the decoder changes nothing the cache holds, but the VAE is another one
        base.vae.encoder.conv_out.bias.add_(1.0)
    cached_encodings(base, "a", fill50k_dataset(sd_data, 32, count=4), tmp_path)
    assert len(list(store.glob("images-*"))) == 3
    assert cached_encodings(base, "a", fill50k_dataset(sd_data, 32, count=4), tmp_path, images=False).images is None


def test_computing_the_cache_draws_nothing_from_the_run_random_state(sd_folder, sd_data, tmp_path):
    """A run that computes its cache and one that reads it must train alike: computing it (over a dataset with
    prompt dropout) leaves Python's and torch's random state untouched."""
    import random

    base = load_base(sd_folder)
    random.seed(0)
    torch.manual_seed(0)
    cached_encodings(base, "fingerprint", fill50k_dataset(sd_data, 32, prompt_dropout=0.5), tmp_path, workers=2)
    after = (random.random(), torch.rand(1))
    random.seed(0)
    torch.manual_seed(0)
    assert after == (random.random(), torch.rand(1))
