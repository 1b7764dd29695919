import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from controlnet_lab.blocks import build_trainable_copy
from conftest import fill50k_dataset
from controlnet_lab.module import ControlNetModule


def _inputs(module, batch=3, size=16):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 3, size, size, generator=generator)
    condition = torch.rand(batch, 3, size, size, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    hidden, pooled = module.base.encode_prompt(["red circle with blue background", "", "green circle with yellow background"][:batch])
    return sample, timesteps, hidden, pooled, condition


def _perturb(model, seed=0):
    """Give a model non-trivial weights, as a pretrained one has."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


@torch.no_grad()
def test_zero_block_at_init_equals_the_locked_base(tiny_base):
    module = ControlNetModule(str(tiny_base), block="zero")
    _perturb(module.locked_unet)
    _perturb(module.text_encoder, seed=1)
    # Rebuild the copy from the perturbed UNet so its encoder weights are the locked ones.
    module.controlnet = build_trainable_copy(module.locked_unet, "zero", (16,))
    sample, t, hidden, pooled, condition = _inputs(module)
    base = module.base.predict_noise(sample, t, hidden, pooled)
    controlled = module.base.predict_noise(sample, t, hidden, pooled, module.controlnet, condition)
    assert torch.equal(base, controlled)
    assert base.abs().mean() > 0.01  # a real prediction, not zeros


@pytest.mark.parametrize("block", ["zero", "gauss"])
def test_the_initial_output_change_is_zero_only_for_zero_convs(tiny_base, tiny_data, block):
    """The callback's measurement at step 0: the same noise with and without the ControlNet, on held-out samples."""
    module = ControlNetModule(str(tiny_base), block=block, block_std="standard")
    _perturb(module.locked_unet)
    batch = next(iter(DataLoader(fill50k_dataset(tiny_data, 16, count=8), batch_size=8)))
    change = module.output_change(batch, torch.Generator().manual_seed(3))
    assert change["images"] == 8
    if block == "zero":
        assert change["mean_abs_change"] == 0.0 and change["relative"] == 0.0
    else:
        assert change["relative"] > 0.05, change
    assert module.output_change(batch, torch.Generator().manual_seed(3)) == change  # the seed fixes the noise


def test_zero_block_receives_gradients(tiny_base):
    module = ControlNetModule(str(tiny_base), block="zero")
    sample, t, hidden, pooled, condition = _inputs(module)
    out = module.base.predict_noise(sample, t, hidden, pooled, module.controlnet, condition)
    out.pow(2).mean().backward()
    assert module.controlnet.controlnet_mid_block.weight.grad.abs().sum() > 0


def test_training_changes_only_the_trainable_copy(tiny_base, tiny_data):
    L.seed_everything(0)
    module = ControlNetModule(str(tiny_base), block="zero", lr=1e-2, num_val_images=0)
    locked_before = {k: v.clone() for k, v in module.state_dict().items() if k.startswith(module.locked_prefixes)}
    copy_before = {k: v.clone() for k, v in module.controlnet.state_dict().items()}
    loader = DataLoader(fill50k_dataset(tiny_data, 16, prompt_dropout=0.5), batch_size=8)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)

    for key, value in module.state_dict().items():
        if key.startswith(module.locked_prefixes):
            assert torch.equal(value, locked_before[key]), key
    changed = [k for k, v in module.controlnet.state_dict().items() if not torch.equal(v, copy_before[k])]
    assert changed, "the trainable copy did not change"
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.controlnet.parameters()}
    assert not module.locked_unet.training and not module.text_encoder.training


def test_checkpoint_leaves_out_the_locked_base(tiny_base, tmp_path):
    module = ControlNetModule(str(tiny_base), block="zero")
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith(module.locked_prefixes) for k in checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])  # strict


@pytest.mark.bad_input
def test_unknown_block_is_rejected(tiny_base):
    with pytest.raises(ValueError, match="block='lego'"):
        ControlNetModule(str(tiny_base), block="lego")


def test_compile_runs_the_training_steps_denoiser_compiled_and_trains_the_same(tiny_base, tiny_data):
    graphs = []

    def recording_backend(graph, example_inputs):  # torch.compile's backend: run the captured graph as it is
        graphs.append(graph)
        return graph.forward

    trained = {}
    for name, compile in (("eager", None), ("compiled", {"backend": recording_backend})):
        L.seed_everything(0)
        module = ControlNetModule(str(tiny_base), block="zero", lr=1e-2, num_val_images=0, compile=compile)
        loader = DataLoader(fill50k_dataset(tiny_data, 16, count=16), batch_size=8)
        trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, train_dataloaders=loader)
        trained[name] = module.controlnet.state_dict()
    assert graphs, "the training step did not run through torch.compile"
    assert trained["eager"].keys() == trained["compiled"].keys()
    for key, value in trained["eager"].items():
        torch.testing.assert_close(trained["compiled"][key], value, msg=key)


class PoisonedBatches(torch.utils.data.Dataset):
    """The samples of ``dataset``, with a NaN target in every batch from ``from_batch`` on (batch size ``batch``)."""

    def __init__(self, dataset, from_batch: int, batch: int):
        self.dataset, self.first, self.batch = dataset, from_batch * batch, batch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        if index >= self.first:
            item["target"] = torch.full_like(item["target"], float("nan"))
        return item


def fit_poisoned(tiny_base, tiny_data, folder, skip: bool, count: int = 40) -> tuple[ControlNetModule, L.Trainer]:
    L.seed_everything(0)
    module = ControlNetModule(str(tiny_base), num_val_images=0, skip_nonfinite=skip)
    loader = DataLoader(PoisonedBatches(fill50k_dataset(tiny_data, 16, count=count), from_batch=3, batch=8), batch_size=8)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_last=True, save_top_k=0)
    trainer = L.Trainer(max_epochs=1, logger=False, callbacks=[checkpoints], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)
    return module, trainer


def test_a_nonfinite_loss_stops_training_at_its_step_and_keeps_the_last_good_checkpoint(tiny_base, tiny_data, tmp_path):
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 3 \(the last finite loss: [0-9.]+ at step 2\)"):
        fit_poisoned(tiny_base, tiny_data, tmp_path, skip=False)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2


def test_nonfinite_steps_can_be_skipped_and_counted(tiny_base, tiny_data, tmp_path):
    module, trainer = fit_poisoned(tiny_base, tiny_data, tmp_path / "poisoned", skip=True)
    clean, _ = fit_poisoned(tiny_base, tiny_data, tmp_path / "clean", skip=True, count=24)
    # 5 batches, the last 2 poisoned: skipped and counted, leaving the weights of the 3 good steps (Lightning still
    # counts the skipped steps in its global step).
    assert module.nonfinite_skips == 2 and clean.nonfinite_skips == 0 and trainer.global_step == 5
    assert all(torch.equal(a, b) for a, b in zip(module.controlnet.parameters(), clean.controlnet.parameters()))
