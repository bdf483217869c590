"""The MLflow mirror is keyed by the study's identity in its storage, not by its name: a replaced journal or
another storage's study of the same name gets a parent run of its own, with no trial run twice under one
parent. And a store rebuilt from the Optuna storage (the recovery path after losing MLflow) reports."""

from __future__ import annotations

import re
import shutil

from mlflow.tracking import MlflowClient

from conftest import journal, run_cli
from dashboards.record import parent_runs, trial_runs
from reliability.checks import check_consistent, record_fault, sqlite_uri


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
    record_fault("MLflow store lost, rebuilt from Optuna, then report", 1,
                 check_consistent("kill", journal(study_home), sqlite_uri(study_home), total=3))
