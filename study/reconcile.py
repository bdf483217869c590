"""Make MLflow agree with the Optuna storage, which is the record of truth.

A launcher killed between its Optuna and MLflow writes, or an MLflow server that was down while
trials ran, leaves finished trials whose MLflow run is missing, still RUNNING, or tagged with
another state. Every launch (and worker) repairs that first: it writes the missing runs from what
the Optuna trial holds (params, per-epoch metrics, final results kept as user attributes) and
closes the rest with the state Optuna recorded. Nothing is written twice: runs are found by their
trial number.

Models too (`repair_models`): an MLflow write that failed while a trial's network was being logged (a full
artifact store, a server gone) leaves a logged model FAILED, or PENDING when the process died first. The
network itself is gone with its process, so the next launch trains it again from the trial's recorded
configuration and seed (on a CPU that gives the same network: the seed fixes the initialisation and the
batch order), logs it, and tags the model with what it is.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Callable

import optuna
from mlflow.entities import LoggedModelStatus, Metric, RunTag
from optuna.trial import TrialState
from rich.console import Console

import objectives
import records
from study.specs import Plan
from study.storage import pid_alive
from study.tracking import FINAL_METRICS, RUN_STATUS, Tracker

RECONCILED_TAG = "optuna.reconciled"  # on a run written or closed after its trial, from the Optuna storage
RETRAINED_TAG = "optuna.retrained"    # on a model trained again: its logging failed, or its run was written again


def child_runs(tracker: Tracker) -> dict[int, list]:
    """The study's trial runs by trial number (a list, so a duplicate would show)."""
    return records.trial_runs(tracker.client, tracker.experiment_id, tracker.parent_run_id)


def expected_status(trial: optuna.trial.FrozenTrial) -> str:
    """The MLflow status of a finished trial's run: KILLED for one whose process was interrupted or died."""
    return RUN_STATUS["INTERRUPTED" if trial.user_attrs.get(records.INTERRUPTED) else trial.state.name]


def reconcile(study: optuna.Study, tracker: Tracker, plan: Plan) -> list[int]:
    """Write or close the MLflow run of every finished trial that MLflow does not show as Optuna does.

    Returns the numbers of the trials whose run was written or changed.
    """
    runs = child_runs(tracker)
    repaired = []
    for trial in study.get_trials(deepcopy=False, states=records.FINISHED):
        found = runs.get(trial.number, [])
        run = found[0] if found else None
        reason = trial.user_attrs.get(records.FAIL_REASON)
        if run is not None and run.info.status != "RUNNING" and run.data.tags.get("optuna.state") == trial.state.name:
            continue
        epochs = records.epoch_values(trial)
        if run is None:
            config = records.train_config(trial) or plan.config(trial.params)
            run_id, logged = tracker.start_trial(trial.number, records.run_name(trial), config, trial.params), set()
            logged_epochs = {name: set() for name in epochs}
        else:
            # A result the run logged under its old name (records.RENAMED) is not logged again under the new one.
            run_id, logged = run.info.run_id, {records.RENAMED.get(name, name) for name in run.data.metrics}
            logged_epochs = {name: {m.step for m in tracker.client.get_metric_history(run_id, name)} for name in epochs}
        # What the trial recorded and MLflow lacks: its epoch metrics and its final results.
        now, step = int(time.time() * 1000), int(trial.user_attrs.get("epochs_run", 0))
        metrics = [Metric(name, float(value), now, int(epoch)) for name, values in epochs.items() for epoch, value in sorted(values.items())
                   if int(epoch) not in logged_epochs[name]]
        attrs = records.user_attrs(trial)
        metrics += [Metric(name, float(attrs[name]), now, step) for name in FINAL_METRICS if name in attrs and name not in logged]
        tracker.client.log_batch(run_id, metrics=metrics, tags=[RunTag(RECONCILED_TAG, "written after the trial from the Optuna storage")])
        tags = [RunTag("optuna.state", trial.state.name)]
        if reason:
            tags.append(RunTag("optuna.fail_reason", reason))
        if records.DEVICE in trial.user_attrs:
            tags.append(RunTag("device", trial.user_attrs[records.DEVICE]))
        tracker.client.log_batch(run_id, tags=tags)
        tracker.client.set_terminated(run_id, status=expected_status(trial))
        repaired.append(trial.number)
    return repaired


def repair_models(study: optuna.Study, tracker: Tracker, plan: Plan, keeps_model: Callable[[optuna.trial.FrozenTrial], bool],
                  data_dir: str | None, console: Console) -> list[int]:
    """After `reconcile`: every logged model a failed write left PENDING marked FAILED (its files deleted), and every
    complete trial that `keeps_model` (the launch's --log-model) but whose model was lost given one, trained again.

    A model is lost when its logging failed (a model of the trial's run that is not READY) or its run had to be written
    after the trial (the launch lost MLflow before it got to the model); the run holds no `model_uri`. A PENDING model of
    a trial whose process still runs on this host is being written: left alone; one of another host is left to that
    host's next launch, which can tell whether its writer is alive. Returns the numbers of the trials given a model.
    """
    runs = {number: found[0] for number, found in child_runs(tracker).items()}
    number_of_run = {run.info.run_id: number for number, run in runs.items()}
    trials = {trial.number: trial for trial in study.get_trials(deepcopy=False)}
    failed_runs = set()
    # Filtered here, not by filter_string: a tracking server on PostgreSQL rejects a filter on status.
    for model in tracker.client.search_logged_models([tracker.experiment_id], max_results=1000):
        trial = trials.get(number_of_run.get(model.source_run_id, -1))
        if trial is None or model.status == LoggedModelStatus.READY:
            continue
        if model.status == LoggedModelStatus.PENDING:
            if not _writer_gone(trial):
                continue
            tracker.discard_model(model.model_id)
        failed_runs.add(model.source_run_id)
    lost = [trial for trial in trials.values() if trial.state == TrialState.COMPLETE and trial.number in runs and keeps_model(trial)
            and "model_uri" not in runs[trial.number].data.tags
            and (runs[trial.number].info.run_id in failed_runs or RECONCILED_TAG in runs[trial.number].data.tags)]
    data = objectives.load_fashion_mnist(data_dir) if lost else None
    for trial in lost:
        why = "its logging failed" if runs[trial.number].info.run_id in failed_runs else "its run was written again from the Optuna storage"
        console.print(f"trial {trial.number}: MLflow holds no network of it ({why}); training it again from its recorded "
                      "configuration and seed to log it")
        config = records.train_config(trial) or plan.config(trial.params)
        # The device it trained on may be another machine's (a Ray node's GPU): this machine's, unless it was the CPU.
        result = objectives.train(dataclasses.replace(config, device=config.device if config.device in ("auto", "cpu") else "auto"), data)
        model_uri = tracker.log_model(runs[trial.number].info.run_id, trial.number, result, data)
        tracker.client.set_logged_model_tags(model_uri.removeprefix("models:/"), {RETRAINED_TAG: (
            f"trained again from the trial's recorded configuration and seed ({why}): val_accuracy "
            f"{result.val_accuracy:.4f}, the trial's {trial.values[0]:.4f}")})
    return [trial.number for trial in lost]


def _writer_gone(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the process that ran the trial, and logs its model, is known to be gone: one of this host that no longer
    runs (or this very process, which logs nothing while a launch starts)."""
    pid = trial.user_attrs.get(records.PID)
    if trial.user_attrs.get(records.HOST) != socket.gethostname() or pid is None:
        return False
    return pid == os.getpid() or not pid_alive(pid)
