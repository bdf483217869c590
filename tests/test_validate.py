"""study.validate: what a launch can run, checked against this machine before anything is written."""

import pytest

from study.session import Request, settle
from study.specs import SpecError, load_spec, resolve
from study.validate import largest_configs, validate_launch
from tests.conftest import LENET, make_spec, run_main

ZOO = {"fixed": {"batch_size": 32, "epochs": 1, "n_train": 64, "n_val": 64, "n_test": 64},
       "search": {"arch": {"choices": ["lenet", "vgg11"]}, "lr": {"low": 0.01, "high": 0.1, "log": True}, "batch_size": {"choices": [16, 64]}},
       "conditional.vgg11": {"resize": {"low": 32, "high": 96, "step": 32}, "ratio": {"choices": [4, 16]}}}


def _settings(path, **flags):
    return settle(Request(name=str(path), **({"trials": 1, "preset": "cpu"} | flags)), load_spec(str(path)))


def test_the_largest_trial_of_each_architecture_takes_the_largest_input_and_batch_and_the_smallest_divisor(tmp_path):
    zoo = dict(ZOO, **{"conditional.vgg11": {"resize": {"low": 32, "high": 96, "step": 32}, "ratio": {"low": 4, "high": 16}}})
    plan = resolve(load_spec(str(make_spec(tmp_path, "zoo", zoo))), "full")
    assert {(c.arch, c.resize, c.ratio, c.batch_size) for c in largest_configs(plan)} == {("lenet", 28, 1, 64), ("vgg11", 96, 4, 64)}


def test_the_trial_slots_devices_are_checked_and_ray_slots_are_not(tmp_path):
    settings = _settings(make_spec(tmp_path, "lenet", LENET))
    validate_launch(settings, ["auto"])
    with pytest.raises(SpecError, match="device = 'cuda:99'"):
        validate_launch(settings, ["cuda:99"])  # what --gpus gives a slot replaces the spec's device
    far = _settings(make_spec(tmp_path, "far", LENET, fixed={"device": "cuda:99"}))
    with pytest.raises(SpecError, match=r"far.toml: device = 'cuda:99'"):
        validate_launch(far, ["auto"])
    validate_launch(far, None)  # on Ray, the cluster's nodes train: this machine's devices say nothing


def test_the_sampler_chosen_by_a_flag_is_the_one_checked(tmp_path):
    path = make_spec(tmp_path, "lenet", LENET)
    validate_launch(_settings(path), ["auto"])
    with pytest.raises(SpecError, match="the grid sampler needs choices or an integer range for lr"):
        validate_launch(_settings(path, sampler="grid"), ["auto"])
    cost = make_spec(tmp_path, "cost", LENET, pruner={"name": "median", "n_warmup_steps": "x"})
    with pytest.raises(SpecError, match=r"\[pruner\] name = 'median', n_warmup_steps = 'x': these arguments fail in Optuna"):
        validate_launch(_settings(cost, objective="accuracy,cost"), ["auto"])  # also built as study.costprune's, for a multi-objective study


def test_a_sampler_that_would_leave_part_of_the_space_out_of_its_model_is_refused_before_anything_is_written(tmp_path, study_home):
    # The zoo's resize and ratio exist for vgg11 only: GP models only the parameters every trial shares and would draw
    # those two at random for the whole study (Optuna says so only in a log line after its startup trials).
    table = dict(ZOO, **{"conditional.vgg11": {"resize": {"low": 32, "high": 96, "step": 32}, "ratio": {"low": 4, "high": 16}}})
    zoo = make_spec(tmp_path, "zoo", table)
    with pytest.raises(SpecError, match=r"zoo_gp.toml: \[sampler\] name = 'gp', seed = 1: GPSampler would sample ratio, resize at random, outside its model"):
        validate_launch(_settings(make_spec(tmp_path, "zoo_gp", table, sampler={"name": "gp", "seed": 1})), ["auto"])
    for fine in (_settings(zoo), _settings(zoo, sampler="random"), _settings(make_spec(tmp_path, "lenet", LENET), sampler="gp"),
                 _settings(make_spec(tmp_path, "grouped", table, sampler={"name": "tpe", "multivariate": True, "group": True}))):
        validate_launch(fine, ["auto"])  # TPE models them one by one; random models nothing; one architecture's space
    result = run_main("launch", str(zoo), "--sampler", "gp")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "GPSampler would sample ratio, resize at random" in result.stderr
    assert not study_home.exists()
