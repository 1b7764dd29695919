"""The benchmark scripts at their smallest settings: they still run and write what the README reads (no timing is
asserted). benchmarks/reliability.py runs, at its smallest, in tests/test_train.py."""
import json
import sys

import pytest
import torch

import architecture_cost
import default_profile
import default_run
import locked_cache
import one_step_equivalence
import rounds
import scaling
import sd15_shaped
import speed_options
import step_cost
import vs_diffusers
import vs_pipeline_sampling
import vs_plain_loop
from conftest import SHARED_DATA

needs_diffusers_script = pytest.mark.skipif(
    not vs_diffusers.ANCHOR.is_file(),
    reason=f"diffusers' train_controlnet.py is not at {vs_diffusers.ANCHOR} (set CONTROLNET_LAB_DIFFUSERS_SCRIPT to a copy)")


def test_the_plain_loop_benchmark_writes_its_ratio(tmp_path, monkeypatch):
    out = tmp_path / "vs_plain_loop.json"
    monkeypatch.setattr(sys, "argv", ["vs_plain_loop.py", "--steps", "4", "--rounds", "2", "--batch", "4", "--warmup", "1", "--out", str(out)])
    vs_plain_loop.main()
    report = json.loads(out.read_text())
    assert report["ratio"] > 0 and len(report["ratio_per_round"]) == 2 and [r["order"] for r in report["rounds"]] == [
        ["plain_loop", "lightning"], ["lightning", "plain_loop"]]
    assert "fidelity_curve" not in report["settings"]["callbacks"] and "checkpoint" in report["settings"]["callbacks"]


def test_the_locked_cache_benchmark_sets_cached_beside_computed(tmp_path, monkeypatch):
    out = tmp_path / "locked_cache.json"
    monkeypatch.setattr(sys, "argv", ["locked_cache.py", "--steps", "3", "--warmup", "1", "--rounds", "1", "--cases", "tiny_sd", "--out", str(out)])
    locked_cache.main()
    case = json.loads(out.read_text())["cases"]["tiny_sd"]
    assert case["speedup_cached_over_computed"] > 0 and case["rounds"][0]["order"] == ["cached", "computed"]


@pytest.mark.slow
@needs_diffusers_script
def test_the_diffusers_script_benchmark_runs_both_on_the_same_work(tmp_path, monkeypatch):
    """Needs the bench extra (pip install -e '.[bench]': accelerate, tensorboard), which diffusers' script imports."""
    pytest.importorskip("accelerate", reason="diffusers' training script needs the bench extra: pip install -e '.[bench]'")
    pytest.importorskip("tensorboard", reason="diffusers' training script logs to TensorBoard: pip install -e '.[bench]'")
    out = tmp_path / "vs_diffusers.json"
    monkeypatch.setattr(sys, "argv", ["vs_diffusers.py", "--steps", "20", "--window", "10", "--short-steps", "10", "--rounds", "1", "--batch", "4",
                                      "--samples", "64", "--no-compile", "--out", str(out)])
    vs_diffusers.main()
    report = json.loads(out.read_text())
    assert set(report["ratios"]) == {"harness", "harness_no_cache"} and report["rounds"][0]["order"] == list(vs_diffusers.SETUPS[:1] + vs_diffusers.SETUPS[2:])
    assert report["ratio"] > 0 and set(report["end_to_end_ratio"]) == {"10", "20"} and report["method"]["is_result"] is False
    assert all(report["rounds"][0][setup]["samples_per_s"] > 0 and report["rounds"][0][setup]["wall_10_s"] > 0
               for setup in report["rounds"][0]["order"])


def test_rounds_rotate_the_order_and_take_ratios_within_a_round():
    assert [rounds.rotated("abc", i) for i in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]
    figures = iter([10.0, 5.0, 30.0, 10.0, 8.0, 8.0])  # round 0: a 10, b 5; round 1 (b first): b 30, a 10; round 2: a 8, b 8
    measured = rounds.run_rounds(["a", "b"], 3, lambda setup, i: {"rate": next(figures)})
    assert [r["order"] for r in measured] == [["a", "b"], ["b", "a"], ["a", "b"]]
    ratio = rounds.within_round_ratio(measured, "a", "b", "rate")
    assert ratio["per_round"] == [2.0, 0.3333, 1.0] and ratio["median"] == 1.0   # the ratio of medians would be 10 / 8
    low, high = ratio["ci95"]
    assert low <= 1.0 <= high and low >= 0.3333 and high <= 2.0  # within the rounds' ratios
    assert rounds.method(3)["is_result"] is False and rounds.method(rounds.MIN_ROUNDS)["is_result"] is True


@pytest.mark.slow
@needs_diffusers_script
def test_the_harness_takes_the_same_step_as_diffusers_script(tmp_path, monkeypatch):
    """The unmodified script and the harness's default configuration, one step each on the same batch and draws, from a
    ControlNet whose joins are not zero (so that every part of the copy gets a gradient)."""
    out = tmp_path / "one_step_equivalence.json"
    monkeypatch.setattr(sys, "argv", ["one_step_equivalence.py", "--batch", "4", "--samples", "32", "--out", str(out)])
    one_step_equivalence.main()
    report = json.loads(out.read_text())
    assert report["equivalent"] and report["loss_relative_difference"] <= 1e-4
    assert report["nonzero_gradients"] >= 0.9 * report["parameters"] and report["batch_prompts_emptied"] >= 0


def test_the_step_comparison_tells_a_different_gradient_apart():
    grads = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}
    same = {"loss": 1.0, "grads": grads}
    assert one_step_equivalence.compare(same, same, 1e-4)["equivalent"]
    nudged = {"loss": 1.0, "grads": {**grads, "b": torch.tensor([0.5001])}}
    assert not one_step_equivalence.compare(nudged, same, 1e-4)["equivalent"]
    assert not one_step_equivalence.compare({"loss": 1.001, "grads": grads}, same, 1e-4)["equivalent"]


def test_the_sd15_shaped_base_has_stable_diffusion_15s_shapes():
    """UNet and VAE as SD 1.5's (parameter counts of stable-diffusion-v1-5); the text encoder as CLIP ViT-L/14's but for
    its token table (123,060,480 parameters with 49,408 tokens of 768)."""
    with torch.device("meta"):
        pipeline = sd15_shaped.sd15_pipeline(512, ["red circle with blue background"])

    def count(model):
        return sum(p.numel() for p in model.parameters())

    assert count(pipeline.unet) == 859_520_964 and count(pipeline.vae) == 83_653_863
    assert count(pipeline.text_encoder) - pipeline.text_encoder.get_input_embeddings().weight.numel() == 123_060_480 - 49_408 * 768
    assert pipeline.vae_scale_factor == sd15_shaped.VAE_FACTOR and pipeline.unet.config.sample_size == 64


@pytest.mark.slow
def test_the_step_cost_benchmark_splits_the_controlnet_step(tmp_path, monkeypatch):
    """In bf16 mixed precision, as the GPU check runs it (benchmarks/gpu_check.sh)."""
    out = tmp_path / "step_cost.json"
    monkeypatch.setattr(sys, "argv", ["step_cost.py", "--bases", "tiny", "--batch", "2", "--repeats", "1", "--precision", "bf16",
                                      "--out", str(out)])
    step_cost.main()
    tiny = json.loads(out.read_text())["bases"]["tiny"]
    assert tiny["finetune"]["unet_params_m"] == tiny["controlnet"]["unet_params_m"] and tiny["controlnet"]["batch"] == 2
    assert tiny["controlnet"]["controlnet_params_m"] < tiny["controlnet"]["unet_params_m"]
    parts = tiny["controlnet_step_ms"]
    assert parts["hint_encoder"] > 0 and parts["locked_unet_forward"] > 0 and parts["backward"] > 0
    assert tiny["time_ratio"] > 0 and tiny["memory_ratio"] > 0


@pytest.mark.slow
def test_the_architecture_cost_benchmark_sets_each_block_beside_zero(tmp_path, monkeypatch):
    out = tmp_path / "cost.json"
    monkeypatch.setattr(sys, "argv", ["architecture_cost.py", "--blocks", "zero", "t2i_adapter", "--rounds", "1", "--steps", "1",
                                      "--generations", "1", "--out", str(out), "data.batch_size=2", "model.sampling.num_inference_steps=2"])
    architecture_cost.main()
    report = json.loads(out.read_text())
    zero, adapter = report["blocks"]["zero"], report["blocks"]["t2i_adapter"]
    assert report["batch"] == 2 and zero["ms_per_step"] > 0 and zero["s_per_generated_batch"] > 0
    assert adapter["trainable_params"] < zero["trainable_params"]
    assert adapter["trainable_params_ratio_to_zero"] == round(adapter["trainable_params"] / zero["trainable_params"], 3)


@pytest.mark.slow
def test_the_scaling_benchmark_writes_its_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["scaling.py", "--resolutions", "16", "--batches", "2", "--repeats", "1", "--out", str(tmp_path)])
    scaling.main()
    (point,) = json.loads((tmp_path / "scaling.json").read_text())["points"]
    assert (point["resolution"], point["batch"]) == (16, 2) and point["samples_per_s"] > 0
    assert "| 16 | 2 |" in (tmp_path / "scaling.md").read_text() and (tmp_path / "scaling.png").stat().st_size > 0


def test_the_sampling_benchmark_gives_the_pipelines_own_images(tmp_path, monkeypatch):
    out = tmp_path / "vs_pipeline_sampling.json"
    monkeypatch.setattr(sys, "argv", ["vs_pipeline_sampling.py", "--images", "4", "--batch", "2", "--steps", "2", "--rounds", "1", "--out", str(out)])
    vs_pipeline_sampling.main()
    report = json.loads(out.read_text())
    assert report["max_pixel_difference"] <= 1 and report["ratio"] > 0


def test_the_speed_options_benchmark_times_every_option_and_the_loader(tmp_path, monkeypatch):
    out = tmp_path / "speed_options.json"
    monkeypatch.setattr(sys, "argv", ["speed_options.py", "--rounds", "1", "--repeats", "1", "--batch", "2", "--out", str(out)])
    speed_options.main()
    report = json.loads(out.read_text())
    assert set(report["ms_per_step"]) == {"eager_fp32", "foreach_adamw", "fused_adamw", "one_thread", "channels_last", "bf16_autocast"}
    assert report["speedup_vs_eager_fp32"]["eager_fp32"] == 1.0 and report["data_loading"]["without_targets_ms_per_batch"] > 0
    optimizer = report["optimizer_alone"]
    assert optimizer["tensors"] > 100 and set(optimizer["ms_per_update"]) == {"loop", "foreach", "fused"}
    assert optimizer["max_abs_difference_from_loop_after_10"]["loop"] == 0 and optimizer["max_abs_difference_from_loop_after_10"]["fused"] < 1e-6


def test_the_profile_gives_each_sample_to_its_innermost_phase(tmp_path):
    """py-spy's raw format: the fidelity curve measured inside the training loop is the curve's, not training's."""
    raw = tmp_path / "profile.txt"
    loop, curve = "fit (lightning/pytorch/loops/fit_loop.py:1)", "_measure (controlnet_lab/callbacks.py:9)"
    raw.write_text(f"main (src/train.py:1);{loop};backward (torch/autograd.py:3) 30\n"
                   f"main (src/train.py:1);{loop};{curve};conv (torch/nn/conv.py:2) 10\n"
                   f"main (src/train.py:1);build_once (controlnet_lab/bases/pretraining.py:5);{loop};backward (torch/autograd.py:3) 40\n")
    phases = {row["phase"]: row for row in default_profile.split_by_phase(raw, rate=10)}
    assert {name: row["seconds"] for name, row in phases.items()} == {"base pretraining": 4.0, "ControlNet training": 3.0, "fidelity curve": 1.0}
    assert phases["fidelity curve"]["top_functions"] == {"conv": 1.0} and phases["base pretraining"]["share"] == 0.5


@pytest.mark.slow
def test_the_default_profile_runs_py_spy_on_a_smoke_run(tmp_path, monkeypatch):
    """Needs py-spy (the bench extra) and permission to read another process's memory."""
    if default_profile.py_spy() is None:
        pytest.skip("py-spy is in the bench extra: pip install -e '.[bench]'")
    out = tmp_path / "profile.json"
    monkeypatch.setattr(sys, "argv", ["default_profile.py", "--out", str(out), "experiment=smoke", "eval.fid_domain.enabled=false",
                                      f"data.cache_dir={SHARED_DATA[0]}"])
    default_profile.main()
    phases = {row["phase"] for row in json.loads(out.read_text())["phases"]}
    assert {"base pretraining", "ControlNet training", "fidelity curve"} <= phases


@pytest.mark.slow
def test_the_default_run_benchmark_measures_a_before_after_pair(tmp_path, monkeypatch):
    """--after's overrides reach only the after runs (here 3 steps instead of the smoke's 6)."""
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["default_run.py", "--cache", str(tmp_path / "cache"), "--logs", str(tmp_path / "outputs"), "--out", str(out),
                                      "--after", "trainer.max_steps=3", "--", "experiment=smoke", "eval.fid_domain.enabled=false",
                                      f"data.cache_dir={SHARED_DATA[0]}", "data.generator.count=2000"])
    default_run.main()
    record = json.loads((out / "default_run.json").read_text())
    assert {name: run["global_step"] for name, run in record["runs"].items()} == {"cold": 6, "warm": 6, "after": 3, "after_repeat": 3}
    assert set(record["speedup_over_warm"]) == {"after", "after_repeat"} and record["after"] == ["trainer.max_steps=3"]
    assert (out / "results.json").exists() and (out / "fidelity_curve.png").exists()
