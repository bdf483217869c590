"""The trial record: what a trial carries, derived once, and one way to retry a trial."""

import dataclasses

import optuna
from optuna.trial import TrialState

from dashboards import record
from objectives import TrainConfig, TrainResult


def test_result_fields_are_the_numbers_a_train_result_holds():
    numbers = {f.name for f in dataclasses.fields(TrainResult) if f.type in ("int", "float")}
    assert set(record.RESULT_FIELDS) == numbers - {"val_accuracy"}  # val_accuracy is the trial's value
    assert {"test_accuracy", "train_seconds", "train_flops", "params", "epochs_run"} <= set(record.RESULT_FIELDS)


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
