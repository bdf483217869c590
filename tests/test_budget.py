"""The cost model (study.budget): timed training steps, a prediction per configuration, and one forecast that the
start line, the progress display's time left and `--budget`'s plan all read."""

from __future__ import annotations

import dataclasses
import unittest.mock

import optuna
import pytest
import torch

from conftest import LENET as LENET_SPEC
from conftest import make_spec
from objectives.train import TrainConfig, time_training, train
from study.budget import Budget, CostModel, Forecast, coming_configs, describe_seconds, step_flops, time_left_field
from study.session import make_sampler
from study.specs import load_spec, resolve
from study.strategies import SAMPLERS

LENET = TrainConfig(arch="lenet", resize=28, batch_size=64, epochs=2, n_train=256, n_val=128, n_test=128, precision="fp32", device="cpu")
SMALL = dataclasses.replace(LENET, ratio=2)  # the other end of a ratio range: a smaller step


def _timing(config: TrainConfig, step: float, per_example: float, fixed: float) -> dict:
    return {"arch": config.arch, "resize": config.resize, "ratio": config.ratio, "batch_size": config.batch_size, "precision": "fp32", "threads": 1,
            "step_flops": step_flops(config), "step_seconds": step, "eval_seconds": per_example, "fixed_seconds": fixed}


MODEL = CostModel("host/cpu", 1, (_timing(LENET, 0.2, 0.001, 3.0), _timing(SMALL, 0.1, 0.0005, 1.0)))


def test_time_training_times_the_real_step(fashion):
    timing = time_training(LENET, fashion, steps=2)
    assert timing.step_seconds > 0 and timing.eval_seconds >= 0 and timing.fixed_seconds >= 0
    assert timing.precision == "fp32"  # as the config trains
    # With a worker's share of the cores: timed on that many threads, and this process's own count is left as it was.
    own, seen = torch.get_num_threads(), []
    with unittest.mock.patch("objectives.train.train", side_effect=lambda *args, **kwargs: seen.append(torch.get_num_threads()) or train(*args, **kwargs)):
        time_training(LENET, fashion, steps=2, threads=1)
    assert seen == [1] and torch.get_num_threads() == own


def test_a_prediction_is_steps_evaluations_and_setup_interpolated_between_the_timed_ends():
    # 2 epochs of 4 steps, 2 validations of 128 and one test of 128 examples, and the set-up once.
    assert MODEL.timed_seconds(LENET) == pytest.approx(3.0 + 8 * 0.2 + 3 * 128 * 0.001)
    assert MODEL.timed_seconds(SMALL) == pytest.approx(1.0 + 8 * 0.1 + 3 * 128 * 0.0005)
    # Between the ends by a step's FLOPs: a larger batch of the small network lies between them here.
    middle = dataclasses.replace(SMALL, batch_size=96)
    assert MODEL.timed_seconds(SMALL) < MODEL.timed_seconds(middle) < MODEL.timed_seconds(LENET)
    with pytest.raises(ValueError, match="no timing of vgg11"):
        MODEL.timed_seconds(dataclasses.replace(LENET, arch="vgg11", resize=32))
    with pytest.raises(ValueError, match="no timing of lenet on host/cpu with 2 threads"):  # timed with one thread only
        dataclasses.replace(MODEL, threads=2).timed_seconds(LENET)


def _finished(config: TrainConfig, wall: float, host: str = "host", device: str = "cpu", **attrs) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=0.5, user_attrs={
        "config": dataclasses.asdict(config), "host": host, "device": device, "wall_seconds": wall, "epochs_run": config.epochs, **attrs})


def test_finished_trials_on_the_machine_scale_the_model():
    timed = MODEL.timed_seconds(LENET)
    refined = MODEL.refined([_finished(LENET, 2 * timed), _finished(LENET, 10 * timed, host="other"), _finished(LENET, 5 * timed, cpu_threads=2)])
    # The other host's trial is not this machine's, nor is one that trained with other threads than the model's.
    assert (refined.scale, refined.measured) == (pytest.approx(2.0), 1)
    assert refined.seconds(LENET) == pytest.approx(2 * timed)
    assert "scaled by the 1 trial measured there" in refined.basis()
    assert MODEL.refined([]).scale == 1.0 and MODEL.basis() == "from training steps timed on host/cpu"
    # A launch whose trials train on Ray's nodes (a GPU there, a CPU here): the launcher's timings stand for them until
    # their trials, on any machine, scale the model.
    ray = dataclasses.replace(MODEL, elsewhere=True).refined([_finished(LENET, timed / 10, host="head", device="NVIDIA H100")])
    assert (ray.scale, ray.measured) == (pytest.approx(0.1), 1)
    assert ray.basis() == ("from training steps timed on host/cpu, the launcher, not on the Ray nodes that train, "
                           "scaled by the 1 trial measured on them (×0.10)")


@pytest.mark.parametrize("unit", ["flops", "seconds"])
def test_the_budget_plan_and_the_progress_line_agree_with_the_start_line(unit):
    # The repro: a --budget that holds fewer trials than asked. The start line says how many it holds and their time;
    # the progress display's time left, before any trial ran, is that same time.
    forecast = Forecast(5, (dataclasses.replace(LENET, n_train=20_000),), MODEL, 1)
    budget = Budget(2.5 * (forecast.flops if unit == "flops" else forecast.each()), unit)
    held = forecast.held(budget, [])
    assert held == 2
    line = forecast.describe(budget, [])
    assert f"holds about {held} of them, {describe_seconds(forecast.seconds(held))}" in line, line
    assert line.startswith(f"predicted time: 5 trials in about {describe_seconds(forecast.seconds())} ({describe_seconds(forecast.each())} and ")
    time_left = forecast.time_left([], 5, budget)[0]
    assert time_left([]) == time_left_field(forecast.seconds(held))
    # Without a budget, all of them.
    assert forecast.time_left([], 5)[0]([]) == time_left_field(forecast.seconds())


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_a_forecast_predicts_the_configurations_its_trials_will_train(sampler, tmp_path):
    # The repro: two trials of `zoo` drew two of its networks while the forecast was the mean over all of them (real time
    # 3.7x the prediction). A copy of the study's sampler draws what the study's own next asks draw: its queued trial first.
    if sampler == "grid":  # the grid sampler needs a grid: the shipped studies search continuous learning rates
        spec = load_spec(str(make_spec(tmp_path, "grid", LENET_SPEC, search={"lr": {"choices": [0.01, 0.02, 0.05]}, "epochs": {"low": 1, "high": 2}},
                                       enqueue=[{"lr": 0.02, "epochs": 2}])))
    else:
        spec = load_spec("zoo")
    plan = resolve(spec, "cpu")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", sampler=make_sampler({"name": sampler}, plan))
    for row in plan.enqueue:
        study.enqueue_trial(row)
    coming = coming_configs(study, plan, 5)
    assert len(study.trials) == len(plan.enqueue) == 1  # the study itself is untouched: only its queued trial
    assert coming == [plan.trial_config(study.ask()) for _ in range(5)]
    assert coming[0] == plan.config(plan.enqueue[0])


def test_the_start_line_and_the_budget_count_the_first_trials_in_order():
    # Two trials known one by one (a cheap and a dear one), more asked for: the first two count at their own prediction,
    # later ones at the mean; --budget holds the cheap one first.
    cheap, dear = dataclasses.replace(LENET, n_train=2_000), dataclasses.replace(LENET, n_train=20_000)
    forecast = Forecast(3, (cheap, dear), MODEL, 1)
    assert forecast.seconds(1) == pytest.approx(MODEL.seconds(cheap))
    assert forecast.seconds(2) == pytest.approx(MODEL.seconds(cheap) + MODEL.seconds(dear))
    assert forecast.seconds() == pytest.approx(3 * (MODEL.seconds(cheap) + MODEL.seconds(dear)) / 2)
    assert forecast.held(Budget(MODEL.seconds(cheap) * 1.5, "seconds"), []) == 1
    assert forecast.held(Budget(MODEL.seconds(cheap) + MODEL.seconds(dear) * 1.01, "seconds"), []) == 2
