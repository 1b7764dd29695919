import numpy as np

from controlnet_lab.metrics.convergence import curve_convergence, rise, sudden_convergence_step

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
    assert found["start_step"] == 150 and found["end_step"] == 1350 and found["rise_share"] == round(1200 / 1350, 4)
    assert found["sudden"] is False
    assert sudden_convergence_step(steps, values) is None


def test_a_step_curve_rises_suddenly_at_the_jump():
    steps = list(range(0, 1550, 50))
    values = [0.22 if s < 550 else 0.83 for s in steps]
    found = rise(steps, values)
    assert found["start_step"] == found["half_step"] == found["end_step"] == 550 and found["sudden"]
    assert sudden_convergence_step(steps, values) == 550


def test_a_rise_over_the_share_is_gradual_and_one_within_it_sudden():
    steps = list(range(0, 1550, 50))
    # a ramp from step 250 to 700: 10% reached at 300, 90% at 700: 400 of the 700 steps to the end (0.57)
    values = np.interp(steps, [0, 250, 700, 1500], [0.2, 0.2, 0.8, 0.8])
    found = rise(steps, values)
    assert (found["start_step"], found["end_step"], found["rise_steps"]) == (300, 700, 400) and found["sudden"] is False
    assert rise(steps, values, max_rise_share=0.7)["sudden"]  # 400 + 50 <= 490


def test_a_longer_flat_tail_leaves_the_verdict_unchanged():
    """The criterion compares the rise with the steps taken to reach its end, not with the run's length."""
    for jump in (True, False):
        steps = list(range(0, 1550, 50))
        values = [0.2 if s < 700 else 0.8 for s in steps] if jump else list(np.interp(steps, [0, 250, 700, 1500], [0.2, 0.2, 0.8, 0.8]))
        padded_steps = list(range(0, 6050, 50))
        padded = values + [values[-1]] * (len(padded_steps) - len(steps))
        short, long = rise(steps, values), rise(padded_steps, padded)
        assert short["sudden"] is long["sudden"] is jump and short["rise_share"] == long["rise_share"]
        assert sudden_convergence_step(steps, values) == sudden_convergence_step(padded_steps, padded) == (700 if jump else None)


def test_a_curve_too_coarse_to_resolve_the_rise_is_undecided():
    steps = list(range(0, 3500, 500))
    values = [0.2 if s < 1000 else 0.8 for s in steps]  # a jump between 500 and 1000: 0-500 steps against 250 allowed
    found = rise(steps, values)
    assert found["sudden"] is None and "more often" in found["undecided"]
    assert sudden_convergence_step(steps, values) is None
    fine = list(range(0, 3050, 50))
    assert rise(fine, [0.2 if s < 1000 else 0.8 for s in fine])["sudden"] is True


def test_a_stored_curve_is_judged_by_its_metric():
    curve = [{"step": s, "edge_f1": 0.2 if s < 800 else 0.9, "mask_iou": 0.3} for s in range(0, 2000, 50)]
    assert curve_convergence(curve, "edge_f1")["sudden_convergence_step"] == 800
    assert curve_convergence(curve, "mask_iou") == {"rise": None, "sudden_convergence_step": None}
