"""Dead-trial recovery: a trial whose process died is closed as FAIL and queued once more.

One strategy per kind of storage (its `recovery` in study.storage.STORAGE_KINDS: open_storage gives heartbeats only to the
kinds that keep them), chosen by `recovery_for`:
- relational storage (SQLite, PostgreSQL): Optuna's heartbeats. A trial whose heartbeat is older than the
  grace period is failed, with its reason, and Optuna's stale-trial callback (storage.RetryStaleTrial) queues it again.
- every other storage (a journal file, the gRPC proxy): a lease, the trial's user attribute `lease_until`, which the
  process running the trial renews every heartbeat interval (study.launch.Scheduler._beat) to LEASE_BEATS intervals
  ahead. Any process, on any host, fails a trial whose lease ran out (hosts' clocks must agree to well within it);
  on the host that ran it, a trial whose pid no longer exists is failed at once.

Either way a dead worker's trial is failed and queued again within 3 heartbeat intervals of its last beat, plus the
time until another worker next looks (before each trial it asks for, and every second while it waits for others).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState
from rich.console import Console

import records
from study.reconcile import reconcile
from study.specs import Plan
from study.storage import heartbeat_enabled, pid_alive
from study.tracking import Tracker

LEASE_BEATS = 3  # heartbeat intervals a lease runs past its renewal: the grace period relational storage gives heartbeats


@dataclass
class LeaseRecovery:
    """Trials RUNNING whose process is gone: its lease ran out (seen from any host), or it ran on this host under a
    pid that no longer exists (seen at once, without waiting for the lease)."""

    study: optuna.Study
    storage: optuna.storages.BaseStorage
    tracker: Tracker
    console: Console

    def recover(self) -> None:
        host, now = socket.gethostname(), time.time()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            reason = death(trial, host, now)
            if reason is None:
                continue
            try:
                self.storage.set_trial_user_attr(trial._trial_id, records.FAIL_REASON, reason)
                self.storage.set_trial_user_attr(trial._trial_id, records.INTERRUPTED, True)
                self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another process's recovery failed it first, and queued its retry
            if run_id := trial.user_attrs.get(records.MLFLOW_RUN_ID):
                self.tracker.finish_trial(run_id, "INTERRUPTED", reason=reason)
            records.retry(self.study, trial)
            self.console.print(f"trial {trial.number}: {reason}; marked FAIL and queued again")


def lease_until(interval: float) -> float:
    """A lease renewed now: LEASE_BEATS heartbeat intervals from now, by the wall clock every host reads."""
    return time.time() + LEASE_BEATS * interval


def death(trial: optuna.trial.FrozenTrial, host: str, now: float) -> str | None:
    """Why a RUNNING trial's process is dead, or None while it may live. A pid means something only on its own host
    (another host's pid may be any process here); a lease, wherever it was written."""
    pid = trial.user_attrs.get(records.PID)
    if trial.user_attrs.get(records.HOST) == host and pid is not None and not pid_alive(pid):
        return "worker process died"
    lease = trial.user_attrs.get(records.LEASE)
    if lease is not None and lease < now:
        return f"worker stopped renewing its lease (host {trial.user_attrs.get(records.HOST)}, pid {pid})"
    return None


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
                self.storage.set_trial_user_attr(trial_id, records.FAIL_REASON, _stale_reason(trial))
                self.storage.set_trial_user_attr(trial_id, records.INTERRUPTED, True)
                if not self.storage.set_trial_state_values(trial_id, TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another process's recovery failed it first
            retry(self.study, self.storage.get_trial(trial_id))
        failed = retry.failed
        any_failed = bool(failed)
        while failed:
            trial = failed.pop()
            reason = trial.user_attrs[records.FAIL_REASON]
            if run_id := trial.user_attrs.get(records.MLFLOW_RUN_ID):
                self.tracker.finish_trial(run_id, "INTERRUPTED", reason=reason)
            self.console.print(f"trial {trial.number}: {reason}; marked FAIL and queued again")
        if any_failed:
            # A worker killed between creating its MLflow run and keeping the run's id on the trial leaves a run
            # only its trial number finds.
            self.track(reconcile, self.study, self.tracker, self.plan)


def _stale_reason(trial: optuna.trial.FrozenTrial) -> str:
    return f"worker stopped sending heartbeats (host {trial.user_attrs.get(records.HOST)}, pid {trial.user_attrs.get(records.PID)})"


def recovery_for(study: optuna.Study, storage: optuna.storages.BaseStorage, tracker: Tracker, console: Console, plan: Plan,
                 track: Callable) -> LeaseRecovery | HeartbeatRecovery:
    if heartbeat_enabled(storage):
        return HeartbeatRecovery(study, storage, tracker, console, plan, track)
    return LeaseRecovery(study, storage, tracker, console)
