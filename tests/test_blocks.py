import math

import pytest
import torch

from controlnet_lab.bases import load_base
from controlnet_lab.blocks import build_trainable_copy, connection_convs, connection_init_stds
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
@pytest.mark.parametrize("block", ["zero", "single", "gauss"])
def test_block_at_init_against_the_locked_base(pipeline, block):
    """Zero convs (and lite's) leave the locked base's prediction exactly as it was; the standard Gaussian
    init changes it at step 0 (measured on an untrained tiny base of this shape: a mean absolute change
    of 0.155 against a prediction of mean magnitude 0.257; with the old std 0.02, 0.028)."""
    copy = build_trainable_copy(pipeline.unet, block, (16,), std="standard")
    sample, t, hidden, pooled, condition = _inputs(pipeline)
    base = pipeline.predict_noise(sample, t, hidden, pooled)
    controlled = pipeline.predict_noise(sample, t, hidden, pooled, copy, condition)
    change = (controlled - base).abs().mean().item()
    if block == "gauss":
        assert change > 0.05 * base.abs().mean().item(), (change, base.abs().mean().item())
    else:
        assert change == 0.0 and torch.equal(base, controlled)


def test_standard_gauss_init_has_each_layers_default_std(pipeline):
    copy = build_trainable_copy(pipeline.unet, "gauss", (16,), std="standard")
    stds = connection_init_stds(copy, "gauss", "standard")
    convs = dict(connection_convs(copy))
    for name, conv in convs.items():
        fan_in = conv.weight[0].numel()
        assert stds[name] == pytest.approx(1 / math.sqrt(3 * fan_in))
        # What PyTorch's own init gives the same layer has that std too.
        fresh = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size)
        assert fresh.weight.std().item() == pytest.approx(stds[name], rel=0.15)
        assert conv.weight.std().item() == pytest.approx(stds[name], rel=0.15) and torch.all(conv.bias == 0)
    assert stds["controlnet_down_blocks.0"] == pytest.approx(0.144, abs=1e-3)  # a 1x1 conv on 16 channels
    assert set(connection_init_stds(copy, "zero", "standard").values()) == {0.0}
    with pytest.raises(ValueError, match="block.std"):
        build_trainable_copy(pipeline.unet, "gauss", (16,), std="wide")
    tripled = connection_init_stds(copy, "gauss", "standard_x3")  # 3 times each layer's own std (ablation_gauss_std)
    assert all(tripled[name] == pytest.approx(3 * std) for name, std in stds.items())
    assert connection_init_stds(copy, "gauss", "standard_x0.5")["controlnet_mid_block"] == pytest.approx(stds["controlnet_mid_block"] / 2)
    for bad in ("standard_x0", "standard_x", "standard_3"):
        with pytest.raises(ValueError, match="standard_x<factor>"):
            connection_init_stds(copy, "gauss", bad)


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
    weights = torch.cat([conv.weight.flatten() for _, conv in connection_convs(copy)])
    assert abs(weights.std().item() - 0.05) < 0.005
    with pytest.raises(ValueError, match="block.std"):
        build_trainable_copy(pipeline.unet, "gauss", (16,), std=None)


def test_lite_saves_and_loads(pipeline, tmp_path):
    lite = build_trainable_copy(pipeline.unet, "single", (16,))
    lite.save_pretrained(tmp_path / "lite")
    again = ControlNetLiteModel.from_pretrained(tmp_path / "lite")
    for (name, a), (_, b) in zip(lite.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
