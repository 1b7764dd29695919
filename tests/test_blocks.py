import pytest
import torch

from controlnet_lab.base import load_base
from controlnet_lab.blocks import build_trainable_copy, connection_convs
from controlnet_lab.controlnet_lite import ControlNetLiteModel


@pytest.fixture(scope="module")
def pipeline(tiny_base):
    return load_base(tiny_base)


def _inputs(pipeline, batch=2):
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(batch, 3, 16, 16, generator=generator)
    condition = torch.rand(batch, 3, 16, 16, generator=generator)
    t = torch.tensor([10, 700])[:batch]
    hidden, pooled = pipeline.encode_prompt(["red circle with blue background", ""][:batch])
    return sample, t, hidden, pooled, condition


@torch.no_grad()
@pytest.mark.parametrize("block, equal", [("zero", True), ("single", True), ("gauss", False)])
def test_block_at_init_against_the_locked_base(pipeline, block, equal):
    copy = build_trainable_copy(pipeline.unet, block, (16,), std=0.02)
    sample, t, hidden, pooled, condition = _inputs(pipeline)
    base = pipeline.predict_noise(sample, t, hidden, pooled)
    controlled = pipeline.predict_noise(sample, t, hidden, pooled, copy, condition)
    assert torch.equal(base, controlled) is equal


@torch.no_grad()
def test_single_gives_residuals_of_the_copys_shapes_with_far_fewer_parameters(pipeline):
    full = build_trainable_copy(pipeline.unet, "zero", (16,))
    lite = build_trainable_copy(pipeline.unet, "single", (16,))
    sample, t, hidden, pooled, condition = _inputs(pipeline)
    full_down, full_mid = full(sample, t, hidden, controlnet_cond=condition, class_labels=pooled, return_dict=False)
    lite_down, lite_mid = lite(sample, t, hidden, controlnet_cond=condition, class_labels=pooled, return_dict=False)
    assert [r.shape for r in lite_down] == [r.shape for r in full_down]
    assert lite_mid.shape == full_mid.shape
    full_params = sum(p.numel() for p in full.parameters())
    lite_params = sum(p.numel() for p in lite.parameters())
    assert lite_params < full_params / 2, (lite_params, full_params)


def test_single_learns_through_its_zero_convs(pipeline):
    lite = build_trainable_copy(pipeline.unet, "single", (16,))
    sample, t, hidden, pooled, condition = _inputs(pipeline)
    pipeline.predict_noise(sample, t, hidden, pooled, lite, condition).pow(2).mean().backward()
    assert all(conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 for conv in lite.controlnet_down_blocks)


def test_gauss_connection_weights_have_the_configured_spread(pipeline):
    copy = build_trainable_copy(pipeline.unet, "gauss", (16,), std=0.05)
    weights = torch.cat([conv.weight.flatten() for conv in connection_convs(copy)])
    assert abs(weights.std().item() - 0.05) < 0.005
    with pytest.raises(ValueError, match="block.std"):
        build_trainable_copy(pipeline.unet, "gauss", (16,), std=None)


def test_lite_saves_and_loads(pipeline, tmp_path):
    lite = build_trainable_copy(pipeline.unet, "single", (16,))
    lite.save_pretrained(tmp_path / "lite")
    again = ControlNetLiteModel.from_pretrained(tmp_path / "lite")
    for (name, a), (_, b) in zip(lite.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
