import numpy as np
import pytest

from controlnet_lab.data.conditions import condition_maker
from controlnet_lab.data.fill50k import read_index
from controlnet_lab.data.samples import load_rgb
from controlnet_lab.metrics.fidelity import ConditionFidelity, edge_f1, edges_of


def _samples(tiny_data, resolution=32, count=16):
    records = read_index(tiny_data)[:count]
    sources = np.stack([load_rgb(r.source, resolution, "nearest") for r in records])  # 16 px data: outlines stay lines
    targets = np.stack([load_rgb(r.target, resolution, "nearest") for r in records])
    return sources, targets


def test_edge_f1_is_one_on_own_edges_and_drops_as_they_shift(tiny_data):
    sources, _ = _samples(tiny_data)
    edges = edges_of(sources[0])
    assert edge_f1(edges, edges, tolerance=0) == 1.0
    scores = [edge_f1(np.roll(edges, shift, axis=1), edges, tolerance=1) for shift in range(5)]
    assert scores[0] == 1.0 and scores[1] == 1.0  # within the 1-pixel tolerance
    assert scores[2] < 1.0 and all(a >= b for a, b in zip(scores[1:], scores[2:])) and scores[4] < 0.7


@pytest.mark.parametrize("condition", ["outline", "canny", "seg"])
def test_targets_are_faithful_to_their_conditions_and_shuffled_ones_are_not(tiny_data, condition):
    sources, targets = _samples(tiny_data)
    maker = condition_maker(condition, 32)
    conditions = np.stack([maker(s, t, f"source/{i}.png") for i, (s, t) in enumerate(zip(sources, targets))])
    fidelity = ConditionFidelity(condition, 32)
    own = fidelity.score(targets, conditions)["value"]
    shuffled = fidelity.score(np.roll(targets, 1, axis=0), conditions)["value"]
    assert own > 0.8 and shuffled < own - 0.3, (own, shuffled)


def test_fidelity_names_what_it_cannot_score():
    with pytest.raises(ValueError, match="data.condition=midas"):
        ConditionFidelity("midas", 32)
