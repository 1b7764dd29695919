"""Every score's floors on any data: the base alone and base + ControlNet given another sample's condition."""
from types import SimpleNamespace

import torch

from controlnet_lab.data.datamodule import Fill50kDataModule
from controlnet_lab.evaluation.held_out import MetricSuite, evaluate_held_out, shuffled
from controlnet_lab.metrics.fidelity import ConditionFidelity
from controlnet_lab.sampling import Sampling


class ConditionCopier:
    """A stand-in for a base with a perfect ControlNet: given a held-out condition it draws that sample's target; the
    base alone, given no control, draws a blank gray image."""

    def __init__(self, dataset):
        items = [dataset[i] for i in range(len(dataset))]
        self.targets = {item["condition"].numpy().tobytes(): item["target"] for item in items}
        self.denoiser = SimpleNamespace(device=torch.device("cpu"))
        self.shape = items[0]["target"].shape

    def __call__(self, prompts, condition=None, controlnet=None, generator=None, **_):
        if controlnet is None:
            return torch.zeros(len(prompts), *self.shape)
        return torch.stack([self.targets[c.numpy().tobytes()] for c in condition])


def test_each_setting_reports_its_floors_beside_the_controlnets_score(tiny_data):
    data = Fill50kDataModule(root=str(tiny_data), name="tiny", resolution=16, batch_size=4, val_size=16, validation_size=4, condition="outline")
    data.setup()
    test = data.test_dataset()
    copier = ConditionCopier(test)
    results = evaluate_held_out(copier, object(), test, ["red", "green", "blue", "yellow"], count=12, batch_size=6, seed=0,
                                sampling=Sampling.from_config({}), suite=MetricSuite(fidelity=ConditionFidelity("outline", 16)))
    for setting, scores in results["prompt_settings"].items():
        own, alone, other = scores, scores["base_alone"], scores["shuffled_condition"]
        # the right condition gives the sample back; another sample's condition or none gives far less, against the same outlines
        assert own["mask_iou"] > 0.9 and own["edge_f1"] > 0.9, setting
        assert other["mask_iou"] < own["mask_iou"] - 0.3 and other["edge_f1"] < own["edge_f1"] - 0.3, setting
        assert alone["mask_iou"] < 0.3 and alone["edge_f1"] < 0.3, setting
    assert results["prompt_settings"]["perfect"]["base_alone"]["mask_iou"] == results["base_mask_iou"]  # the same images


def test_a_shuffled_condition_is_never_the_samples_own_and_composed_nets_shift_together():
    conditions = torch.arange(5.0).view(5, 1)
    moved = shuffled(conditions)
    assert not torch.any(moved == conditions) and sorted(moved.flatten().tolist()) == sorted(conditions.flatten().tolist())
    first, second = shuffled([conditions, conditions * 10])
    assert torch.equal(second, first * 10)
