"""The trial record: what a trial carries, derived once, and one way to retry a trial."""

import dataclasses
import re
import typing
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dashboards import record
from objectives import TrainConfig, TrainResult


def test_result_fields_are_the_numbers_a_train_result_holds():
    numbers = {f.name for f in dataclasses.fields(TrainResult) if f.type in ("int", "float")}
    assert set(record.RESULT_FIELDS) == numbers - {"val_accuracy"}  # val_accuracy is the trial's value
    assert {"test_accuracy", "train_seconds", "train_flops", "params", "epochs_run"} <= set(record.RESULT_FIELDS)


def test_the_mlflow_guide_names_exactly_the_epoch_metrics():
    text = (Path(__file__).resolve().parent.parent / "docs" / "mlflow.md").read_text()
    listed = re.search(r"per epoch \(`step` = epoch\): ([a-z_, ]+);", text).group(1).split(", ")
    assert sorted(listed) == sorted(record.EPOCH_METRICS)


def test_every_number_field_is_kept_however_its_annotation_is_spelled():
    @dataclasses.dataclass
    class Result:
        accuracy: float
        loss: float | None           # a number not always measured is still a number
        steps: typing.Optional[int]  # noqa: UP045 -- the older spelling of the same annotation
        seconds: "float"
        stopped: bool
        device: str
        history: list[float]

    assert record.number_fields(Result) == ("accuracy", "loss", "steps", "seconds")

    @dataclasses.dataclass
    class Mixed:
        flops: int | str

    with pytest.raises(TypeError, match=r"Mixed.flops is annotated int \| str"):
        record.number_fields(Mixed)


def test_a_retry_is_queued_once_with_the_same_params_and_does_not_count_twice():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    first = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.1)})
    study.tell(first, 0.5)
    stopped = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.1)})
    frozen = study.tell(stopped, state=TrialState.FAIL)
    record.retry(study, frozen)
    queued = study.get_trials(states=(TrialState.WAITING,))
    assert [record.retry_source(t) for t in queued] == [stopped.number] and queued[0].system_attrs["fixed_params"] == frozen.params
    assert record.retried(study.get_trials()) == {stopped.number}
    assert record.count_done(study.get_trials()) == 1  # the stopped trial runs again; only its retry will count


def test_the_resolved_config_round_trips_through_the_trial():
    study = optuna.create_study()
    trial = study.ask()
    config = TrainConfig(arch="lenet", resize=28, lr=0.9, n_train=512)
    trial.set_user_attr(record.CONFIG, dataclasses.asdict(config))
    frozen = study.tell(trial, 0.5)
    assert record.train_config(frozen) == config and record.config(frozen)["resize"] == 28
    assert record.train_config(study.tell(study.ask(), 0.1)) is None


def _done(value: float, **config) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(value=value, user_attrs={record.CONFIG: {"epochs": 1, "n_train": 512, "lr": 0.05, **config}})


def test_a_study_or_an_architecture_at_chance_is_named_with_its_likely_cause():
    learned = [_done(0.81, arch="lenet", lr=0.1), _done(0.11, arch="lenet", lr=1e-6)]
    assert record.chance_warnings(learned) == []  # the study's best learned; a bad trial among good ones is not news
    (line,) = record.chance_warnings([_done(0.113, arch="lenet", lr=1e-6), _done(0.09, arch="lenet", lr=1e-7, epochs=2)], preset="cpu")
    assert line.startswith("no better than chance: the study's best val_accuracy is 0.1130 over 2 complete trials")
    assert "the budget of preset cpu (512 training images, 1 to 2 epochs)" in line and "(lr 1e-07 to 1e-06)" in line
    mixed = [_done(0.85, arch="lenet"), _done(0.10, arch="alexnet", resize=224), _done(0.19, arch="alexnet", resize=28)]
    (line,) = record.chance_warnings(mixed)
    assert line.startswith("no better than chance: architecture alexnet's best val_accuracy is 0.1900 over 2 complete trials")
    assert record.chance_warnings(mixed + [_done(0.21, arch="alexnet")]) == []
    assert record.chance_warnings([optuna.trial.create_trial(state=TrialState.FAIL)]) == []
