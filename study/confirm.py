"""`python -m study confirm NAME`: train the study's K best configurations again with S further seeds each.

The confirm trials are trials of a companion Optuna study, `<NAME>.confirm`, in the same storage, run by
the launch's TrialRunner (the same trainer path, MLflow mirroring and failure handling). The seed
(TrainConfig.seed) covers weight initialisation and batch order; the train/validation split is fixed by
objectives.data and never changes. In MLflow the companion is an experiment of its own, `<NAME>.confirm`,
with one parent run (tagged with the original study and its parent run) and one child run per confirm
trial, tagged with the original trial (`confirm.original_trial`, `confirm.original_run_id`) and `seed`.

Running confirm again trains only the (configuration, seed) pairs still missing, so it resumes after an
interruption and extends with a larger --top or --seeds.
"""

from __future__ import annotations

import dataclasses
import uuid

import optuna
from optuna.trial import TrialState
from rich.console import Console

import objectives
from dashboards import record
from dashboards.confirmed import Confirmed, companion_name, confirmed, search_ranking
from study.launch import TrialRunner
from study.pool import InProcess
from study.recovery import recovery_for
from study.session import Session
from study.storage import claim_lock
from study.tracking import Tracker

ACTIVE = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)


def open_companion(session: Session) -> optuna.Study:
    """The companion study of confirm trials: single-objective (validation accuracy), never pruned."""
    study = optuna.create_study(study_name=companion_name(session.study.study_name), storage=session.storage, direction="maximize",
                                load_if_exists=True, sampler=optuna.samplers.RandomSampler(), pruner=optuna.pruners.NopPruner())
    study.set_user_attr("confirm_of_study", session.study.study_name)
    study.set_user_attr("preset", session.settings.preset)
    if record.STUDY_UID not in study.user_attrs:
        study.set_user_attr(record.STUDY_UID, uuid.uuid4().hex)  # its identity in MLflow, as a launched study's
    return study


def _origin(companion: optuna.Study, trial) -> dict:
    """CONFIRM_OF and CONFIRM_SEED of a confirm trial; a trial queued again after an interruption takes them from the one it repeats."""
    attrs = trial.user_attrs
    while record.CONFIRM_OF not in attrs and record.retry_source(trial) is not None:
        trial = companion.get_trials(deepcopy=False)[record.retry_source(trial)]
        attrs = trial.user_attrs
    return {key: attrs[key] for key in (record.CONFIRM_OF, record.CONFIRM_SEED)}


def further_seeds(own: int, count: int) -> list[int]:
    """`count` seeds other than the configuration's own: the next integers after it."""
    return [own + offset for offset in range(1, count + 1)]


def run_confirm(session: Session, uri: str, artifact_root, console: Console, top: int, seeds: int, data_dir: str | None = None) -> list[Confirmed]:
    """Queue and train the missing confirm trials; returns the confirmed ranking."""
    study, storage = session.study, session.storage
    chosen = search_ranking(study)[:top]
    if not chosen:
        raise ValueError(f"study {study.study_name} has no complete trial to confirm; launch it first")
    originals = {trial.number: trial for trial in chosen}
    companion = open_companion(session)
    original_tracker = Tracker(study.study_name, uri, artifact_root=artifact_root, study_uid=study.user_attrs.get(record.STUDY_UID), reopen=False)
    tracker = Tracker(companion.study_name, uri, artifact_root=artifact_root, study_uid=companion.user_attrs[record.STUDY_UID])
    tracker.client.set_tag(tracker.parent_run_id, "confirm.original_study", study.study_name)
    tracker.client.set_tag(tracker.parent_run_id, "confirm.original_parent_run_id", original_tracker.parent_run_id)
    settings = dataclasses.replace(session.settings, objective="accuracy", pruner={"name": "none"})
    companion_session = Session(settings=settings, study=companion, storage=storage)

    def config_for(trial: optuna.Trial) -> objectives.TrainConfig:
        origin = _origin(companion, trial)
        for key, value in origin.items():
            trial.set_user_attr(key, value)
        source = study.get_trials(deepcopy=False)[origin[record.CONFIRM_OF]]
        return dataclasses.replace(record.train_config(source), seed=origin[record.CONFIRM_SEED])

    def run_tags(trial: optuna.Trial) -> dict:
        source = study.get_trials(deepcopy=False)[trial.user_attrs[record.CONFIRM_OF]]
        return {"confirm.original_study": study.study_name, "confirm.original_trial": str(source.number),
                "confirm.original_run_id": source.user_attrs.get(record.MLFLOW_RUN_ID, ""), "seed": str(trial.user_attrs[record.CONFIRM_SEED])}

    runner = TrialRunner(companion_session, tracker, console, log_model="none", config_for=config_for, run_tags=run_tags, cost_history=study)
    recovery_for(companion, storage, tracker, console, settings.plan, runner.track).recover()
    with claim_lock(storage, companion.study_name):
        have = {(o[record.CONFIRM_OF], o[record.CONFIRM_SEED]) for t in companion.get_trials(deepcopy=False, states=ACTIVE)
                if (o := _origin(companion, t))}
        missing = [(number, seed) for number, trial in originals.items()
                   for seed in further_seeds(record.config(trial).get("seed", 0), seeds) if (number, seed) not in have]
        for number, seed in missing:
            companion.enqueue_trial({}, user_attrs={record.CONFIRM_OF: number, record.CONFIRM_SEED: seed}, skip_if_exists=False)
    console.print(f"confirm {study.study_name}: top {len(chosen)} configurations (trials {', '.join(map(str, originals))}) "
                  f"× {seeds} further seeds; {len(missing)} trainings to run, in study {companion.study_name}")
    if missing:
        data = runner.data = objectives.load_fashion_mnist(data_dir)

        def waiting() -> bool:
            return any(t.state == TrialState.WAITING for t in companion.get_trials(deepcopy=False))

        slot = InProcess("auto", data)  # the launcher's own trial slot: this process, its device
        try:
            while (frozen := runner.run_trial(slot, waiting)) is not None:
                value = f"val_accuracy={frozen.value:.4f}" if frozen.state == TrialState.COMPLETE else f"{frozen.state.name} ({frozen.user_attrs.get(record.FAIL_REASON)})"
                console.print(f"confirm trial {frozen.number}: trial {frozen.user_attrs[record.CONFIRM_OF]} with seed "
                              f"{frozen.user_attrs[record.CONFIRM_SEED]} -> {value}")
        except KeyboardInterrupt:
            tracker.close_parent("KILLED")
            raise
    tracker.close_parent("FINISHED")
    return confirmed(study, companion)
