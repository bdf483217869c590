"""Run a study: ask Optuna for trials, train each one, report per epoch for pruning, mirror into MLflow.

This process owns the Optuna storage and the MLflow client, so locally nothing has two writers.
`--trials N` is the study's total: a relaunch runs only what is missing, retries the trial an
interruption or a dead process left behind, and reuses the study's MLflow parent run.

Three parts: `TrialRunner` runs one trial (ask, train, tell, mirror to MLflow); study.recovery closes
the trials of dead processes; `Scheduler` keeps the trial slots busy until the study holds its total.
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
from optuna.trial import TrialState
from rich.console import Console

import records
from dashboards.files import named_file
from objectives import EpochMetrics, FashionMNIST, TrainConfig, TrainResult, load_fashion_mnist
from objectives.checkpoint import Checkpoint, CheckpointError, read_checkpoint
from study import budget as costs
from study.costprune import CostBucketPruner, bucket
from study.errors import StudyFull
from study.messages import TRIAL_ERRORS, error_kind
from study.pool import InProcess, WorkerDied, local_slots
from study.progress import LiveProgress
from study.reconcile import reconcile, repair_models
from study.recovery import HeartbeatRecovery, LeaseRecovery, lease_until, recovery_for
from study.session import Session
from study.storage import claim_lock, heartbeat_enabled, home, mask
from study.tracking import Tracker
from study.validate import largest_configs

# Optuna warns at every ask() on a storage with heartbeats that they are meant for study.optimize: this launcher records
# them itself (Scheduler._beat) and fails stale trials itself (study.recovery).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize", category=UserWarning)


class TrackingUnavailable(ConnectionError):
    """MLflow could not be written; the trials' results are safe in the Optuna storage."""


@dataclass
class TrialRunner:
    """One trial at a time per slot: ask, train, tell, and mirror into MLflow. Thread-safe through `lock`."""

    session: Session
    tracker: Tracker
    console: Console
    log_model: str = "best"  # which trials' networks go to MLflow: best (each new best), all, none
    data: FashionMNIST | None = None  # MLflow's dataset input and the logged models' test predictions need it
    # One lock around every storage and MLflow write: trial threads share this process's clients.
    lock: threading.RLock = field(default_factory=threading.RLock)
    in_flight: set[int] = field(default_factory=set)  # trial ids whose heartbeat this process records
    stopping: threading.Event = field(default_factory=threading.Event)  # Ctrl-C or an error: start no more trials
    tracking_error: str | None = None  # the first failed MLflow write; no more are tried, the launch stops
    budget: costs.Budget | None = None  # --budget: a trial whose predicted cost does not fit is not run
    budget_stop: str | None = None      # why the budget stopped the study
    cost_pruner: CostBucketPruner | None = None  # accuracy,cost studies: pruning against trials of similar cost
    # confirm: what a trial trains (default: the plan's draw) and extra tags on its MLflow run
    config_for: Callable[[optuna.Trial], TrainConfig] | None = None
    run_tags: Callable[[optuna.Trial], dict] | None = None
    running_cost: dict[int, float] = field(default_factory=dict)  # trial id -> predicted cost counted against the budget
    cost_history: optuna.Study | None = None  # confirm: the original study, whose trials measured this machine too
    cost_model: costs.CostModel | None = None  # the trials' predicted seconds: set by the command before the first trial
    checkpoints: Path | None = None  # the study's checkpoint folder (checkpoint_folder): one file per running trial; None: none kept
    progress: LiveProgress | None = None  # the display the running trials' epochs are shown in
    label: str = "trial"  # what a trial is called in it: "confirm trial" for confirm

    @property
    def study(self) -> optuna.Study:
        return self.session.study

    def track(self, method: Callable, *args, **kwargs):
        """An MLflow write that may fail (server down): the trial goes on, the launch starts no new trial and
        ends with a clear error, and the next launch writes what is missing (study.reconcile)."""
        if self.tracking_error is not None:
            return None
        try:
            return method(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 -- MlflowException, connection and database errors alike
            self.tracking_error = mask((str(error).strip().splitlines() or [type(error).__name__])[0])  # MLflow's errors name the URI
            self.stopping.set()
            self.console.print(f"MLflow write failed ({self.tracking_error}); finishing the running trials into the Optuna storage only")
            return None

    def run_trial(self, slot, claim: Callable[[], bool]) -> optuna.trial.FrozenTrial | None:
        """One trial: ask, train on `slot` (study.pool), tell. None when `claim` says the study is full."""
        storage = self.session.storage
        with self.lock:
            with claim_lock(storage, self.study.study_name):
                if not claim():
                    return None
                try:
                    trial = self.study.ask()
                except StudyFull:  # the storage proxy's own count: other workers took the last trials
                    return None
                if heartbeat_enabled(storage):
                    # At once, not at the next beat: Optuna ignores trials without heartbeats, so a worker killed
                    # before its first beat would leave its trial RUNNING for ever.
                    storage.record_heartbeat(trial._trial_id)
                else:
                    trial.set_user_attr(records.LEASE, lease_until(self.session.heartbeat))  # first thing, as the heartbeat above
            self.in_flight.add(trial._trial_id)
            trial.set_user_attr(records.HOST, socket.gethostname())
            trial.set_user_attr(records.PID, os.getpid())
            trial.set_user_attr(records.NODE, slot.node)
            trial.set_user_attr(records.CPU_THREADS, slot.threads)
            config = (self.config_for or self.session.settings.plan.trial_config)(trial)
            if slot.device is not None:
                config = dataclasses.replace(config, device=slot.device)
            trial.set_user_attr(records.CONFIG, dataclasses.asdict(config))
            trials = self.study.get_trials(deepcopy=False)
            prediction = costs.predict(config, self.cost_model, trials + (self.cost_history.get_trials(deepcopy=False) if self.cost_history else []))
            trial.set_user_attr(records.PREDICTED_FLOPS, prediction.flops)
            trial.set_user_attr(records.PREDICTED_SECONDS, prediction.seconds)
            refusal = self.budget and self.budget.refusal(prediction, trials, sum(self.running_cost.values()))
            run_id = self.track(self.tracker.start_trial, trial.number, records.run_name(trial), config, trial.params, self.data, self.run_tags(trial) if self.run_tags else None)
            if run_id is not None:
                trial.set_user_attr(records.MLFLOW_RUN_ID, run_id)
                self.track(self.tracker.client.set_tag, run_id, records.NODE, slot.node)
            self._adopt_checkpoint(trial)  # before a refusal, so that the refused trial's own retry finds it
            if refusal:
                # Not run; queued again, so a launch with a larger budget runs this configuration first.
                trial.set_user_attr(records.FAIL_REASON, refusal)
                trial.set_user_attr(records.OVER_BUDGET, True)
                frozen = self.study.tell(trial, state=TrialState.FAIL)
                self._finish(run_id, "FAIL", reason=refusal)
                records.retry(self.study, frozen)
                self.in_flight.discard(trial._trial_id)
                self.budget_stop = refusal
                self.stopping.set()
                return None
            if self.budget:
                self.running_cost[trial._trial_id] = self.budget.cost(prediction)
            resume = self._resume_point(trial, config, run_id)
        try:
            return self._train_and_tell(trial, config, run_id, slot.train, resume)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another worker failed this trial while it ran and queued its retry: its heartbeats or lease did not reach
            # the storage in time (a network cut). Its result would be a duplicate, so it is dropped, and this worker,
            # which cannot keep its trials alive, stops.
            self.stopping.set()
            self.console.print(f"trial {trial.number}: failed by another worker while it ran here (no heartbeat or lease reached the "
                               "storage in time); its retry runs elsewhere, so this result is dropped and this worker stops")
            return None
        finally:
            self.in_flight.discard(trial._trial_id)
            self.running_cost.pop(trial._trial_id, None)

    def _train_and_tell(self, trial: optuna.Trial, config, run_id: str | None, train_fn: Callable,
                        resume: Checkpoint | None = None) -> optuna.trial.FrozenTrial:
        cost = self.session.settings.cost
        curve: list[float] = []
        history: list[dict] = []
        own_bucket = bucket(trial.user_attrs[records.PREDICTED_FLOPS], config.epochs) if cost is not None else None

        def record_epoch(metrics: EpochMetrics) -> None:
            if run_id is not None:
                self.track(self.tracker.log_epoch, run_id, metrics)
            history.append(dataclasses.asdict(metrics))
            trial.set_user_attr(records.HISTORY, history)
            if cost is not None:
                curve.append(metrics.val_accuracy)
                trial.set_user_attr(records.VAL_CURVE, curve)
            else:
                trial.report(metrics.val_accuracy, metrics.epoch)

        def on_epoch(metrics: EpochMetrics) -> bool:
            if self.progress is not None:
                self.progress.epoch(trial.number, metrics.epoch, f"val_accuracy {metrics.val_accuracy:.4f}")
            # After its last epoch a trial is whole, its cost spent: no pruner is asked, so it is COMPLETE and may be the best.
            last = metrics.epoch >= config.epochs
            with self.lock:
                record_epoch(metrics)
                if cost is not None:
                    return not last and self.cost_pruner is not None and self.cost_pruner.should_prune(self.study, own_bucket, metrics.epoch,
                                                                                                        metrics.val_accuracy)
                return not last and trial.should_prune()

        if self.progress is not None:
            self.progress.start(trial.number, f"{self.label} {trial.number}", config.epochs, trial.user_attrs[records.PREDICTED_SECONDS])
        if resume is not None:
            # The epochs the checkpoint holds, recorded again on this trial: the pruner and the MLflow run see the whole curve.
            with self.lock:
                for metrics in resume.history:
                    record_epoch(EpochMetrics(**metrics))
        checkpoint = self._checkpoint_path(trial.number)
        try:
            result: TrainResult = train_fn(config, on_epoch, checkpoint, resume is not None)
        except TRIAL_ERRORS as error:
            reason = f"{error_kind(error)}: {error}"
            with self.lock:
                trial.set_user_attr(records.FAIL_REASON, reason)
                self._finish(run_id, "FAIL", reason=reason)
                self._drop_checkpoint(trial.number)
                return self.study.tell(trial, state=TrialState.FAIL)
        except WorkerDied as error:  # its process, Ray actor or node is gone: the trial runs again once, elsewhere
            return self._interrupted(trial, run_id, str(error))
        except KeyboardInterrupt:
            self._interrupted(trial, run_id, "interrupted")
            raise
        except BaseException as error:
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            with self.lock:
                trial.set_user_attr(records.FAIL_REASON, reason)
                self.study.tell(trial, state=TrialState.FAIL)
                self._finish(run_id, "FAIL", reason=reason)
                self._drop_checkpoint(trial.number)
            raise
        finally:
            if self.progress is not None:
                self.progress.finish(trial.number)
        with self.lock:
            for key, value in records.results(result).items():
                trial.set_user_attr(key, value)
            state = TrialState.PRUNED if result.stopped_early else TrialState.COMPLETE
            self._finish(run_id, state.name, result)
            if state == TrialState.PRUNED:
                frozen = self.study.tell(trial, state=TrialState.PRUNED)
            elif cost is not None:
                frozen = self.study.tell(trial, [result.val_accuracy, float(getattr(result, cost))])
            else:
                frozen = self.study.tell(trial, result.val_accuracy)
            self._drop_checkpoint(trial.number)
            if run_id is not None and self._keeps_model(frozen):
                self.track(self.tracker.log_model, run_id, frozen.number, result, self.data)
            return frozen

    def _checkpoint_path(self, number: int) -> Path | None:
        """Where trial `number` keeps its checkpoint; None when the study keeps none."""
        return None if self.checkpoints is None else self.checkpoints / f"{number}.pt"

    def _adopt_checkpoint(self, trial: optuna.Trial) -> None:
        """A retry takes over the checkpoint of the trial it repeats, under its own number: interrupted in turn, before
        its first epoch, it leaves the checkpoint to its own retry; finished, it removes it (study/launch._drop_checkpoint)."""
        source = trial.user_attrs.get(records.RETRY_OF)
        if self.checkpoints is None or source is None:
            return
        for stale in self.checkpoints.glob(f".{source}.pt.*.tmp"):
            stale.unlink(missing_ok=True)  # a write the interrupted trial did not finish (objectives.files.write_whole)
        try:
            os.replace(self._checkpoint_path(source), self._checkpoint_path(trial.number))
        except FileNotFoundError:
            pass  # interrupted in its first epoch, or its checkpoint was set aside: read_checkpoint says so

    def _resume_point(self, trial: optuna.Trial, config: TrainConfig, run_id: str | None) -> Checkpoint | None:
        """The checkpoint a retry resumes from (recorded as `resumed_from_epoch` on it and its MLflow run), None when it
        trains from epoch 1. One it cannot trust is set aside, under a name of its own, with one line."""
        if self.checkpoints is None or records.RETRY_OF not in trial.user_attrs:
            return None
        path = self._checkpoint_path(trial.number)
        try:
            checkpoint = read_checkpoint(path, config)
        except CheckpointError as error:
            note = ""
            if path.exists():
                aside = path.with_name(f"{path.name}.set-aside-{int(time.time())}")
                path.replace(aside)
                note = f"; set aside as {aside}"
            self.console.print(f"trial {trial.number} (retry of trial {trial.user_attrs[records.RETRY_OF]}): {error}{note}; training from epoch 1", markup=False)
            return None
        trial.set_user_attr(records.RESUMED_FROM_EPOCH, checkpoint.epoch)
        if run_id is not None:
            self.track(self.tracker.client.set_tag, run_id, records.RESUMED_FROM_EPOCH, str(checkpoint.epoch))
        self.console.print(f"trial {trial.number} (retry of trial {trial.user_attrs[records.RETRY_OF]}): resumed from epoch {checkpoint.epoch}")
        return checkpoint

    def _drop_checkpoint(self, number: int) -> None:
        """A trial that finished (not interrupted) needs its checkpoint no more."""
        if self.checkpoints is not None:
            self._checkpoint_path(number).unlink(missing_ok=True)

    def _interrupted(self, trial: optuna.Trial, run_id: str | None, reason: str) -> optuna.trial.FrozenTrial:
        """A trial that could not run to its end: FAIL with the reason, MLflow KILLED, queued once more."""
        with self.lock:
            trial.set_user_attr(records.FAIL_REASON, reason)
            trial.set_user_attr(records.INTERRUPTED, True)
            frozen = self.study.tell(trial, state=TrialState.FAIL)
            self._finish(run_id, "INTERRUPTED", reason=reason)
            records.retry(self.study, frozen)
            return frozen

    def _keeps_model(self, frozen: optuna.trial.FrozenTrial) -> bool:
        """--log-model: every trained network (all), or each one that is best when it finishes (best)."""
        if self.log_model == "all":
            return True
        # best_trials: the best trial(s), or the Pareto front of a multi-objective study.
        return self.log_model == "best" and frozen.state == TrialState.COMPLETE and frozen.number in {t.number for t in self.study.best_trials}

    def _finish(self, run_id: str | None, state: str, result: TrainResult | None = None, reason: str | None = None) -> None:
        if run_id is not None:
            self.track(self.tracker.finish_trial, run_id, state, result, reason=reason)

    def update_parent(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        counts = {state.name: sum(t.state == state for t in trials) for state in records.FINISHED}
        best = max(self.study.best_trials, key=lambda t: t.values[0]) if counts["COMPLETE"] else None  # the most accurate, also on a Pareto front
        # best_<name> on the parent.
        attrs = records.user_attrs(best) if best else {}
        best_metrics = {name: attrs[name] for name in ("test_accuracy", "train_seconds", "epochs_run", "param_count") if name in attrs} if best else None
        self.track(self.tracker.update_parent, best.number if best else None, best.values[0] if best else None, counts, best_metrics,
                   best.user_attrs.get(records.MLFLOW_RUN_ID) if best else None)


@dataclass
class Scheduler:
    """Trial slots (study.pool, study.ray_slots), each driven by a thread running trials until the study holds its total."""

    runner: TrialRunner
    recovery: LeaseRecovery | HeartbeatRecovery
    make_slots: Callable[[FashionMNIST], list]  # the slots, given the data the launcher loaded
    data_dir: str | None = None
    deadline: float | None = None  # time.monotonic() after which no trial starts
    device: str | None = None    # where the slots train ("auto", "cuda:1"); None: Ray's nodes, known from the trials they ran
    ran: int = 0                 # trials this launch finished
    timed_out: bool = False
    progress: LiveProgress | None = None
    forecast: costs.Forecast | None = None  # the study's time on this machine, predicted at the start
    active: int = 0              # slots still taking trials: a Ray slot whose actor ran out of memory retires (_retire)

    @property
    def study(self) -> optuna.Study:
        return self.runner.study

    def run(self) -> int:
        """Run trials until the study holds its total; returns how many this launch ran.

        A slot in this process runs the trial loop itself. Other slots (worker processes, Ray actors) are driven by
        one thread each running the same loop; the runner's lock keeps this process the only writer of the storage
        and MLflow.
        """
        runner, total = self.runner, self.runner.session.settings.total
        with runner.lock:
            self.recovery.recover()
            if repaired := reconcile(self.study, runner.tracker, runner.session.settings.plan):
                runner.console.print(f"MLflow: wrote the missing records of trials {', '.join(map(str, repaired))} from the Optuna storage")
            if logged := repair_models(self.study, runner.tracker, runner.session.settings.plan, runner._keeps_model, self.data_dir, runner.console):
                runner.console.print(f"MLflow: logged the missing models of trials {', '.join(map(str, logged))}")
            trials = self.study.get_trials(deepcopy=False)
            if not trials:
                # No more first trials than the study's total: one beyond it would stay WAITING for good.
                for row in runner.session.settings.plan.enqueue[:total]:
                    self.study.enqueue_trial(row)
            done = records.count_done(trials)
        if done >= total:
            runner.console.print(f"study {self.study.study_name} already holds {done} finished trials (asked for {total}); nothing to run")
            return 0
        # Loaded here also with worker processes: MLflow's dataset input and the logged models' test predictions need it.
        runner.data = load_fashion_mnist(self.data_dir)
        # No more slots than trials still to run: a Ray actor is placed for each slot, and one beyond would hold a CPU idle.
        slots = self.make_slots(runner.data)[:total - done]
        self.forecast = self._forecast(total - done, slots)
        runner.console.print(self.forecast.describe(runner.budget, self.study.get_trials(deepcopy=False)))
        self.study.set_user_attr(records.FORECAST, self.forecast.kept())
        stop = threading.Event()
        started = time.monotonic()
        with LiveProgress(runner.console, self.study.study_name, "trials", total, done, self._status()) as progress:
            self.progress = runner.progress = progress
            heartbeat = threading.Thread(target=self._beat, args=(stop,), daemon=True)
            heartbeat.start()
            try:
                if isinstance(slots[0], InProcess):
                    self._slot_loop(slots[0])
                else:
                    self._run_threads(slots)
            finally:
                stop.set()
                for slot in slots:
                    slot.stop()
        if self.ran:
            runner.console.print(self.forecast.compare(self.ran, time.monotonic() - started))
        if runner.tracking_error is not None:
            raise TrackingUnavailable(f"MLflow at {mask(runner.tracker.client.tracking_uri)} failed ({runner.tracking_error}); the {records.count(self.ran, 'trial')} of this launch "
                                      "are kept in the Optuna storage; launch again once MLflow is back and their MLflow records are written then")
        return self.ran

    def _run_threads(self, slots: list) -> None:
        self.active = len(slots)
        errors: list[BaseException] = []
        finished = [threading.Event() for _ in slots]

        def loop(slot, done):
            try:
                self._slot_loop(slot)
            except BaseException as error:  # noqa: BLE001 -- re-raised by the main thread
                errors.append(error)
                self.runner.stopping.set()
                for other in slots:
                    other.stop()  # one unexpected error ends the launch, as it does with one slot
            finally:
                done.set()

        for slot, done in zip(slots, finished):
            threading.Thread(target=loop, args=(slot, done), daemon=True).start()
        # Events rather than Thread.join: a join cut short by Ctrl-C may not wait for its thread again.
        try:
            while not all(done.wait(0.2) for done in finished):
                pass
        except KeyboardInterrupt:
            self.runner.stopping.set()
            for slot in slots:
                slot.stop()  # each running trial then records itself as interrupted
            for done in finished:
                done.wait()
            raise
        real = [error for error in errors if not isinstance(error, KeyboardInterrupt)]
        if real:
            raise real[0]

    def _slot_loop(self, slot) -> None:
        """Run trials until the study holds its total, waiting while other workers' trials could still reach it."""
        runner, total = self.runner, self.runner.session.settings.total
        counts = {"done": 0, "running": 0}

        def claim() -> bool:
            if runner.stopping.is_set():
                return False
            self.recovery.recover()
            trials = self.study.get_trials(deepcopy=False)
            counts["done"] = records.count_done(trials)
            counts["running"] = sum(t.state == TrialState.RUNNING for t in trials)
            return counts["done"] + counts["running"] < total

        while True:
            if self.deadline is not None and time.monotonic() > self.deadline:
                self.timed_out = True
                return
            if slot.retiring and self._retire(slot):
                return
            if not slot.ready(1.0):  # a Ray actor that no node has room for yet: ask for no trial until it has
                with runner.lock:
                    if runner.stopping.is_set() or records.count_done(self.study.get_trials(deepcopy=False)) >= total:
                        return
                continue
            frozen = runner.run_trial(slot, claim)
            if frozen is None:
                if runner.stopping.is_set() or counts["done"] >= total:
                    return
                time.sleep(1.0)  # other trials are running; one may still fail (dead worker) and be queued again
                continue
            with runner.lock:
                self.ran += 1
                self._log_line(frozen)
                self.progress.update(done=records.count_done(self.study.get_trials(deepcopy=False)), status=self._status())
                runner.update_parent()

    def _retire(self, slot) -> bool:
        """A slot whose Ray actor the memory monitor killed: True, and it takes no more trials, so that the node's memory
        holds the others; False when it is the last one, which then starts a new actor."""
        with self.runner.lock:
            slot.retiring = False
            if self.active <= 1:
                self.progress.console.print("Ray's memory monitor killed an actor (its trial runs again); it was the last one, so a new actor takes its place")
                return False
            self.active -= 1
            self.progress.console.print(f"Ray's memory monitor killed an actor (its trial runs again); the launch goes on with the "
                                        f"{records.count(self.active, 'actor')} that remain")
            return True

    def _beat(self, stop: threading.Event) -> None:
        """Keep every trial this process runs alive in the storage: Optuna's heartbeat on relational storage, the
        trial's lease on every other (study.recovery)."""
        storage = self.runner.session.storage
        beats = heartbeat_enabled(storage)
        interval = storage.get_heartbeat_interval() if beats else self.runner.session.heartbeat
        while not stop.is_set():
            # No runner.lock: a heartbeat must not wait behind slow MLflow calls (RDB sessions are per thread).
            for trial_id in list(self.runner.in_flight):
                try:
                    if beats:
                        storage.record_heartbeat(trial_id)
                    else:
                        storage.set_trial_user_attr(trial_id, records.LEASE, lease_until(interval))
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # it finished since the list was taken
                except Exception:  # noqa: BLE001, S110 -- sqlalchemy, gRPC and file errors alike
                    pass  # a connection dropped mid-beat: the next beat, well within the grace period, gets a new one
            stop.wait(interval)

    def _forecast(self, to_run: int, slots: list) -> costs.Forecast:
        """The time the trials still to run are predicted to take here: the cost model of the plan's range ends on the slots'
        device and CPU threads (timed now if the study has no timing of them on this machine), over the configurations
        they will train."""
        trials = self.study.get_trials(deepcopy=False)
        plan = self.runner.session.settings.plan
        ends = largest_configs(plan) + largest_configs(plan, smallest=True)
        if self.device not in (None, "auto"):  # as TrialRunner.run_trial puts them on the slot's device
            ends = [dataclasses.replace(config, device=self.device) for config in ends]
        self.runner.cost_model = costs.machine_model(self.study, ends, self.runner.data, self.runner.console, trials, slots[0].threads,
                                                     elsewhere=slots[0].elsewhere)
        return costs.Forecast(to_run, tuple(costs.coming_configs(self.study, plan, to_run)), self.runner.cost_model, len(slots))

    def _status(self) -> list[str]:
        """The progress display's second line: best so far, predicted time left, budget used."""
        trials = self.study.get_trials(deepcopy=False)
        return [self._best(), *self.forecast.time_left(trials, self.runner.session.settings.total, self.runner.budget)]

    def _best(self) -> str:
        if self.runner.session.settings.cost is not None:
            front = len(self.study.best_trials)
            return f"best: Pareto front of {records.count(front, 'trial')}" if front else "best: none yet"
        try:
            return f"best val_accuracy {self.study.best_value:.4f} (trial {self.study.best_trial.number})"
        except ValueError:
            return "best: none yet"

    def _log_line(self, trial: optuna.trial.FrozenTrial) -> None:
        cost = self.runner.session.settings.cost
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        if trial.state == TrialState.FAIL:
            outcome = f"FAIL ({trial.user_attrs.get(records.FAIL_REASON, 'unknown')})"
        else:
            # A pruned trial: Optuna keeps the last reported val_accuracy; in a multi-objective study it keeps no values.
            value = trial.values[0] if trial.values else records.last_val_accuracy(trial)
            shown = f" {cost}={trial.values[1]:.4g}" if cost and trial.state == TrialState.COMPLETE else ""
            outcome = f"{trial.state.name} val_accuracy={value:.4f}{shown} after {records.count(trial.user_attrs.get('epochs_run'), 'epoch')}, {trial.user_attrs.get('train_seconds', 0):.1f} s"
        if records.RESUMED_FROM_EPOCH in trial.user_attrs:
            outcome += f", resumed from epoch {trial.user_attrs[records.RESUMED_FROM_EPOCH]}"
        retry = records.retry_source(trial)
        again = f" (retry of trial {retry})" if retry is not None else ""
        self.progress.console.print(f"trial {trial.number}{again}: {params} -> {outcome}")


def run_launch(session: Session, tracker: Tracker, console: Console, devices: list[str], timeout: float | None = None,
               data_dir: str | None = None, log_model: str = "best", budget: costs.Budget | None = None,
               make_slots: Callable[[FashionMNIST], list] | None = None, checkpoint_dir: Path | None = None) -> int:
    """Run the session's study until it holds its total, its budget is spent (or `timeout` seconds pass); returns the trials run.

    The trials run on `devices` of this machine, or on the slots `make_slots` gives (study.ray_slots). Each keeps its
    checkpoint in the study's folder of `checkpoint_dir` (default: the study home's checkpoints/)."""
    checkpoints = checkpoint_folder(checkpoint_dir or home() / "checkpoints", session.study.study_name)
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the checkpoint folder {checkpoints} ({error.strerror}); give --checkpoint-dir a writable directory") from None
    runner = TrialRunner(session, tracker, console, log_model=log_model, budget=budget, checkpoints=checkpoints)
    if session.settings.cost is not None:
        runner.cost_pruner = CostBucketPruner.from_settings(session.settings.pruner)
    recovery = recovery_for(session.study, session.storage, tracker, console, session.settings.plan, runner.track)
    devices = devices or ["auto"]
    scheduler = Scheduler(runner, recovery, make_slots or local_slots(devices, data_dir), data_dir, None if timeout is None else time.monotonic() + timeout,
                          device=None if make_slots else devices[0])
    ran = scheduler.run()
    if scheduler.timed_out:
        console.print(f"timeout of {timeout:g} s reached after {records.count(ran, 'trial')}; launch again to continue")
    if runner.budget_stop:
        console.print(f"budget reached after {records.count(ran, 'trial')}: the next trial's {runner.budget_stop}; it is queued for a launch with a larger --budget")
    return ran


def pruner_name(session: Session) -> str:
    """The class of the pruner that stops the study's trials, for its record: Optuna's, or in an accuracy,cost study (which
    Optuna cannot prune) the cost-bucket pruner, unless the study's [pruner] is `none`."""
    if session.settings.cost is None:
        return type(session.study.pruner).__name__
    pruner = CostBucketPruner.from_settings(session.settings.pruner)
    return type(pruner).__name__ if pruner is not None else optuna.pruners.NopPruner.__name__


def checkpoint_folder(base: Path, study_name: str) -> Path:
    """The folder of a study's checkpoints in `base`, named after the study (dashboards.files.slug)."""
    return named_file(base, study_name, "")


def report_path(home: Path, names: list[str]) -> Path:
    """The default report of the studies `names`: a file in the home's reports/, named after them (dashboards.files.slug)."""
    return named_file(home / "reports", "+".join(names), ".html")
