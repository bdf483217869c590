"""A new epoch metric is one field added to EpochMetrics: tests/metric_study.py adds `grad_norm`, and it reaches every
place that shows epoch metrics: MLflow (a trial, its retry resumed from a checkpoint, a run written again by reconcile,
finalize), the trial record, export, and the report's curves and table."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys

import optuna
import pytest
from mlflow.tracking import MlflowClient

import records
from conftest import LENET, ROOT, command_env, hold_env, journal, make_spec, wait_for_holds
from study.reconcile import RECONCILED_TAG

GRAD_NORM = 0.25  # what tests/metric_study.py's grad_norm always measures


def _metric_study(*args: str, env: dict, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "metric_study.py"), *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=command_env({**env, "PYTHONPATH": str(ROOT), "GRAD_NORM": repr(GRAD_NORM)}), text=True)


@pytest.mark.slow  # two launches, a finalize, an export and a report, each in a fresh interpreter
def test_a_new_epoch_metric_reaches_mlflow_the_trial_record_export_and_the_report(study_home, tmp_path):
    spec = make_spec(tmp_path, "metric", LENET, fixed={"epochs": 2})
    env, holds, log = {"STUDY_HOME": str(study_home)}, tmp_path / "holds", tmp_path / "log.txt"
    launch = ["launch", str(spec), "--trials", "1", "--log-model", "none"]
    # Trial 0 stopped by Ctrl-C after its first epoch: interrupted, its checkpoint kept for its retry.
    with log.open("w") as out:
        held = _metric_study(*launch, env={**env, **hold_env(holds, "epoch:1")}, log=out)
        wait_for_holds(holds, 1, alive=lambda: held.poll() is None)
        held.send_signal(signal.SIGINT)
        assert held.wait(600) == 130, log.read_text()[-3000:]
    # Its MLflow run lost: the next launch writes it again from the trial record (reconcile).
    client = MlflowClient(tracking_uri=f"sqlite:///{study_home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("metric").experiment_id
    [lost] = client.search_runs([experiment], filter_string=f"tags.`{records.TRIAL_NUMBER_TAG}` = '0'")
    client.delete_run(lost.info.run_id)

    report, table = tmp_path / "report.html", tmp_path / "trials.csv"
    with log.open("w") as out:
        done = _metric_study(*launch, "--then", "finalize", "metric", "--then", "export", "metric", "-o", str(table),
                             "--then", "report", "metric", "-o", str(report), env=env, log=out)
        assert done.wait(600) == 0, log.read_text()[-3000:]

    # The trial record: every epoch of the interrupted trial and of its retry, which resumed from epoch 1.
    first, retry = optuna.load_study(study_name="metric", storage=journal(study_home)).trials
    assert retry.user_attrs[records.RESUMED_FROM_EPOCH] == 1
    assert [(e["epoch"], e["grad_norm"]) for e in first.user_attrs[records.HISTORY]] == [(1, GRAD_NORM)]
    assert [(e["epoch"], e["grad_norm"]) for e in retry.user_attrs[records.HISTORY]] == [(1, GRAD_NORM), (2, GRAD_NORM)]

    # MLflow: the run reconcile wrote again, the retry's run (the resumed epoch too) and the final run.
    def points(run) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "grad_norm"))

    runs = {run.data.tags.get(records.TRIAL_NUMBER_TAG, run.data.tags.get("study.role")): run for run in client.search_runs([experiment])}
    assert RECONCILED_TAG in runs["0"].data.tags and points(runs["0"]) == [(1, GRAD_NORM)]
    assert points(runs["1"]) == [(1, GRAD_NORM), (2, GRAD_NORM)]
    assert points(runs["final"]) == [(1, GRAD_NORM), (2, GRAD_NORM)]

    # export: the metric's last value, from MLflow; the per-epoch record is not a column.
    rows = list(csv.DictReader(table.open()))
    assert [float(row["mlflow.grad_norm"]) for row in rows] == [GRAD_NORM, GRAD_NORM] and records.HISTORY not in rows[0]
    # The report: a learning-curve panel of its own, and a column of the table of trials.
    page = report.read_text()
    assert "gradient norm (L2)" in page and "epoch %{x}: grad_norm" in page and "<th>grad_norm</th>" in page
