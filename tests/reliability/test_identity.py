"""The MLflow mirror is keyed by the study's identity in its storage, not by its name: a replaced journal or
another storage's study of the same name gets a parent run of its own, with no trial run twice under one
parent. And a store rebuilt from the Optuna storage (the recovery path after losing MLflow) reports, exports and
registers its live runs."""

from __future__ import annotations

import re
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import LENET, journal, make_spec, postgres_database, run_cli
from records import parent_runs, trial_runs
from reliability.checks import check_consistent, record_fault, sqlite_uri
from study.storage import APPLICATION_NAME, WAITING, open_storage, setup_lock


def test_a_study_that_replaced_a_deleted_journal_gets_its_own_parent(study_home, lenet_spec):
    env = {"STUDY_HOME": str(study_home)}
    assert run_cli("launch", str(lenet_spec), "--trials", "2", "--log-model", "none", env=env).returncode == 0
    (study_home / "optuna.journal").unlink()
    second = run_cli("launch", str(lenet_spec), "--trials", "2", "--log-model", "none", env=env)
    assert second.returncode == 0, second.stderr
    assert "also holds 1 other studies named kill" in second.stdout
    client = MlflowClient(tracking_uri=sqlite_uri(study_home))
    experiment = client.get_experiment_by_name("kill").experiment_id
    parents = client.search_runs([experiment], filter_string="tags.`study.role` = 'parent'")
    assert len(parents) == 2
    for parent in parents:
        runs = trial_runs(client, experiment, parent.info.run_id)
        assert sorted(runs) == [0, 1] and all(len(found) == 1 for found in runs.values())
    record_fault("journal deleted, same study name launched again", 1,
                 check_consistent("kill", journal(study_home), sqlite_uri(study_home), total=2))


def test_report_after_the_mlflow_store_is_rebuilt_from_the_optuna_storage(study_home, lenet_spec):
    env = {"STUDY_HOME": str(study_home)}
    assert run_cli("launch", str(lenet_spec), "--trials", "2", "--log-model", "none", env=env).returncode == 0
    (study_home / "mlflow.db").unlink()
    shutil.rmtree(study_home / "mlartifacts", ignore_errors=True)
    again = run_cli("launch", str(lenet_spec), "--trials", "3", "--log-model", "none", env=env)
    assert again.returncode == 0, again.stderr
    assert "wrote the missing records of trials 0, 1" in again.stdout
    report = study_home / "reports" / "again.html"
    done = run_cli("report", "kill", "-o", str(report), env=env)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(tracking_uri=sqlite_uri(study_home))
    experiment = client.get_experiment_by_name("kill").experiment_id
    (parent,) = parent_runs(client, experiment, None) or client.search_runs([experiment], filter_string="tags.`study.role` = 'parent'")
    linked = set(re.findall(rf"#/experiments/{experiment}/runs/([0-9a-f]{{32}})", report.read_text()))
    held = {found[0].info.run_id for found in trial_runs(client, experiment, parent.info.run_id).values()}
    assert linked == held and len(held) == 3
    # Export links the same live runs, not the ids the trials recorded before the store was lost.
    exported = study_home / "trials.csv"
    done = run_cli("export", "kill", "-o", str(exported), env=env)
    assert done.returncode == 0, done.stderr
    frame = pd.read_csv(exported)
    assert set(frame["mlflow_run_id"]) == held and frame["mlflow.status"].tolist() == ["FINISHED"] * 3
    recorded = {t.user_attrs["mlflow_run_id"] for t in optuna.load_study(study_name="kill", storage=journal(study_home)).trials}
    assert len(recorded - held) == 2  # trials 0 and 1 recorded runs the lost store held
    record_fault("MLflow store lost, rebuilt from Optuna, then report", 1,
                 check_consistent("kill", journal(study_home), sqlite_uri(study_home), total=3))


# The first two trials learn (LeNet-BN); the third, lr 1e-9, does not: the best trial is one the lost store held.
REBUILT = {**LENET, "fixed": {**LENET["fixed"], "arch": "lenet_bn"}, "search": {"lr": {"low": 1e-9, "high": 0.2, "log": True}},
           "enqueue": [{"lr": 0.2}, {"lr": 0.1}, {"lr": 1e-9}]}


def test_register_after_the_mlflow_store_is_rebuilt_takes_the_live_run(study_home, tmp_path):
    """--register and the parent's best-trial link after a rebuilt store: the best trial's run as MLflow holds it now
    (written again, its model trained again), not the run id the trial recorded, which the lost store held."""
    spec = make_spec(tmp_path, "rebuilt", REBUILT)
    env = {"STUDY_HOME": str(study_home)}
    assert run_cli("launch", str(spec), "--trials", "2", env=env).returncode == 0
    (study_home / "mlflow.db").unlink()
    shutil.rmtree(study_home / "mlartifacts")
    again = run_cli("launch", str(spec), "--trials", "3", "--register", "rebuilt-best", env=env)
    assert again.returncode == 0, again.stderr
    assert "its run was written again from the Optuna storage" in again.stdout and "registered model: rebuilt-best version 1" in again.stdout
    study = optuna.load_study(study_name="rebuilt", storage=journal(study_home))
    best = max(study.best_trials, key=lambda t: t.values[0])
    assert best.number in (0, 1), [t.values for t in study.trials]  # the premise: the best trial ran before the store was lost
    client = MlflowClient(tracking_uri=sqlite_uri(study_home))
    experiment = client.get_experiment_by_name("rebuilt").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.`study.role` = 'parent'")
    live = {number: found[0].info.run_id for number, found in trial_runs(client, experiment, parent.info.run_id).items()}
    assert live[best.number] != best.user_attrs["mlflow_run_id"]
    (version,) = client.search_model_versions("name = 'rebuilt-best'")
    assert version.run_id == live[best.number] and client.get_run(version.run_id).data.tags["model_uri"] == version.source
    assert parent.data.tags["best_trial"] == str(best.number) and parent.data.tags["best_trial_run_id"] == live[best.number]
    record_fault("MLflow store lost, rebuilt from Optuna, then --register", 1,
                 check_consistent("rebuilt", journal(study_home), sqlite_uri(study_home), total=3))


def _lock_waiters(directory: Path, database: str | None) -> int:
    """Processes blocked on the set-up lock: flock requests on `directory` that /proc/locks lists as blocked
    ('->'), or connections to `database` whose application name says they wait for an advisory lock."""
    if database is None:
        inode = str(directory.stat().st_ino)
        lines = Path("/proc/locks").read_text().splitlines()
        return sum(1 for line in lines if "->" in line and "FLOCK" in line and line.split()[-3].rsplit(":", 1)[-1] == inode)
    import psycopg

    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=database, autocommit=True) as connection:
        return connection.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s",
                                  (APPLICATION_NAME + WAITING,)).fetchone()[0]


@pytest.mark.parametrize("backend", ["journal", "postgresql"])
def test_first_launches_let_go_at_once_open_one_study_and_one_parent(forks, study_home, lenet_spec, tmp_path, backend):
    """Two first launches held at the study's set-up lock and let go at the same moment: one study identity, one
    parent run, every trial under it."""
    study_home.mkdir(parents=True, exist_ok=True)
    env = {"STUDY_HOME": str(study_home)}
    with postgres_database("identity") if backend == "postgresql" else nullcontext() as url:
        storage = open_storage(url) if url else journal(study_home)  # the launches' own kind: one connection, locks on it
        argv = ["launch", str(lenet_spec), "--trials", "2", "--log-model", "none", *(["--storage", url] if url else [])]
        with setup_lock(url or str(study_home / "optuna.journal"), storage, "kill"):
            racers = [forks.start(argv, tmp_path, env) for _ in range(2)]
            while _lock_waiters(study_home, url and url.rsplit("/", 1)[1]) < 2:  # both wait at the lock: let go now
                assert all(racer.alive() for racer in racers), [racer.output()[-3000:] for racer in racers]
                time.sleep(0.05)
        codes = [racer.wait() for racer in racers]
        assert codes == [0, 0], [racer.output()[-3000:] for racer in racers]
        client = MlflowClient(tracking_uri=sqlite_uri(study_home))
        experiment = client.get_experiment_by_name("kill").experiment_id
        assert len(client.search_runs([experiment], filter_string="tags.`study.role` = 'parent'")) == 1
        record_fault(f"2 first launches let go at once ({backend})", 1, check_consistent("kill", storage, sqlite_uri(study_home), total=2))
        if url:
            storage.engine.dispose()
