"""The trial record's schema: what one Optuna trial records, its attribute keys, result fields, finished states and
retries, and what its study records about itself.

The launcher writes these, reconcile replays them into MLflow, and the report, `show`, `export` and
the reliability checks read them back; this module is the one place that names them. It is a package of its own
because both sides read it: study/ and dashboards/ import it, and the report may not import study/. It imports
objectives (the result it names) and Optuna, never study/, dashboards/ or MLflow.

A trial of a launched study carries, as user attributes:
    config          the fully resolved TrainConfig (`dataclasses.asdict`): what trained, fixed settings included
    host, pid       the process running it, so a dead process is noticed (journal storage)
    cpu_threads     the CPU threads torch trained it with (a worker process gets its share of the cores): its
                    measured time counts toward the cost model of that many threads (study.budget)
    node            where it trained: this host, or on a Ray cluster `hostname/Ray node id` (also an MLflow tag)
    mlflow_run_id   its MLflow child run
    RESULT_FIELDS   the TrainResult numbers, once it finished training (`param_count` the network's parameter
                    count: `params` on trials recorded before, RENAMED); `device` its device name,
                    `peak_memory_source` what its peak memory measured
    fail_reason     why it failed; `interrupted` when its process was stopped or died (MLflow: KILLED)
    retry_of        on a trial queued again: the number of the trial it repeats
    resumed_from_epoch
                    on a retry that resumed from its interrupted trial's checkpoint: the epochs it loaded
                    (also an MLflow tag); absent when it trained from epoch 1
    predicted_flops, predicted_seconds
                    its training cost as predicted before it ran (study.budget): FLOPs from the network's
                    forward FLOPs, seconds from training steps timed on its machine, scaled by the trials
                    the study had measured there by then
    over_budget     on a trial not run because its predicted cost did not fit in `launch --budget`
    val_curve       multi-objective studies: validation accuracy per epoch (Optuna's trial.report is single-objective)
    history         every epoch's EpochMetrics (`dataclasses.asdict`), as a checkpoint keeps them: what reconcile
                    replays into MLflow and the report's table reads

A trial of a confirm study (`<study>.confirm`, study.confirm) carries `config` with its own seed and
    confirm_of      the number of the original study's trial whose configuration it trains again
    confirm_seed    the seed it trains with instead (TrainConfig.seed: weight initialisation and batch order)
from the moment it is queued (a retry too). A queued one that a later, smaller call did not ask for is closed as
FAIL without training, its fail_reason starting with "not run:".

The study itself carries `study_uid`, its identity in its storage: MLflow's parent run of the study is
tagged with it (`optuna.study_uid`), so that a study of the same name in another storage, or one that
replaced a deleted journal, never shares a parent run (and its trial numbers) with this one. While a `finalize`
runs, the study also carries `finalize_claim`: its host, pid, a token and its last heartbeat's time (study.once);
None once it ended. For each machine it trained on, `step_timing <host>/<device>`: the training steps the cost
model timed there, for each count of CPU threads (study.budget.machine_model); and `forecast`, the latest launch's start prediction (its machine,
trials, seconds and what it was based on).
"""

from __future__ import annotations

import dataclasses
import types
import typing

import optuna
from optuna.trial import TrialState

from objectives.train import EpochMetrics, TrainConfig, TrainResult

CONFIG = "config"
HOST = "host"
PID = "pid"
CPU_THREADS = "cpu_threads"
LEASE = "lease_until"  # wall-clock time (Unix seconds) until which the process running a trial vouches that it lives
NODE = "node"
MLFLOW_RUN_ID = "mlflow_run_id"
DEVICE = "device"
PEAK_MEMORY_SOURCE = "peak_memory_source"  # what peak_memory_bytes measured (objectives.memory.SOURCES)
FAIL_REASON = "fail_reason"
INTERRUPTED = "interrupted"
RETRY_OF = "retry_of"
RESUMED_FROM_EPOCH = "resumed_from_epoch"
PREDICTED_FLOPS = "predicted_flops"
PREDICTED_SECONDS = "predicted_seconds"
OVER_BUDGET = "over_budget"
VAL_CURVE = "val_curve"
HISTORY = "history"
CONFIRM_OF = "confirm_of"
CONFIRM_SEED = "confirm_seed"
CONFIRM_SUFFIX = ".confirm"  # the companion study of confirm runs: "<study>.confirm", in the same storage

STUDY_UID = "study_uid"
STEP_TIMING = "step_timing"  # a study's timings of one machine: "step_timing <host>/<device>"
FORECAST = "forecast"
FINALIZE_CLAIM = "finalize_claim"
UID_TAG = "optuna.study_uid"
TRIAL_NUMBER_TAG = "optuna.trial_number"
PARENT_FILTER = "tags.`study.role` = 'parent'"

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def number_fields(cls: type) -> tuple[str, ...]:
    """The fields of dataclass `cls` that hold a number: annotated int or float, or either or None (a number not
    measured), however the annotation is spelled. A field mixing a number with another type is refused: the
    record could not say what it holds."""
    hints, numbers = typing.get_type_hints(cls), []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        kinds = set(typing.get_args(hint)) - {type(None)} if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}
        if kinds <= {int, float}:
            numbers.append(field.name)
        elif kinds & {int, float}:
            raise TypeError(f"{cls.__name__}.{field.name} is annotated {hint}: a number or None, or no number at all, so the trial record knows what it holds")
    return tuple(numbers)


# Every number a TrainResult holds, less val_accuracy (the trial's value): kept on the trial too, so
# reports and `show` need no MLflow round trip.
RESULT_FIELDS = tuple(name for name in number_fields(TrainResult) if name != "val_accuracy")

# Results recorded under another name before: {old name: the name written now}. Trials and MLflow runs written
# before keep their old name, so every reader takes either (user_attrs).
RENAMED = {"params": "param_count"}


def user_attrs(trial: optuna.trial.FrozenTrial) -> dict:
    """The trial's user attributes, a result recorded under an old name (RENAMED) under the name written now."""
    return {RENAMED.get(key, key): value for key, value in trial.user_attrs.items()}


# What every epoch measures (EpochMetrics less its epoch number): logged to MLflow per epoch, kept in HISTORY.
EPOCH_METRICS = tuple(f.name for f in dataclasses.fields(EpochMetrics) if f.name != "epoch")


def epoch_metric(name: str) -> dict:
    """How the report shows epoch metric `name` (objectives.train.metric): label, unit, curve, column."""
    return next(f.metadata for f in dataclasses.fields(EpochMetrics) if f.name == name)


def val_curve(trial: optuna.trial.FrozenTrial) -> dict[int, float]:
    """Validation accuracy per epoch, whatever the study kind: Optuna's intermediate values, or the curve a trial of a
    multi-objective study keeps instead (VAL_CURVE: Optuna's trial.report is single-objective), epochs counted from 1 alike."""
    if trial.intermediate_values:
        return dict(trial.intermediate_values)
    return dict(enumerate(trial.user_attrs.get(VAL_CURVE) or [], start=1))


def last_val_accuracy(trial: optuna.trial.FrozenTrial) -> float | None:
    """The validation accuracy of the trial's last epoch; None before its first."""
    curve = val_curve(trial)
    return curve[max(curve)] if curve else None


def epoch_values(trial: optuna.trial.FrozenTrial) -> dict[str, dict[int, float]]:
    """Each epoch metric the trial recorded, as {epoch: value}; for a trial recorded without its HISTORY, its
    validation accuracy alone."""
    if HISTORY not in trial.user_attrs:
        return {"val_accuracy": val_curve(trial)}
    history = trial.user_attrs[HISTORY]
    return {name: {epoch["epoch"]: epoch[name] for epoch in history if name in epoch} for name in EPOCH_METRICS}


def config(trial: optuna.trial.FrozenTrial) -> dict:
    """The settings the trial trained with; for a trial recorded without them, its sampled params."""
    return trial.user_attrs.get(CONFIG) or dict(trial.params)


def train_config(trial: optuna.trial.FrozenTrial) -> TrainConfig | None:
    """The TrainConfig the trial trained with, None when it was recorded without one."""
    return TrainConfig.from_dict(trial.user_attrs[CONFIG]) if CONFIG in trial.user_attrs else None


def results(result: TrainResult) -> dict:
    """The user attributes a finished training adds to its trial."""
    return {**{name: getattr(result, name) for name in RESULT_FIELDS}, DEVICE: result.device_name, PEAK_MEMORY_SOURCE: result.peak_memory_source}


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a trial that did not run to its end (interrupted, dead process) once more, with the same params; a
    confirm trial's retry also carries the configuration and seed it trains (they are user attributes, not params)."""
    carried = {key: trial.user_attrs[key] for key in (CONFIRM_OF, CONFIRM_SEED) if key in trial.user_attrs}
    study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number, **carried}, skip_if_exists=False)


def count(n: int, noun: str) -> str:
    """`n` and the noun, singular for one: "1 trial", "3 trials". Every count printed goes through it."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run_name(trial) -> str:
    """A trial's MLflow run name: `trial-<n>` for a search's trial, `confirm-<trial>-seed-<s>` for a confirm trial
    (the search's trial it trains again, with another seed). `trial`: an optuna.Trial or a FrozenTrial."""
    attrs = trial.user_attrs
    if CONFIRM_OF in attrs:
        return f"confirm-{attrs[CONFIRM_OF]}-seed-{attrs[CONFIRM_SEED]}"
    return f"trial-{trial.number}"


def retry_source(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the trial this one repeats, if it is a retry. `failed_trial`: Optuna's own heartbeat
    retry, which studies recorded before `retry` was used everywhere carry. A FrozenTrial (what `get_trials`
    gives): a live optuna.Trial shows no system attributes."""
    return trial.user_attrs.get(RETRY_OF, trial.system_attrs.get("failed_trial"))


def retried(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of the trials queued again."""
    return {retry_source(t) for t in trials} - {None}


def count_done(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Finished trials that use up one of the study's N: not those queued again (interrupted, dead worker)."""
    again = retried(trials)
    return sum(t.state in FINISHED and t.number not in again for t in trials)


# Fashion-MNIST has 10 balanced classes: guessing scores 0.10. A best validation accuracy below 0.20 means the
# networks learned next to nothing, whatever the ranking between them says.
CHANCE_ACCURACY = 0.10
CHANCE_FLAG_BELOW = 0.20


def chance_warnings(trials: list[optuna.trial.FrozenTrial], accuracy_index: int = 0, preset: str | None = None) -> list[str]:
    """One line for a study whose best complete trial is no better than chance, else one per architecture that is
    (a study of several architectures); each with the likely cause read off the trials' configurations. Empty when
    every architecture learned, or nothing completed."""
    groups: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for trial in trials:
        if trial.state == TrialState.COMPLETE and trial.values is not None:
            groups.setdefault(config(trial).get("arch", "?"), []).append(trial)
    if not groups:
        return []
    everything = [t for group in groups.values() for t in group]
    if max(t.values[accuracy_index] for t in everything) < CHANCE_FLAG_BELOW:
        return [_chance_line("the study", everything, accuracy_index, preset)]
    if len(groups) == 1:
        return []
    return [_chance_line(f"architecture {arch}", group, accuracy_index, preset) for arch, group in sorted(groups.items())
            if max(t.values[accuracy_index] for t in group) < CHANCE_FLAG_BELOW]


def _chance_line(who: str, trials: list[optuna.trial.FrozenTrial], accuracy_index: int, preset: str | None) -> str:
    best = max(t.values[accuracy_index] for t in trials)
    configs = [config(t) for t in trials]

    def spread(key: str, fmt: str) -> str:
        values = sorted({c[key] for c in configs if c.get(key) is not None})
        return "" if not values else format(values[0], fmt) if len(values) == 1 else f"{values[0]:{fmt}} to {values[-1]:{fmt}}"

    images = spread("n_train", "d") or "all"
    epochs = spread("epochs", "d")
    budget = f"the budget{f' of preset {preset}' if preset else ''} ({images} training images, {epochs} epoch{'' if epochs == '1' else 's'})"
    return (f"no better than chance: {who}'s best val_accuracy is {best:.4f} over {count(len(trials), 'complete trial')} (chance is "
            f"{CHANCE_ACCURACY:.2f}, 10 classes); likely cause: {budget} or the learning rate (lr {spread('lr', '.3g')})")


def parent_runs(client, experiment_id: str, study_uid: str | None) -> list:
    """MLflow parent runs of the study with this identity (None: a study recorded before identities, whose parent has no tag)."""
    parents = client.search_runs([experiment_id], filter_string=PARENT_FILTER, max_results=1000)
    return [run for run in parents if run.data.tags.get(UID_TAG) == study_uid]


def trial_runs(client, experiment_id: str, parent_run_id: str, number: int | None = None) -> dict[int, list]:
    """The study's trial runs by trial number (a list, so that a duplicate would show); trial `number`'s alone when given.

    This, not the trial's `mlflow_run_id` attribute, is how a run rebuilt after the trial finished is found:
    Optuna cannot change a finished trial's attributes."""
    where = f"tags.`mlflow.parentRunId` = '{parent_run_id}'" + ("" if number is None else f" and tags.`{TRIAL_NUMBER_TAG}` = '{number}'")
    runs: dict[int, list] = {}
    for run in client.search_runs([experiment_id], filter_string=where, max_results=50000):
        runs.setdefault(int(run.data.tags[TRIAL_NUMBER_TAG]), []).append(run)
    return runs


def live_trial_runs(client, experiment_id: str, study_uid: str | None) -> dict[int, object]:
    """The run of each trial of the study with this identity, by trial number, as MLflow holds it now; empty when
    MLflow holds no parent run of the study. What export and the report link, rather than a recorded run id."""
    parents = parent_runs(client, experiment_id, study_uid)
    if not parents:
        return {}
    return {number: runs[0] for number, runs in trial_runs(client, experiment_id, parents[0].info.run_id).items()}
