import numpy as np

from controlnet_lab.metrics.convergence import sudden_convergence_step

STEPS = list(range(0, 2100, 100))


def test_finds_the_jump_of_a_step_curve():
    values = [0.2 if s < 1200 else 0.8 for s in STEPS]
    assert sudden_convergence_step(STEPS, values) == 1200


def test_finds_the_midpoint_of_a_steep_sigmoid_with_noise():
    rng = np.random.default_rng(0)
    values = 0.25 + 0.55 / (1 + np.exp(-(np.array(STEPS) - 700) / 40)) + rng.normal(0, 0.01, len(STEPS))
    assert sudden_convergence_step(STEPS, values) == 700


def test_a_single_lucky_measurement_is_not_convergence():
    values = [0.2] * len(STEPS)
    values[3] = 0.9
    values[-8:] = [0.8] * 8
    assert sudden_convergence_step(STEPS, values) == STEPS[-8]


def test_flat_and_falling_curves_have_no_jump():
    assert sudden_convergence_step(STEPS, [0.3] * len(STEPS)) is None
    assert sudden_convergence_step(STEPS, np.linspace(0.8, 0.2, len(STEPS))) is None
    assert sudden_convergence_step(STEPS, 0.3 + 0.05 * np.sin(np.arange(len(STEPS)))) is None
