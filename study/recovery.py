"""Dead-trial recovery: a trial whose process died is closed as FAIL and queued once more.

One strategy per kind of storage, chosen by `recovery_for`:
- relational storage (SQLite, PostgreSQL): Optuna's heartbeats. A trial whose heartbeat is older than the
  grace period is failed, with its reason, and Optuna's stale-trial callback (storage.RetryStaleTrial) queues it again.
- journal file: no heartbeats, so trials left RUNNING by a process of this host that no longer exists.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState
from rich.console import Console

from dashboards import record
from study.reconcile import reconcile
from study.specs import Plan
from study.storage import heartbeat_enabled, pid_alive
from study.tracking import Tracker


@dataclass
class JournalRecovery:
    """Trials RUNNING under a pid of this host that no longer exists."""

    study: optuna.Study
    storage: optuna.storages.BaseStorage
    tracker: Tracker
    console: Console

    def recover(self) -> None:
        host = socket.gethostname()
        study_id = self.storage.get_study_id_from_name(self.study.study_name)
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = trial.user_attrs.get(record.PID)
            if trial.user_attrs.get(record.HOST) != host or pid is None or pid_alive(pid):
                continue
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            self.storage.set_trial_user_attr(trial_id, record.FAIL_REASON, "worker process died")
            self.storage.set_trial_user_attr(trial_id, record.INTERRUPTED, True)
            self.study.tell(trial.number, state=TrialState.FAIL)
            if run_id := trial.user_attrs.get(record.MLFLOW_RUN_ID):
                self.tracker.finish_trial(run_id, "INTERRUPTED", reason="worker process died")
            record.retry(self.study, trial)
            self.console.print(f"trial {trial.number}: its process {pid} died; marked FAIL and queued again")


@dataclass
class HeartbeatRecovery:
    """Trials whose heartbeat went stale: failed with their reason, and queued again by the storage's stale-trial callback.

    What Optuna's `fail_stale_trials` does, with the reason recorded before the trial is failed: a finished trial takes
    no more attributes, and every failed trial says why (`fail_reason`), as the journal's dead ones do.
    """

    study: optuna.Study
    storage: optuna.storages.RDBStorage
    tracker: Tracker
    console: Console
    plan: Plan
    track: Callable  # an MLflow write that may fail without ending the launch (TrialRunner.track)

    def recover(self) -> None:
        retry = self.storage.get_heartbeat_stale_trial_callback()
        # Optuna's own list of RUNNING trials whose last heartbeat is older than the grace period (a private method:
        # fail_stale_trials, the public one, fails them before anything can be recorded on them).
        for trial_id in self.storage._get_stale_trial_ids(self.storage.get_study_id_from_name(self.study.study_name)):
            trial = self.storage.get_trial(trial_id)
            try:
                self.storage.set_trial_user_attr(trial_id, record.FAIL_REASON, _stale_reason(trial))
                self.storage.set_trial_user_attr(trial_id, record.INTERRUPTED, True)
                if not self.storage.set_trial_state_values(trial_id, TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another process's recovery failed it first
            retry(self.study, self.storage.get_trial(trial_id))
        failed = retry.failed
        any_failed = bool(failed)
        while failed:
            trial = failed.pop()
            reason = trial.user_attrs[record.FAIL_REASON]
            if run_id := trial.user_attrs.get(record.MLFLOW_RUN_ID):
                self.tracker.finish_trial(run_id, "INTERRUPTED", reason=reason)
            self.console.print(f"trial {trial.number}: {reason}; marked FAIL and queued again")
        if any_failed:
            # A worker killed between creating its MLflow run and keeping the run's id on the trial leaves a run
            # only its trial number finds.
            self.track(reconcile, self.study, self.tracker, self.plan)


def _stale_reason(trial: optuna.trial.FrozenTrial) -> str:
    return f"worker stopped sending heartbeats (host {trial.user_attrs.get(record.HOST)}, pid {trial.user_attrs.get(record.PID)})"


def recovery_for(study: optuna.Study, storage: optuna.storages.BaseStorage, tracker: Tracker, console: Console, plan: Plan,
                 track: Callable) -> JournalRecovery | HeartbeatRecovery:
    if heartbeat_enabled(storage):
        return HeartbeatRecovery(study, storage, tracker, console, plan, track)
    return JournalRecovery(study, storage, tracker, console)
