"""Make MLflow agree with the Optuna storage, which is the record of truth.

A launcher killed between its Optuna and MLflow writes, or an MLflow server that was down while
trials ran, leaves finished trials whose MLflow run is missing, still RUNNING, or tagged with
another state. Every launch (and worker) repairs that first: it writes the missing runs from what
the Optuna trial holds (params, per-epoch val_accuracy, final results kept as user attributes) and
closes the rest with the state Optuna recorded. Nothing is written twice: runs are found by their
trial number.
"""

from __future__ import annotations

import time

import optuna
from mlflow.entities import Metric, RunTag

from dashboards import record
from study.specs import Plan
from study.tracking import FINAL_METRICS, RUN_STATUS, Tracker


def child_runs(tracker: Tracker) -> dict[int, list]:
    """The study's trial runs by trial number (a list, so a duplicate would show)."""
    return record.trial_runs(tracker.client, tracker.experiment_id, tracker.parent_run_id)


def expected_status(trial: optuna.trial.FrozenTrial) -> str:
    """The MLflow status of a finished trial's run: KILLED for one whose process was interrupted or died."""
    return RUN_STATUS["INTERRUPTED" if trial.user_attrs.get(record.INTERRUPTED) else trial.state.name]


def reconcile(study: optuna.Study, tracker: Tracker, plan: Plan) -> list[int]:
    """Write or close the MLflow run of every finished trial that MLflow does not show as Optuna does.

    Returns the numbers of the trials whose run was written or changed.
    """
    runs = child_runs(tracker)
    repaired = []
    for trial in study.get_trials(deepcopy=False, states=record.FINISHED):
        found = runs.get(trial.number, [])
        run = found[0] if found else None
        reason = trial.user_attrs.get(record.FAIL_REASON)
        if run is not None and run.info.status != "RUNNING" and run.data.tags.get("optuna.state") == trial.state.name:
            continue
        if run is None:
            config = record.train_config(trial) or plan.config(trial.params)
            run_id, logged_epochs, logged = tracker.start_trial(trial.number, config, trial.params), set(), {}
        else:
            run_id, logged = run.info.run_id, run.data.metrics
            logged_epochs = {m.step for m in tracker.client.get_metric_history(run_id, "val_accuracy")}
        # What the trial recorded and MLflow lacks: val_accuracy per epoch (its intermediate values) and its final results.
        now, step = int(time.time() * 1000), int(trial.user_attrs.get("epochs_run", 0))
        metrics = [Metric("val_accuracy", float(value), now, int(epoch)) for epoch, value in sorted(trial.intermediate_values.items())
                   if int(epoch) not in logged_epochs]
        metrics += [Metric(name, float(trial.user_attrs[name]), now, step) for name in FINAL_METRICS if name in trial.user_attrs and name not in logged]
        tracker.client.log_batch(run_id, metrics=metrics, tags=[RunTag("optuna.reconciled", "written after the trial from the Optuna storage")])
        tags = [RunTag("optuna.state", trial.state.name)]
        if reason:
            tags.append(RunTag("optuna.fail_reason", reason))
        if record.DEVICE in trial.user_attrs:
            tags.append(RunTag("device", trial.user_attrs[record.DEVICE]))
        tracker.client.log_batch(run_id, tags=tags)
        tracker.client.set_terminated(run_id, status=expected_status(trial))
        repaired.append(trial.number)
    return repaired
