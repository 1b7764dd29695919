import numpy as np

from controlnet_lab.metrics.convergence import rise, sudden_convergence_step

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


def test_a_linear_ramp_rises_but_not_suddenly():
    steps = list(range(0, 1550, 50))
    values = np.linspace(0.2, 0.8, len(steps))
    found = rise(steps, values)
    assert found["start_step"] == 150 and found["end_step"] == 1350 and found["rise_fraction"] == 0.8
    assert not found["sudden"]
    assert sudden_convergence_step(steps, values) is None


def test_a_step_curve_rises_suddenly_at_the_jump():
    steps = list(range(0, 1550, 50))
    values = [0.22 if s < 550 else 0.83 for s in steps]
    found = rise(steps, values)
    assert found["start_step"] == found["half_step"] == found["end_step"] == 550 and found["sudden"]
    assert sudden_convergence_step(steps, values) == 550


def test_a_rise_just_over_the_threshold_is_gradual():
    steps = list(range(0, 1550, 50))
    # a ramp from step 250 to 700: 10% reached at 300, 90% at 700, 400 / 1500 = 0.267 > 0.2
    values = np.interp(steps, [0, 250, 700, 1500], [0.2, 0.2, 0.8, 0.8])
    found = rise(steps, values)
    assert (found["start_step"], found["end_step"]) == (300, 700) and not found["sudden"]
    assert rise(steps, values, max_rise_fraction=0.3)["sudden"]
