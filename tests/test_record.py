"""The trial record: what a trial carries, derived once, and one way to retry a trial."""

import dataclasses
import re
import typing
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

import records
from conftest import LENET, journal, make_spec
from objectives import TrainConfig, TrainResult


def test_result_fields_are_the_numbers_a_train_result_holds():
    numbers = {f.name for f in dataclasses.fields(TrainResult) if f.type in ("int", "float")}
    assert set(records.RESULT_FIELDS) == numbers - {"val_accuracy"}  # val_accuracy is the trial's value
    assert {"test_accuracy", "train_seconds", "train_flops", "param_count", "epochs_run"} <= set(records.RESULT_FIELDS)


def test_the_mlflow_guide_names_exactly_the_epoch_metrics():
    text = (Path(__file__).resolve().parent.parent / "docs" / "mlflow.md").read_text()
    listed = re.search(r"per epoch \(`step` = epoch\): ([a-z_, ]+);", text).group(1).split(", ")
    assert sorted(listed) == sorted(records.EPOCH_METRICS)


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

    assert records.number_fields(Result) == ("accuracy", "loss", "steps", "seconds")

    @dataclasses.dataclass
    class Mixed:
        flops: int | str

    with pytest.raises(TypeError, match=r"Mixed.flops is annotated int \| str"):
        records.number_fields(Mixed)


def test_a_retry_is_queued_once_with_the_same_params_and_does_not_count_twice():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    first = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.1)})
    study.tell(first, 0.5)
    stopped = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.1)})
    frozen = study.tell(stopped, state=TrialState.FAIL)
    records.retry(study, frozen)
    queued = study.get_trials(states=(TrialState.WAITING,))
    assert [records.retry_source(t) for t in queued] == [stopped.number] and queued[0].system_attrs["fixed_params"] == frozen.params
    assert records.retried(study.get_trials()) == {stopped.number}
    assert records.count_done(study.get_trials()) == 1  # the stopped trial runs again; only its retry will count


def test_the_resolved_config_round_trips_through_the_trial():
    study = optuna.create_study()
    trial = study.ask()
    config = TrainConfig(arch="lenet", resize=28, lr=0.9, n_train=512)
    trial.set_user_attr(records.CONFIG, dataclasses.asdict(config))
    frozen = study.tell(trial, 0.5)
    assert records.train_config(frozen) == config and records.config(frozen)["resize"] == 28
    assert records.train_config(study.tell(study.ask(), 0.1)) is None


def _done(value: float, **config) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(value=value, user_attrs={records.CONFIG: {"epochs": 1, "n_train": 512, "lr": 0.05, **config}})


def test_a_study_or_an_architecture_at_chance_is_named_with_its_likely_cause():
    learned = [_done(0.81, arch="lenet", lr=0.1), _done(0.11, arch="lenet", lr=1e-6)]
    assert records.chance_warnings(learned) == []  # the study's best learned; a bad trial among good ones is not news
    (line,) = records.chance_warnings([_done(0.113, arch="lenet", lr=1e-6), _done(0.09, arch="lenet", lr=1e-7, epochs=2)], preset="cpu")
    assert line.startswith("no better than chance: the study's best val_accuracy is 0.1130 over 2 complete trials")
    assert "the budget of preset cpu (512 training images, 1 to 2 epochs)" in line and "(lr 1e-07 to 1e-06)" in line
    mixed = [_done(0.85, arch="lenet"), _done(0.10, arch="alexnet", resize=224), _done(0.19, arch="alexnet", resize=28)]
    (line,) = records.chance_warnings(mixed)
    assert line.startswith("no better than chance: architecture alexnet's best val_accuracy is 0.1900 over 2 complete trials")
    assert records.chance_warnings(mixed + [_done(0.21, arch="alexnet")]) == []
    assert records.chance_warnings([optuna.trial.create_trial(state=TrialState.FAIL)]) == []


def test_a_study_recorded_before_the_parameter_count_was_renamed_still_reads(tmp_path):
    """Trial 0 and its MLflow run were recorded when the parameter count was `params`, trial 1 as it is recorded now
    (`param_count`), its run lost: the record, the report's table and reconcile read the old name as the new one, the
    old run is not given the count twice, and export writes one `param_count` column for both."""
    from dashboards.report import trials_frame
    from study.export import trials_table, write_table
    from study.reconcile import reconcile
    from study.specs import load_spec, resolve
    from study.tracking import Tracker

    config = TrainConfig(arch="lenet", lr=0.1, epochs=1, n_train=512)
    study = optuna.create_study(study_name="renamed", storage=journal(tmp_path))
    study.set_user_attr(records.STUDY_UID, "renamed-uid")
    for name in ("params", "param_count"):
        attrs = {records.CONFIG: dataclasses.asdict(config), "epochs_run": 1, "test_accuracy": 0.79, name: 61706}
        study.add_trial(optuna.trial.create_trial(value=0.8, params={"lr": 0.1}, distributions={"lr": optuna.distributions.FloatDistribution(0.01, 1.0, log=True)},
                                                  user_attrs=attrs))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker("renamed", uri, artifact_root=tmp_path / "artifacts", study_uid="renamed-uid")
    old_run = tracker.start_trial(0, "trial-0", config, {"lr": 0.1})
    tracker.client.log_metric(old_run, "params", 61706, step=1)  # then its launch was stopped: the run is still RUNNING

    trials = study.get_trials()
    assert [records.user_attrs(t)["param_count"] for t in trials] == [61706, 61706]
    assert trials_frame([study])["param_count"].tolist() == [61706, 61706]

    plan = resolve(load_spec(str(make_spec(tmp_path, "renamed", LENET))), "cpu")
    assert reconcile(study, tracker, plan) == [0, 1]
    runs = {number: run for number, (run,) in records.trial_runs(tracker.client, tracker.experiment_id, tracker.parent_run_id).items()}
    assert runs[0].data.metrics["params"] == 61706 and "param_count" not in runs[0].data.metrics
    assert runs[1].data.metrics["param_count"] == 61706 and "params" not in runs[1].data.metrics

    frame = trials_table(study, uri)
    assert frame["param_count"].tolist() == [61706, 61706]
    assert not {"params", "mlflow.params", "mlflow.param_count"} & set(frame.columns)
    write_table(frame, tmp_path / "trials.csv")
    assert pd.read_csv(tmp_path / "trials.csv")["param_count"].tolist() == [61706, 61706]
