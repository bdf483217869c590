"""Run a study: ask Optuna for trials, train each one, report per epoch for pruning, mirror into MLflow.

This process owns the Optuna storage and the MLflow client, so locally nothing has two writers.
`--trials N` is the study's total: a relaunch runs only what is missing, retries the trial an
interruption or a dead process left behind, and reuses the study's MLflow parent run.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from objectives import DeviceOutOfMemoryError, DivergedError, TrainResult, load_fashion_mnist, train
from study.specs import Plan, SpecError
from study.tracking import Tracker

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# Final results kept on the Optuna trial too, so reports and `show` need no MLflow round trip.
RESULT_ATTRS = ("test_accuracy", "train_seconds", "wall_seconds", "examples_per_second", "flops_per_example", "train_flops", "params", "peak_memory_bytes", "epochs_run")


def choose_preset(requested: str | None) -> tuple[str, str]:
    """The preset and a sentence saying why."""
    if requested:
        return requested, "as requested"
    if torch.cuda.is_available():
        return "full", f"CUDA device {torch.cuda.get_device_name(0)} found"
    return "smoke", "no CUDA device, so a data subset with capped resize and epochs (use --preset full for the real study)"


def counts_toward_total(trial: optuna.trial.FrozenTrial) -> bool:
    # An interrupted trial is retried, so it does not use up one of the study's N trials.
    return trial.state in FINISHED and not trial.user_attrs.get("interrupted")


def make_pruner(settings: dict) -> optuna.pruners.BasePruner:
    settings = dict(settings)
    if settings.pop("name", "median") == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(**settings)


def suggest(trial: optuna.Trial, plan: Plan) -> dict:
    """The trial's params: the spec's search, then the ranges that depend on the drawn architecture."""
    params = {}
    for name, dist in plan.search.items():
        params[name] = _suggest_one(trial, name, dist)
    arch = params.get("arch", plan.fixed.get("arch"))
    for name, dist in plan.conditional.get(arch, {}).items():
        params[name] = _suggest_one(trial, name, dist)
    return params


def _suggest_one(trial: optuna.Trial, name: str, dist: dict):
    if "choices" in dist:
        return trial.suggest_categorical(name, dist["choices"])
    if isinstance(dist["low"], int) and isinstance(dist["high"], int):
        return trial.suggest_int(name, dist["low"], dist["high"], step=dist.get("step", 1), log=dist.get("log", False))
    return trial.suggest_float(name, dist["low"], dist["high"], step=dist.get("step"), log=dist.get("log", False))


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
    log_model: str = "best"  # which trials' networks go to MLflow: best (each new best), all, none

    def recover_dead_trials(self) -> None:
        """Close trials left RUNNING by a process of this host that no longer exists, and retry them once."""
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

    def run_trial(self, data) -> optuna.trial.FrozenTrial:
        trial = self.study.ask()
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = suggest(trial, self.plan)
        config = self.plan.config(params)
        run_id = self.tracker.start_trial(trial.number, config, params, data)
        trial.set_user_attr("mlflow_run_id", run_id)
        # Resolved values, also when the spec fixes them or leaves them to the architecture.
        trial.set_user_attr("arch", config.arch)
        trial.set_user_attr("resize", config.resize)

        def on_epoch(metrics) -> bool:
            self.tracker.log_epoch(run_id, metrics)
            trial.report(metrics.val_accuracy, metrics.epoch)
            return trial.should_prune()

        try:
            result: TrainResult = train(config, data, on_epoch)
        except (DivergedError, DeviceOutOfMemoryError) as error:
            reason = "diverged" if isinstance(error, DivergedError) else "out of memory"
            trial.set_user_attr("fail_reason", f"{reason}: {error}")
            self.tracker.finish_trial(run_id, "FAIL", reason=f"{reason}: {error}")
            return self.study.tell(trial, state=TrialState.FAIL)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            trial.set_user_attr("interrupted", True)
            self.study.tell(trial, state=TrialState.FAIL)
            self.tracker.finish_trial(run_id, "INTERRUPTED", reason="interrupted")
            self.study.enqueue_trial(params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
            raise
        except BaseException as error:
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            trial.set_user_attr("fail_reason", reason)
            self.study.tell(trial, state=TrialState.FAIL)
            self.tracker.finish_trial(run_id, "FAIL", reason=reason)
            raise
        for name in RESULT_ATTRS:
            trial.set_user_attr(name, getattr(result, name))
        trial.set_user_attr("device", result.device_name)
        state = TrialState.PRUNED if result.stopped_early else TrialState.COMPLETE
        self.tracker.finish_trial(run_id, state.name, result)
        if state == TrialState.PRUNED:
            frozen = self.study.tell(trial, state=TrialState.PRUNED)
        else:
            frozen = self.study.tell(trial, result.val_accuracy)
        if self._keeps_model(frozen):
            self.tracker.log_model(run_id, frozen.number, result, data)
        return frozen

    def _keeps_model(self, frozen: optuna.trial.FrozenTrial) -> bool:
        """--log-model: every trained network (all), or each one that is best when it finishes (best)."""
        if self.log_model == "all":
            return True
        # best_trials: the best trial(s), or the Pareto front of a multi-objective study.
        return self.log_model == "best" and frozen.state == TrialState.COMPLETE and frozen.number in {t.number for t in self.study.best_trials}

    def run(self, total: int, timeout: float | None) -> int:
        """Run trials until the study holds `total`; returns how many this launch ran."""
        data = load_fashion_mnist(self.data_dir)
        self.recover_dead_trials()
        trials = self.study.get_trials(deepcopy=False)
        if not trials:
            for row in self.plan.enqueue:
                self.study.enqueue_trial(row)
        done = sum(counts_toward_total(t) for t in trials)
        if done >= total:
            self.console.print(f"study {self.study.study_name} already holds {done} finished trials (asked for {total}); nothing to run")
            return 0
        start, ran = time.monotonic(), 0
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("best val_accuracy {task.fields[best]}"),
                   TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
        with Progress(*columns, console=self.console) as progress:
            task = progress.add_task(self.study.study_name, total=total, completed=done, best=self._best())
            while done < total:
                if timeout is not None and time.monotonic() - start > timeout:
                    self.console.print(f"timeout of {timeout:g} s reached after {ran} trials; launch again to continue")
                    break
                frozen = self.run_trial(data)
                ran += 1
                done += counts_toward_total(frozen)
                self._log_line(progress.console, frozen)
                progress.update(task, completed=done, best=self._best())
                self._update_parent()
        return ran

    def _best(self) -> str:
        try:
            return f"{self.study.best_value:.4f} (trial {self.study.best_trial.number})"
        except ValueError:
            return "-"

    def _log_line(self, console: Console, trial: optuna.trial.FrozenTrial) -> None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        if trial.state == TrialState.FAIL:
            outcome = f"FAIL ({trial.user_attrs.get('fail_reason', 'unknown')})"
        else:
            value = trial.value  # for a pruned trial Optuna keeps the last reported val_accuracy
            outcome = f"{trial.state.name} val_accuracy={value:.4f} after {trial.user_attrs.get('epochs_run')} epochs, {trial.user_attrs.get('train_seconds', 0):.1f} s"
        console.print(f"trial {trial.number}: {params} -> {outcome}")

    def _update_parent(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        counts = {state.name: sum(t.state == state for t in trials) for state in FINISHED}
        best = self.study.best_trial if counts["COMPLETE"] else None
        best_metrics = {key: best.user_attrs[key] for key in ("test_accuracy", "train_seconds", "epochs_run", "params") if key in best.user_attrs} if best else None
        self.tracker.update_parent(best.number if best else None, best.value if best else None, counts, best_metrics,
                                   best.user_attrs.get("mlflow_run_id") if best else None)


def check_preset_matches(study: optuna.Study, preset: str) -> None:
    """A study keeps the preset it was created with; mixing smoke and full trials would corrupt its comparisons."""
    recorded = study.user_attrs.get("preset")
    if recorded is None:
        study.set_user_attr("preset", preset)
    elif recorded != preset:
        raise SpecError(f"study {study.study_name} was created with preset {recorded}; relaunch with --preset {recorded} or use another --storage")


def report_path(home: Path, names: list[str]) -> Path:
    return home / "reports" / f"{'+'.join(names)}.html"
