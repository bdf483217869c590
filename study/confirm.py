"""`python -m study confirm NAME`: train the study's K best configurations again with S further seeds each.

The confirm trials are trials of a companion Optuna study, `<NAME>.confirm`, in the same storage, run by
the launch's TrialRunner (the same trainer path, MLflow mirroring and failure handling). The seed
(TrainConfig.seed) covers weight initialisation and batch order; the train/validation split is fixed by
objectives.data and never changes. In MLflow the companion is an experiment of its own, `<NAME>.confirm`,
with one parent run (tagged with the original study and its parent run) and one child run per confirm
trial, tagged with the original trial (`confirm.original_trial`, `confirm.original_run_id`) and `seed`.

Running confirm again trains only the (configuration, seed) pairs still missing, so it resumes after an
interruption and extends with a larger --top or --seeds. A call trains exactly the pairs it asks for: trials
that an earlier, larger call queued and this one does not ask for are closed as FAIL ("not run: ..."), with a
FAILED MLflow run, so that nothing waits in the queue for good (Optuna can neither delete a queued trial nor
pick which one `ask` takes); a later call that asks for them queues them again. Ctrl-C or SIGTERM
(study.interrupts) stops the training at once, records it as interrupted and queues it again, closes the
parent run KILLED, and leaves no trial RUNNING; the same call again finishes the work.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
import warnings

import optuna
from optuna.trial import TrialState
from rich.console import Console

import objectives
import records
from dashboards.confirmed import Confirmed, companion_name, confirmed, search_ranking
from study import budget as costs
from study.interrupts import Interrupts
from study.launch import TrackingUnavailable, TrialRunner
from study.pool import InProcess
from study.progress import LiveProgress
from study.reconcile import reconcile
from study.recovery import recovery_for
from study.session import Session
from study.storage import claim_lock, mask
from study.tracking import Tracker

TAKEN = (TrialState.COMPLETE, TrialState.RUNNING)  # a (configuration, seed) pair that needs no further trial


def open_companion(session: Session) -> optuna.Study:
    """The companion study of confirm trials: single-objective (validation accuracy), never pruned."""
    study = optuna.create_study(study_name=companion_name(session.study.study_name), storage=session.storage, direction="maximize",
                                load_if_exists=True, sampler=optuna.samplers.RandomSampler(), pruner=optuna.pruners.NopPruner())
    study.set_user_attr("confirm_of_study", session.study.study_name)
    study.set_user_attr("preset", session.settings.preset)
    if records.STUDY_UID not in study.user_attrs:
        study.set_user_attr(records.STUDY_UID, uuid.uuid4().hex)  # its identity in MLflow, as a launched study's
    if study.metric_names != ["val_accuracy"]:  # Optuna's plots and optuna-dashboard name the objective after it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["val_accuracy"])
    return study


def _origin(trials: list[optuna.trial.FrozenTrial], trial: optuna.trial.FrozenTrial) -> tuple[int, int]:
    """(CONFIRM_OF, CONFIRM_SEED) of a confirm trial, one of `trials` (the companion's). A retry carries them
    (records.retry); one queued again before retries did takes them from the trial it repeats."""
    while records.CONFIRM_OF not in trial.user_attrs and records.retry_source(trial) is not None:
        trial = trials[records.retry_source(trial)]
    return trial.user_attrs[records.CONFIRM_OF], trial.user_attrs[records.CONFIRM_SEED]


def _config(study: optuna.Study, number: int, seed: int) -> objectives.TrainConfig:
    """The configuration of the search's trial `number`, with another seed."""
    return dataclasses.replace(records.train_config(study.get_trials(deepcopy=False)[number]), seed=seed)


def further_seeds(own: int, count: int) -> list[int]:
    """`count` seeds other than the configuration's own: the next integers after it."""
    return [own + offset for offset in range(1, count + 1)]


class _Slot(InProcess):
    """The launcher's own trial slot (this process, its device), where a signal stops the training at once."""

    def __init__(self, data: objectives.FashionMNIST, interrupts: Interrupts):
        super().__init__("auto", data)
        self.interrupts = interrupts

    def train(self, config, on_epoch, checkpoint=None, resume=False):
        with self.interrupts.while_training():
            return super().train(config, on_epoch, checkpoint, resume)


def _settle_queue(study: optuna.Study, companion: optuna.Study, storage, wanted: list[tuple[int, int]], asked: str, console: Console) -> int:
    """Leave queued exactly the wanted (trial, seed) pairs that no confirm trial has yet: queue the missing ones, and
    close as FAIL the queued trials this call does not ask for (an earlier, larger call's, their retries, a second
    one of a pair), so that none waits for good and `ask` takes only wanted ones. Returns how many are queued."""
    trials = companion.get_trials(deepcopy=False)
    taken = {_origin(trials, t) for t in trials if t.state in TAKEN}
    queued: set[tuple[int, int]] = set()
    for trial in (t for t in trials if t.state == TrialState.WAITING):
        number, seed = pair = _origin(trials, trial)
        # A queued trial with a fail reason was being closed when its call stopped: it is closed, not run.
        if pair in wanted and pair not in taken | queued and records.FAIL_REASON not in trial.user_attrs:
            queued.add(pair)
            if records.CONFIRM_OF not in trial.user_attrs:  # a retry queued before retries carried them: config_for reads them
                storage.set_trial_user_attr(trial._trial_id, records.CONFIRM_OF, number)
                storage.set_trial_user_attr(trial._trial_id, records.CONFIRM_SEED, seed)
            continue
        reason = trial.user_attrs.get(records.FAIL_REASON) or (
            f"not run: trial {number} with seed {seed} has another confirm trial" if pair in wanted
            else f"not run: {asked} does not ask for trial {number} with seed {seed}")
        attrs = {records.CONFIRM_OF: number, records.CONFIRM_SEED: seed, records.CONFIG: dataclasses.asdict(_config(study, number, seed)),
                 records.FAIL_REASON: reason}
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial._trial_id, key, value)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # its FAILED MLflow run: reconcile writes it
        console.print(f"confirm trial {trial.number}: {reason}; closed as FAIL")
    for pair in wanted:
        if pair not in taken | queued:
            companion.enqueue_trial({}, user_attrs={records.CONFIRM_OF: pair[0], records.CONFIRM_SEED: pair[1]}, skip_if_exists=False)
            queued.add(pair)
    return len(queued)


def _forecast(study: optuna.Study, companion: optuna.Study, configs: list[objectives.TrainConfig], queued: int, data: objectives.FashionMNIST,
              console: Console) -> costs.Forecast:
    """The queued trainings' time here, from the cost model of the search study (its timings of this machine, else timed
    now), scaled by what the search and earlier confirm trials measured."""
    trials = companion.get_trials(deepcopy=False) + study.get_trials(deepcopy=False)
    return costs.Forecast(queued, tuple(configs), costs.machine_model(study, configs, data, console, trials), 1, unit="training")


def _status(study: optuna.Study, companion: optuna.Study, forecast: costs.Forecast, total: int) -> list[str]:
    """The progress display's second line: the best confirm trial so far and the predicted time left."""
    trials = companion.get_trials(deepcopy=False)
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value, default=None)
    shown = f"best val_accuracy {best.value:.4f} (confirm trial {best.number})" if best else "best: none yet"
    return [shown, *forecast.time_left(trials, total, history=study.get_trials(deepcopy=False))]


def run_confirm(session: Session, uri: str, artifact_root, console: Console, top: int, seeds: int, data_dir: str | None = None,
                interrupts: Interrupts | None = None) -> list[Confirmed]:
    """Queue and train the missing confirm trials; returns the confirmed ranking. `interrupts`: the command's signals,
    which stop it only where nothing is half-written (study.interrupts)."""
    interrupts = interrupts or Interrupts()
    interrupts.check()  # a signal while the command opened the study: stop before writing anything
    study, storage = session.study, session.storage
    chosen = search_ranking(study)[:top]
    if not chosen:
        raise ValueError(f"study {study.study_name} has no complete trial to confirm; launch it first")
    originals = {trial.number: trial for trial in chosen}
    wanted = [(number, seed) for number, trial in originals.items() for seed in further_seeds(records.config(trial).get("seed", 0), seeds)]
    companion = open_companion(session)
    original_tracker = Tracker(study.study_name, uri, artifact_root=artifact_root, study_uid=study.user_attrs.get(records.STUDY_UID), reopen=False)
    tracker = Tracker(companion.study_name, uri, artifact_root=artifact_root, study_uid=companion.user_attrs[records.STUDY_UID])
    try:
        tracker.client.set_tag(tracker.parent_run_id, "confirm.original_study", study.study_name)
        tracker.client.set_tag(tracker.parent_run_id, "confirm.original_parent_run_id", original_tracker.parent_run_id)
        settings = dataclasses.replace(session.settings, objective="accuracy", pruner={"name": "none"})
        companion_session = Session(settings=settings, study=companion, storage=storage, heartbeat=session.heartbeat)

        def config_for(trial: optuna.Trial) -> objectives.TrainConfig:
            return _config(study, trial.user_attrs[records.CONFIRM_OF], trial.user_attrs[records.CONFIRM_SEED])

        def run_tags(trial: optuna.Trial) -> dict:
            source = study.get_trials(deepcopy=False)[trial.user_attrs[records.CONFIRM_OF]]
            return {"confirm.original_study": study.study_name, "confirm.original_trial": str(source.number),
                    "confirm.original_run_id": source.user_attrs.get(records.MLFLOW_RUN_ID, ""), "seed": str(trial.user_attrs[records.CONFIRM_SEED])}

        runner = TrialRunner(companion_session, tracker, console, log_model="none", config_for=config_for, run_tags=run_tags, cost_history=study,
                             label="confirm trial")
        recovery_for(companion, storage, tracker, console, settings.plan, runner.track).recover()
        with claim_lock(storage, companion.study_name):
            queued = _settle_queue(study, companion, storage, wanted, f"confirm --top {top} --seeds {seeds}", console)
        reconcile(companion, tracker, settings.plan)  # MLflow runs of the trials closed above, and of any a killed call left behind
        console.print(f"confirm {study.study_name}: top {len(chosen)} configurations (trials {', '.join(map(str, originals))}) "
                      f"× {seeds} further seeds; {queued} trainings to run, in study {companion.study_name}")
        if queued:
            runner.data = objectives.load_fashion_mnist(data_dir)
            slot = _Slot(runner.data, interrupts)
            forecast = _forecast(study, companion, [_config(study, *pair) for pair in wanted], queued, runner.data, console)
            runner.cost_model = forecast.model
            console.print(forecast.describe(None, []))
            total = records.count_done(companion.get_trials(deepcopy=False)) + queued  # what the companion holds once they ran

            def claim() -> bool:
                interrupts.check()  # a signal held since the last trial: stop before asking for another
                return not runner.stopping.is_set() and any(t.state == TrialState.WAITING for t in companion.get_trials(deepcopy=False))

            # The launch's progress display: trainings done of those queued, best so far, predicted time left.
            started, ran = time.monotonic(), 0
            with LiveProgress(console, companion.study_name, "trainings", queued, 0, _status(study, companion, forecast, total)) as progress:
                runner.progress = progress
                while (frozen := runner.run_trial(slot, claim)) is not None:
                    ran += 1
                    value = f"val_accuracy={frozen.value:.4f}" if frozen.state == TrialState.COMPLETE else f"{frozen.state.name} ({frozen.user_attrs.get(records.FAIL_REASON)})"
                    progress.console.print(f"confirm trial {frozen.number}: trial {frozen.user_attrs[records.CONFIRM_OF]} with seed "
                                           f"{frozen.user_attrs[records.CONFIRM_SEED]} -> {value}")
                    progress.update(done=ran, status=_status(study, companion, forecast, total))
            if ran:
                console.print(forecast.compare(ran, time.monotonic() - started))
            if runner.tracking_error is not None:
                raise TrackingUnavailable(f"MLflow at {mask(uri)} failed ({runner.tracking_error}); the confirm trials are kept in the Optuna "
                                          "storage; confirm again once MLflow is back and their MLflow records are written then")
        interrupts.check()
    except KeyboardInterrupt:
        tracker.close_parent_on_exit("KILLED")
        raise
    except Exception:
        tracker.close_parent_on_exit("FAILED")  # a failed trial is already recorded FAIL with its reason
        raise
    tracker.close_parent("FINISHED")
    return confirmed(study, companion)
