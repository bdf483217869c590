"""Run a study: ask Optuna for trials, train each one, report per epoch for pruning, mirror into MLflow.

This process owns the Optuna storage and the MLflow client, so locally nothing has two writers.
`--trials N` is the study's total: a relaunch runs only what is missing, retries the trial an
interruption or a dead process left behind, and reuses the study's MLflow parent run.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from objectives import DeviceOutOfMemoryError, DivergedError, FashionMNIST, TrainResult, load_fashion_mnist, train
from study.pool import Worker, WorkerDied, cpu_threads
from study.reconcile import reconcile
from study.specs import PRESETS, Plan, SpecError
from study.storage import claim_lock, heartbeat_enabled, mask
from study.tracking import Tracker

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# Final results kept on the Optuna trial too, so reports and `show` need no MLflow round trip.
RESULT_ATTRS = ("test_accuracy", "train_seconds", "wall_seconds", "examples_per_second", "flops_per_example", "train_flops", "params", "peak_memory_bytes", "epochs_run")


# Reliability tests: "TRIAL:EPOCH" raises torch.OutOfMemoryError inside `train` at the end of that epoch
# of that trial (single worker), so the out-of-memory path runs on machines without a GPU.
INJECT_OOM_ENV = "STUDY_INJECT_OOM"


class TrackingUnavailable(ConnectionError):
    """MLflow could not be written; the trials' results are safe in the Optuna storage."""


def choose_preset(requested: str | None) -> tuple[str, str]:
    """The preset and a sentence saying why."""
    if requested:
        return requested, "as requested"
    if torch.cuda.is_available():
        return "full", f"CUDA device {torch.cuda.get_device_name(0)} found"
    return "cpu", "no CUDA device, so the spec's CPU budget: data subsets and narrower ranges (use --preset full for the real study)"


def count_done(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Finished trials that use up one of the study's N: not those queued again (interrupted, dead worker)."""
    retried = {t.user_attrs.get("retry_of") for t in trials} | {t.system_attrs.get("failed_trial") for t in trials}
    return sum(t.state in FINISHED and t.number not in retried for t in trials)


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, less its `study.stop()` once the grid is covered: that works only inside
    `study.optimize`, and here the study's total says when to stop."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


# Each name maps to the Optuna class; [pruner] / [sampler] settings other than `name` are its arguments.
PRUNERS = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}
SAMPLERS = {"tpe": optuna.samplers.TPESampler, "gp": optuna.samplers.GPSampler, "random": optuna.samplers.RandomSampler,
            "grid": GridSampler}
# Costs a multi-objective study minimises beside validation accuracy: TrainResult fields.
COSTS = ("train_seconds", "train_flops")


def make_pruner(settings: dict, multi_objective: bool = False) -> optuna.pruners.BasePruner:
    settings = dict(settings)
    name = settings.pop("name", "median")
    if multi_objective or name == "none":
        return optuna.pruners.NopPruner()  # Optuna cannot prune multi-objective studies (trial.report is single-objective)
    return PRUNERS[name](**settings)


def make_sampler(settings: dict, plan: Plan) -> optuna.samplers.BaseSampler:
    settings = dict(settings)
    name = settings.pop("name", "tpe")
    if name == "tpe":
        settings.setdefault("constant_liar", True)  # parallel trials do not all draw the same point
    if name == "grid":
        return GridSampler(plan.grid(), **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SAMPLERS[name](**settings)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Launch:
    plan: Plan
    study: optuna.Study
    storage: optuna.storages.BaseStorage
    tracker: Tracker
    console: Console
    data_dir: str | None = None
    cost: str | None = None  # None: maximise validation accuracy; else also minimise this TrainResult field
    # One lock around every storage and MLflow write: trial threads share this process's clients.
    lock: threading.RLock = field(default_factory=threading.RLock)
    in_flight: set[int] = field(default_factory=set)  # trial ids whose heartbeat this process records
    stopping: threading.Event = field(default_factory=threading.Event)  # Ctrl-C or an error: start no more trials
    log_model: str = "best"  # which trials' networks go to MLflow: best (each new best), all, none
    data: FashionMNIST | None = None  # loaded by run()
    tracking_error: str | None = None  # the first failed MLflow write; no more are tried, the launch stops

    def _track(self, method: Callable, *args, **kwargs):
        """An MLflow write that may fail (server down): the trial goes on, the launch starts no new trial and
        ends with a clear error, and the next launch writes what is missing (study.reconcile)."""
        if self.tracking_error is not None:
            return None
        try:
            return method(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 -- MlflowException, connection and database errors alike
            self.tracking_error = (str(error).strip().splitlines() or [type(error).__name__])[0]
            self.stopping.set()
            self.console.print(f"MLflow write failed ({self.tracking_error}); finishing the running trials into the Optuna storage only")
            return None

    def recover_dead_trials(self) -> None:
        """Close trials whose worker died and retry them once.

        Relational storage: Optuna's heartbeats; a trial whose heartbeat is older than the grace period is
        failed by `fail_stale_trials`, whose callback (RetryHeartbeatStaleTrialCallback) queues it again.
        Journal file: trials left RUNNING by a process of this host that no longer exists.
        """
        if heartbeat_enabled(self.storage):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
            failed = self.storage.get_heartbeat_stale_trial_callback().failed
            any_failed = bool(failed)
            while failed:
                trial = failed.pop()
                reason = f"worker stopped sending heartbeats (host {trial.user_attrs.get('host')}, pid {trial.user_attrs.get('pid')})"
                if run_id := trial.user_attrs.get("mlflow_run_id"):
                    self.tracker.finish_trial(run_id, "INTERRUPTED", reason=reason)
                self.console.print(f"trial {trial.number}: {reason}; marked FAIL and queued again")
            if any_failed:
                # A worker killed between creating its MLflow run and keeping the run's id on the trial leaves a run
                # only its trial number finds.
                self._track(reconcile, self.study, self.tracker, self.plan)
            return
        host = socket.gethostname()
        study_id = self.storage.get_study_id_from_name(self.study.study_name)
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = trial.user_attrs.get("pid")
            if trial.user_attrs.get("host") != host or pid is None or _alive(pid):
                continue
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            self.storage.set_trial_user_attr(trial_id, "fail_reason", "worker process died")
            self.storage.set_trial_user_attr(trial_id, "interrupted", True)
            self.study.tell(trial.number, state=TrialState.FAIL)
            if run_id := trial.user_attrs.get("mlflow_run_id"):
                self.tracker.finish_trial(run_id, "INTERRUPTED", reason="worker process died")
            self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
            self.console.print(f"trial {trial.number}: its process {pid} died; marked FAIL and queued again")

    def run_trial(self, train_fn: Callable, claim: Callable[[], bool] | None = None, device: str | None = None) -> optuna.trial.FrozenTrial | None:
        """One trial: ask, train with `train_fn(config, on_epoch)`, tell. None when `claim` says the study is full."""
        with self.lock:
            with claim_lock(self.storage, self.study.study_name):
                if claim is not None and not claim():
                    return None
                trial = self.study.ask()
                if heartbeat_enabled(self.storage):
                    # At once, not at the next beat: Optuna ignores trials without heartbeats, so a worker killed
                    # before its first beat would leave its trial RUNNING for ever.
                    self.storage.record_heartbeat(trial._trial_id)
            self.in_flight.add(trial._trial_id)
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
            config = self.plan.trial_config(trial)
            params = trial.params
            if device is not None:
                config = dataclasses.replace(config, device=device)
            run_id = self._track(self.tracker.start_trial, trial.number, config, params, self.data)
            if run_id is not None:
                trial.set_user_attr("mlflow_run_id", run_id)
            # Resolved values, also when the spec fixes them or leaves them to the architecture.
            trial.set_user_attr("arch", config.arch)
            trial.set_user_attr("resize", config.resize)
        try:
            return self._train_and_tell(trial, params, config, run_id, train_fn)
        finally:
            self.in_flight.discard(trial._trial_id)

    def _train_and_tell(self, trial, params, config, run_id, train_fn) -> optuna.trial.FrozenTrial:
        inject_oom = os.environ.get(INJECT_OOM_ENV, "")

        def on_epoch(metrics) -> bool:
            if inject_oom == f"{trial.number}:{metrics.epoch}":
                raise torch.OutOfMemoryError(f"{INJECT_OOM_ENV}={inject_oom}: out of memory injected at epoch {metrics.epoch}")
            with self.lock:
                if run_id is not None:
                    self._track(self.tracker.log_epoch, run_id, metrics)
                if self.cost is not None:
                    return False
                trial.report(metrics.val_accuracy, metrics.epoch)
                return trial.should_prune()

        try:
            result: TrainResult = train_fn(config, on_epoch)
        except (DivergedError, DeviceOutOfMemoryError, WorkerDied) as error:
            reason = str(error) if isinstance(error, WorkerDied) else f"{'diverged' if isinstance(error, DivergedError) else 'out of memory'}: {error}"
            with self.lock:
                trial.set_user_attr("fail_reason", reason)
                self._finish(run_id, "FAIL", reason=reason)
                return self.study.tell(trial, state=TrialState.FAIL)
        except KeyboardInterrupt:
            with self.lock:
                trial.set_user_attr("fail_reason", "interrupted")
                trial.set_user_attr("interrupted", True)
                self.study.tell(trial, state=TrialState.FAIL)
                self._finish(run_id, "INTERRUPTED", reason="interrupted")
                self.study.enqueue_trial(params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
            raise
        except BaseException as error:
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            with self.lock:
                trial.set_user_attr("fail_reason", reason)
                self.study.tell(trial, state=TrialState.FAIL)
                self._finish(run_id, "FAIL", reason=reason)
            raise
        with self.lock:
            for name in RESULT_ATTRS:
                trial.set_user_attr(name, getattr(result, name))
            trial.set_user_attr("device", result.device_name)
            state = TrialState.PRUNED if result.stopped_early else TrialState.COMPLETE
            self._finish(run_id, state.name, result)
            if state == TrialState.PRUNED:
                frozen = self.study.tell(trial, state=TrialState.PRUNED)
            elif self.cost is not None:
                frozen = self.study.tell(trial, [result.val_accuracy, float(getattr(result, self.cost))])
            else:
                frozen = self.study.tell(trial, result.val_accuracy)
            if run_id is not None and self._keeps_model(frozen):
                self._track(self.tracker.log_model, run_id, frozen.number, result, self.data)
            return frozen

    def _keeps_model(self, frozen: optuna.trial.FrozenTrial) -> bool:
        """--log-model: every trained network (all), or each one that is best when it finishes (best)."""
        if self.log_model == "all":
            return True
        # best_trials: the best trial(s), or the Pareto front of a multi-objective study.
        return self.log_model == "best" and frozen.state == TrialState.COMPLETE and frozen.number in {t.number for t in self.study.best_trials}

    def _finish(self, run_id: str | None, state: str, result: TrainResult | None = None, reason: str | None = None) -> None:
        if run_id is not None:
            self._track(self.tracker.finish_trial, run_id, state, result, reason=reason)

    def run(self, total: int, timeout: float | None, devices: list[str] | None = None) -> int:
        """Run trials until the study holds `total`; returns how many this launch ran.

        `devices` has one entry per trial slot ("auto" or "cuda:N"). One slot trains in this process. Several
        get a worker process each, driven by one thread each running the same trial loop; the lock keeps this
        process the only writer of the storage and the MLflow store.
        """
        devices = devices or ["auto"]
        with self.lock:
            self.recover_dead_trials()
            if repaired := reconcile(self.study, self.tracker, self.plan):
                self.console.print(f"MLflow: wrote the missing records of trials {', '.join(map(str, repaired))} from the Optuna storage")
            trials = self.study.get_trials(deepcopy=False)
            if not trials:
                for row in self.plan.enqueue:
                    self.study.enqueue_trial(row)
            done = count_done(trials)
        if done >= total:
            self.console.print(f"study {self.study.study_name} already holds {done} finished trials (asked for {total}); nothing to run")
            return 0
        deadline = None if timeout is None else time.monotonic() + timeout
        workers = []
        # Loaded here also with worker processes: MLflow's dataset input and the logged models' test predictions need it.
        self.data = data = load_fashion_mnist(self.data_dir)
        if len(devices) == 1:
            slots = [(lambda config, on_epoch: train(config, data, on_epoch), None if devices[0] == "auto" else devices[0])]
        else:
            workers = [Worker(device, self.data_dir, cpu_threads(len(devices))) for device in devices]
            slots = [(worker.train, None if worker.device == "auto" else worker.device) for worker in workers]
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("best {task.fields[best]}"),
                   TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
        self.ran, self.timed_out, stop = 0, False, threading.Event()
        with Progress(*columns, console=self.console) as progress:
            self._task = progress.add_task(self.study.study_name, total=total, completed=done, best=self._best())
            self._progress = progress
            heartbeat = threading.Thread(target=self._beat, args=(stop,), daemon=True)
            heartbeat.start()
            try:
                if len(slots) == 1:
                    self._slot_loop(*slots[0], total, deadline)
                else:
                    self._run_threads(slots, total, deadline, workers)
            finally:
                stop.set()
                for worker in workers:
                    worker.stop()
        if self.tracking_error is not None:
            raise TrackingUnavailable(f"MLflow at {mask(self.tracker.client.tracking_uri)} failed ({self.tracking_error}); the {self.ran} trials of this launch "
                                      "are kept in the Optuna storage; launch again once MLflow is back and their MLflow records are written then")
        if self.timed_out:
            self.console.print(f"timeout of {timeout:g} s reached after {self.ran} trials; launch again to continue")
        return self.ran

    def _run_threads(self, slots, total, deadline, workers) -> None:
        errors: list[BaseException] = []
        finished = [threading.Event() for _ in slots]

        def loop(train_fn, device, done):
            try:
                self._slot_loop(train_fn, device, total, deadline)
            except BaseException as error:  # noqa: BLE001 -- re-raised by the main thread
                errors.append(error)
                self.stopping.set()
                for worker in workers:
                    worker.stop()  # one unexpected error ends the launch, as it does with one worker
            finally:
                done.set()

        for slot, done in zip(slots, finished):
            threading.Thread(target=loop, args=(*slot, done), daemon=True).start()
        # Events rather than Thread.join: a join cut short by Ctrl-C may not wait for its thread again.
        try:
            while not all(done.wait(0.2) for done in finished):
                pass
        except KeyboardInterrupt:
            self.stopping.set()
            for worker in workers:
                worker.stop()  # each running trial then records itself as interrupted
            for done in finished:
                done.wait()
            raise
        real = [error for error in errors if not isinstance(error, KeyboardInterrupt)]
        if real:
            raise real[0]

    def _slot_loop(self, train_fn, device, total: int, deadline: float | None) -> None:
        """Run trials until the study holds `total`, waiting while other workers' trials could still reach it."""
        state = {}

        def claim() -> bool:
            if self.stopping.is_set():
                return False
            self.recover_dead_trials()
            trials = self.study.get_trials(deepcopy=False)
            state["done"] = count_done(trials)
            state["running"] = sum(t.state == TrialState.RUNNING for t in trials)
            return state["done"] + state["running"] < total

        while True:
            if deadline is not None and time.monotonic() > deadline:
                self.timed_out = True
                return
            frozen = self.run_trial(train_fn, claim, device)
            if frozen is None:
                if self.stopping.is_set() or state["done"] >= total:
                    return
                time.sleep(1.0)  # other trials are running; one may still fail (dead worker) and be queued again
                continue
            with self.lock:
                self.ran += 1
                self._log_line(self._progress.console, frozen)
                self._progress.update(self._task, completed=count_done(self.study.get_trials(deepcopy=False)), best=self._best())
                self._update_parent()

    def _beat(self, stop: threading.Event) -> None:
        """Record the heartbeat of every trial this process runs (relational storage only)."""
        if not heartbeat_enabled(self.storage):
            return
        interval = self.storage.get_heartbeat_interval()
        while not stop.is_set():
            # No self.lock: a heartbeat must not wait behind slow MLflow calls (RDB sessions are per thread).
            for trial_id in list(self.in_flight):
                self.storage.record_heartbeat(trial_id)
            stop.wait(interval)

    def _best(self) -> str:
        if self.cost is not None:
            return f"Pareto front of {len(self.study.best_trials)} trials"
        try:
            return f"val_accuracy {self.study.best_value:.4f} (trial {self.study.best_trial.number})"
        except ValueError:
            return "-"

    def _log_line(self, console: Console, trial: optuna.trial.FrozenTrial) -> None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        if trial.state == TrialState.FAIL:
            outcome = f"FAIL ({trial.user_attrs.get('fail_reason', 'unknown')})"
        else:
            value = trial.values[0]  # for a pruned trial Optuna keeps the last reported val_accuracy
            cost = f" {self.cost}={trial.values[1]:.4g}" if self.cost and trial.state == TrialState.COMPLETE else ""
            outcome = f"{trial.state.name} val_accuracy={value:.4f}{cost} after {trial.user_attrs.get('epochs_run')} epochs, {trial.user_attrs.get('train_seconds', 0):.1f} s"
        console.print(f"trial {trial.number}: {params} -> {outcome}")

    def _update_parent(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        counts = {state.name: sum(t.state == state for t in trials) for state in FINISHED}
        best = max(self.study.best_trials, key=lambda t: t.values[0]) if counts["COMPLETE"] else None  # the most accurate, also on a Pareto front
        best_metrics = {key: best.user_attrs[key] for key in ("test_accuracy", "train_seconds", "epochs_run", "params") if key in best.user_attrs} if best else None
        self._track(self.tracker.update_parent, best.number if best else None, best.values[0] if best else None, counts, best_metrics,
                    best.user_attrs.get("mlflow_run_id") if best else None)


def check_preset_matches(study: optuna.Study, preset: str) -> None:
    """A study keeps the preset it was created with; mixing cpu and full trials would corrupt its comparisons."""
    recorded = study.user_attrs.get("preset")
    if recorded is not None and recorded not in PRESETS:
        raise SpecError(f"study {study.study_name} was created with preset {recorded!r}, which no longer exists (presets: {', '.join(PRESETS)}); "
                        "launch it under another name or --storage")
    if recorded is None:
        study.set_user_attr("preset", preset)
    elif recorded != preset:
        raise SpecError(f"study {study.study_name} was created with preset {recorded}; relaunch with --preset {recorded} or use another --storage")


def report_path(home: Path, names: list[str]) -> Path:
    return home / "reports" / f"{'+'.join(names)}.html"
