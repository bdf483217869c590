"""`python -m study create`: the study and its MLflow parent run, made without training, validated as launch
validates; the same create again changes nothing; bad input writes nothing; workers then join and run it."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient
from reliability.checks import changed, check_consistent, fingerprint, sqlite_uri

from conftest import LENET, journal, make_spec, postgres_database, run_cli, run_main


@pytest.fixture
def pg_url():
    with postgres_database("create") as url:
        yield url


def _parent_runs(home, study: optuna.Study) -> list:
    from records import STUDY_UID, parent_runs

    client = MlflowClient(tracking_uri=sqlite_uri(home))
    experiment = client.get_experiment_by_name(study.study_name)
    return [] if experiment is None else parent_runs(client, experiment.experiment_id, study.user_attrs[STUDY_UID])


def _created(home, storage, name: str, total: int) -> optuna.Study:
    """The study exists, records its settings, holds no trial, and has one MLflow parent run."""
    study = optuna.load_study(study_name=name, storage=storage)
    assert study.user_attrs["trials"] == total and study.user_attrs["preset"] == "cpu"
    assert study.get_trials() == []
    assert len(_parent_runs(home, study)) == 1
    return study


def test_create_on_a_journal_then_again_changes_nothing(study_home, tmp_path):
    spec = make_spec(tmp_path, "created", LENET)
    result = run_main("create", str(spec), "--trials", "2", "--preset", "cpu")
    assert result.returncode == 0, result.stderr
    assert "created study created" in result.stdout
    _created(study_home, journal(study_home), "created", 2)

    before = fingerprint(study_home)
    for again in (["--trials", "2", "--preset", "cpu"], []):  # the same flags, or none: the record's
        result = run_main("create", str(spec), *again)
        assert result.returncode == 0, result.stderr
        assert "exists" in result.stdout and "nothing changed" in result.stdout
    assert changed(before, fingerprint(study_home)) == []


def test_create_with_other_settings_is_refused_and_writes_nothing(study_home, tmp_path):
    spec = make_spec(tmp_path, "created", LENET)
    assert run_main("create", str(spec), "--trials", "2", "--preset", "cpu").returncode == 0
    before = fingerprint(study_home)
    for flags, says in ((["--preset", "full"], "created with preset cpu"),  # launch's own error
                        (["--objective", "accuracy,cost"], "optimises accuracy"),
                        (["--trials", "5"], "trials 2")):
        result = run_main("create", str(spec), *flags)
        assert result.returncode == 1 and result.stderr.startswith("error: ") and says in result.stderr, (flags, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    assert changed(before, fingerprint(study_home)) == []


def test_create_of_bad_input_writes_nothing(study_home, tmp_path):
    spec = make_spec(tmp_path, "created", LENET)
    bad_lr = make_spec(tmp_path, "bad", {**LENET, "fixed": {**LENET["fixed"], "n_train": 0}})
    # Fails only when the sampler draws a trial: launch's dry run (study.validate) is what catches it.
    bad_sampler = make_spec(tmp_path, "bad_sampler", LENET, sampler={"name": "tpe", "n_startup_trials": "x"})
    watched = fingerprint(tmp_path)
    for argv in (["create", str(spec), "--trials", "0"],
                 ["create", str(spec), "--sampler", "annealing"],
                 ["create", str(spec), "--cost", "train_flops"],
                 ["create", str(tmp_path / "missing.toml")],
                 ["create", str(bad_lr)],
                 ["create", str(bad_sampler)]):
        result = run_main(*argv)
        assert result.returncode == 1 and result.stderr.startswith("error: "), (argv, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not study_home.exists()
    assert changed(watched, fingerprint(tmp_path)) == []


@pytest.mark.slow
def test_create_on_postgresql_then_a_worker_runs_it(study_home, tmp_path, pg_url):
    spec = make_spec(tmp_path, "created", LENET)
    created = run_main("create", str(spec), "--trials", "2", "--preset", "cpu", "--storage", pg_url)
    assert created.returncode == 0, created.stderr
    study = _created(study_home, pg_url, "created", 2)

    before = fingerprint(study_home, database=pg_url)
    again = run_main("create", str(spec), "--trials", "2", "--preset", "cpu", "--storage", pg_url)
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stderr
    assert changed(before, fingerprint(study_home, database=pg_url)) == []

    # A worker, as on another machine: its own process, joining with the storage alone.
    worker = run_cli("worker", str(spec), "--storage", pg_url, "--checkpoint-dir", str(tmp_path / "checkpoints"))
    assert worker.returncode == 0, worker.stderr
    # Directly on PostgreSQL, a worker says at its start how many more workers the server's connections hold.
    assert "connections in use; a worker holds 1, so" in worker.stdout and "serve-storage" in worker.stdout
    counts = check_consistent("created", pg_url, sqlite_uri(study_home), total=2)
    assert counts.trials == 2
    assert len(_parent_runs(study_home, study)) == 1  # the worker used the parent create made
