from pathlib import Path

import lightning as L
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch.demos.boring_classes import BoringModel

from controlnet_lab.callbacks import ConvergenceStop, FidelityCurve
from controlnet_lab.config_checks import ConfigError
from controlnet_lab.training import training_callbacks
from controlnet_lab.metrics.convergence import curve_convergence, first_converged_step, rise, sudden_convergence_step

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


class SyntheticCurve(FidelityCurve):
    """The fidelity curve callback with its measurement replaced by a given function of the step."""

    def __init__(self, every_n_steps: int, level):
        super().__init__(every_n_steps=every_n_steps, num_images=4, condition="outline", resolution=32)
        self.level = level

    def measure(self, trainer, pl_module) -> None:
        self.curve.append({"step": trainer.global_step, "edge_f1": self.level(trainer.global_step)})


def rising_then_flat(step: int) -> float:
    noise = 0.01 * np.sin(step * 1.7)
    return 0.2 + 0.6 * min(step, 300) / 300 + noise


def fit(stop: ConvergenceStop, level, max_steps: int = 3000) -> L.Trainer:
    trainer = L.Trainer(max_steps=max_steps, callbacks=[SyntheticCurve(50, level), stop], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(BoringModel())
    return trainer


def test_the_stopping_rule_ends_training_once_the_curve_is_flat():
    stop = ConvergenceStop(enabled=True, points=16, max_slope_per_1k=0.05)
    trainer = fit(stop, rising_then_flat)
    summary = stop.summary()["stopping"]
    # the last 16 points (750 steps) must lie mostly after the rise ended at 300 before the slope's interval falls below 0.05
    assert summary["converged"] and 900 <= summary["converged_at_step"] <= 1300 and trainer.global_step == summary["converged_at_step"]
    assert summary["last_reading"]["ci95_per_1k"][1] < 0.05 and summary["last_reading"]["from_step"] >= 300


def test_the_stopping_rule_lets_a_rising_curve_run_to_the_cap_and_only_records_when_off():
    rising = ConvergenceStop(enabled=True, points=16, max_slope_per_1k=0.05)
    trainer = fit(rising, lambda step: 0.2 + 0.0004 * step, max_steps=1500)  # 0.4 per 1,000 steps
    assert trainer.global_step == 1500 and not rising.summary()["stopping"]["converged"]
    recording = ConvergenceStop(enabled=False, points=16, max_slope_per_1k=0.05)
    trainer = fit(recording, rising_then_flat, max_steps=1500)
    assert trainer.global_step == 1500 and 900 <= recording.summary()["stopping"]["converged_at_step"] <= 1300


def flat_then_sudden(step: int) -> float:
    """At the base's level until step 1,600, then up within 200 steps (as ControlNet-XS's seed 0 on tiny_sd)."""
    return 0.25 + 0.01 * np.sin(step * 1.7) + (0.5 * min(max(step - 1600, 0), 200) / 200)


def test_a_curve_flat_before_its_rise_has_not_converged_with_min_rise():
    """Without min_rise the rule stops a curve still flat at the base's level (before a sudden rise); with it, the run goes
    on through the rise and stops once flat again. Replaying the rule point by point on the recorded curve gives the step
    training stopped at, either way."""
    early = ConvergenceStop(enabled=True, points=10, max_slope_per_1k=0.05, min_steps=1000)
    fit(early, flat_then_sudden, max_steps=4000)
    late = ConvergenceStop(enabled=True, points=10, max_slope_per_1k=0.05, min_steps=1000, min_rise=0.1)
    trainer = fit(late, flat_then_sudden, max_steps=4000)
    early_stop = early.summary()["stopping"]["converged_at_step"]
    assert 1000 <= early_stop < 1600  # flat at the base's level, before the rise
    stopped = late.summary()["stopping"]
    assert stopped["converged"] and stopped["converged_at_step"] > 1800 and trainer.global_step == stopped["converged_at_step"]
    assert stopped["rule"]["min_rise"] == 0.1 and stopped["last_reading"]["risen"] >= 0.1
    steps = [p["step"] for p in late.fidelity_curve.curve]
    values = [p["edge_f1"] for p in late.fidelity_curve.curve]
    rule = {"points": 10, "max_slope_per_1k": 0.05, "min_steps": 1000}
    assert first_converged_step(steps, values, **rule, min_rise=0.1) == stopped["converged_at_step"]
    assert first_converged_step(steps, values, **rule) == early_stop


@pytest.mark.bad_input
@pytest.mark.parametrize("settings, key", [({"points": 2}, "eval.stopping.points"), ({"max_slope_per_1k": 0}, "eval.stopping.max_slope_per_1k"),
                                           ({"min_steps": -1}, "eval.stopping.min_steps"),
                                           ({"min_rise": -0.1}, "eval.stopping.min_rise")])
def test_impossible_stopping_settings_are_refused_naming_the_key(settings, key):
    with pytest.raises(ValueError, match=key):
        ConvergenceStop(**settings)


@pytest.mark.bad_input
def test_stopping_without_the_fidelity_curve_is_refused_before_any_data_work():
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["eval.stopping.enabled=true", "~callbacks.fidelity_curve"])
    with pytest.raises(ConfigError, match="eval.stopping.enabled=true"):
        training_callbacks(cfg)
