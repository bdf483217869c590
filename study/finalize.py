"""`python -m study finalize NAME`: the chosen configuration trained on train + validation, tested once, registered.

The configuration: `--trial N`, else the confirmed best (`confirm` ran), else the search's best trial. It
trains with `objectives.train`, the one training loop, on the training and validation images together
(FashionMNIST.with_validation_in_train: all 60,000 when the configuration used the whole split; under a
preset with subsets, its training subset plus its validation subset). The validation split that chose
the configuration is therefore inside its training data and reports nothing: the final model is reported
by its test accuracy alone, measured once.

MLflow: a run of its own in the study's experiment, named `final`, tagged `study.role = final` and linked
to the study's parent run and source trial by tags (`study.parent_run_id`, `final.source_trial`,
`final.source_run_id`, `final.chosen_by`); it is not nested under the parent, whose children are the
search's trials. It holds the configuration as params, the per-epoch curves, test_accuracy, the cost, and
the model (Tracker.log_model), registered as `--register NAME` (default `<study>-final`).

The run is FINISHED once its model is logged, and only then registered. Finalize again for the same
configuration registers that finished run (if it is not yet) and trains nothing; Ctrl-C or SIGTERM
(study.interrupts) stops the training at once and closes the run KILLED, so the next finalize trains it
whole and the registered model has one version.

Once means once: finalize holds the study's finalize claim (study.once) from before it looks for a finished run
until it has registered, so two at once train and register once; the second exits 1 naming the host and pid of
the first, and run again later it finds the first one's run. A finalize killed outright (kill -9, a lost machine)
leaves its run RUNNING and its claim behind: the next finalize takes the claim over, closes that run KILLED and
trains once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from mlflow.entities import Metric, Param, RunTag
from optuna.trial import TrialState
from rich.console import Console

import objectives
import records
from dashboards.confirmed import confirmed, load_companion, search_ranking
from study import budget as costs
from study.interrupts import Interrupts
from study.once import claimed, holder
from study.progress import LiveProgress, Training, seconds_left
from study.tracking import Tracker, _now_ms, layer_table_csv

# The epoch metrics of the final run: no val_* ones, as it trains on the validation split too.
FINAL_EPOCH_METRICS = tuple(name for name in records.EPOCH_METRICS if not name.startswith("val_"))


@dataclass(frozen=True)
class Final:
    trial: int            # the source trial
    chosen_by: str        # "--trial", "confirmed best" or "best trial"
    run_id: str
    test_accuracy: float
    n_train: int
    model_uri: str
    registered: str       # "NAME version V"


def choose(study: optuna.Study, number: int | None) -> tuple[optuna.trial.FrozenTrial, str]:
    """The trial whose configuration becomes the final model, and why it was chosen."""
    trials = study.get_trials(deepcopy=False)
    if number is not None:
        if not 0 <= number < len(trials) or trials[number].state != TrialState.COMPLETE:
            raise ValueError(f"--trial {number}: study {study.study_name} has no complete trial {number}; see `python -m study show {study.study_name}`")
        return trials[number], "--trial"
    rows = confirmed(study, load_companion(study))
    if rows:
        return trials[rows[0].trial], "confirmed best"
    ranking = search_ranking(study)
    if not ranking:
        raise ValueError(f"study {study.study_name} has no complete trial; launch it first")
    return ranking[0], "best trial"


def _final_runs(tracker: Tracker, status: str, number: int | None = None, max_results: int = 1000) -> list:
    """This study's final runs in MLflow status `status`; with `number`, only those of trial `number`'s configuration."""
    source = "" if number is None else f" and tags.`final.source_trial` = '{number}'"
    return tracker.client.search_runs([tracker.experiment_id], filter_string=(
        f"tags.`study.role` = 'final' and tags.`study.parent_run_id` = '{tracker.parent_run_id}'{source} and attributes.status = '{status}'"),
        max_results=max_results)


def finished_final(tracker: Tracker, number: int):
    """The FINISHED final run of trial `number`'s configuration that an earlier finalize of this study left; None if none."""
    runs = _final_runs(tracker, "FINISHED", number, max_results=1)
    return runs[0] if runs else None


def close_dead_finals(tracker: Tracker, console: Console, study_name: str, dead: dict | None) -> None:
    """Final runs left RUNNING by a finalize that died, closed KILLED. Only the holder of the study's finalize claim calls
    this, so no live finalize is training them. `dead`: the dead holder's claim, which this process took over."""
    who = f" ({holder(dead)})" if dead else ""
    for run in _final_runs(tracker, "RUNNING"):
        tracker.client.set_tag(run.info.run_id, "final.fail_reason", f"its finalize process died{who}")
        tracker.client.set_terminated(run.info.run_id, status="KILLED")
        console.print(f"finalize {study_name}: run {run.info.run_id} of a finalize that died{who} is closed KILLED")


def run_finalize(study: optuna.Study, uri: str, artifact_root, console: Console, number: int | None, register: str, storage_url: str | None,
                 data_dir: str | None = None, interrupts: Interrupts | None = None) -> Final:
    """Train, test, log and register the final model, or register the one an earlier finalize of the same configuration
    finished, holding the study's finalize claim in `storage_url` meanwhile. `interrupts`: the command's signals, which
    stop it only where nothing is half-written (study.interrupts)."""
    interrupts = interrupts or Interrupts()
    interrupts.check()  # a signal while the command opened the study: stop before writing anything
    source, chosen_by = choose(study, number)
    config = records.train_config(source)
    if config is None:
        raise ValueError(f"trial {source.number} of {study.study_name} does not record its configuration; choose another with --trial")
    final_config = dataclasses.replace(config, n_train=None, n_val=None)  # the merged split is exactly what to train on
    tracker = Tracker(study.study_name, uri, artifact_root=artifact_root, study_uid=study.user_attrs.get(records.STUDY_UID), reopen=False)
    with claimed(storage_url, study.study_name, records.FINALIZE_CLAIM, "finalize") as claim:
        close_dead_finals(tracker, console, study.study_name, claim.dead)
        done = finished_final(tracker, source.number)
        if done is None:
            final = _train_final(study, tracker, console, source, chosen_by, config, final_config, data_dir, interrupts, claim.check)
        else:
            console.print(f"finalize {study.study_name}: trial {source.number}'s configuration ({chosen_by}) was trained on train + validation "
                          f"already, in run {done.info.run_id}; not trained again")
            final = Final(source.number, chosen_by, done.info.run_id, done.data.metrics["test_accuracy"], int(done.data.params["n_train_final"]),
                          done.data.tags["model_uri"], "")
        # Registering a model already registered under this name gives its existing version (Tracker.register_run_model).
        version = tracker.register_run_model(register, final.run_id, f"final model of study {study.study_name}, trial {source.number}'s "
                                             "configuration trained on train + validation", source.number, {"test_accuracy": final.test_accuracy},
                                             dataclasses.asdict(final_config))
        tracker.client.set_tag(tracker.parent_run_id, "final_run_id", final.run_id)
    interrupts.check()  # a signal during the registration: it finished, the command still stops as asked
    return dataclasses.replace(final, registered=f"{register} version {version.version}")


def _forecast(study: optuna.Study, config: objectives.TrainConfig, images: int, data: objectives.FashionMNIST, console: Console) -> costs.Forecast:
    """The final training's time here, from the study's cost model of this machine (timed now if it has none), scaled by
    what its trials measured."""
    model = costs.machine_model(study, [config], data, console, study.get_trials(deepcopy=False))
    return costs.Forecast(1, (dataclasses.replace(config, n_train=images),), model, 1, unit="training")


def _train_final(study: optuna.Study, tracker: Tracker, console: Console, source: optuna.trial.FrozenTrial, chosen_by: str,
                 config: objectives.TrainConfig, final_config: objectives.TrainConfig, data_dir: str | None, interrupts: Interrupts,
                 still_claimed: Callable[[], None]) -> Final:
    """The final run: the configuration trained on train + validation, tested, its model logged; FINISHED, not yet registered.
    `still_claimed` raises if another finalize took the study's claim over while this one trained (Claim.check)."""
    splits = objectives.load_fashion_mnist(data_dir)
    data = splits.with_validation_in_train(config.n_train, config.n_val)
    console.print(f"finalize {study.study_name}: trial {source.number} ({chosen_by}) on {len(data.train_labels):,} training images "
                  f"(train + validation), tested once on {len(data.test_labels[:config.n_test]):,}")
    client = tracker.client
    tags = {**tracker.common_tags, "mlflow.source.name": "python -m study finalize", "study.role": "final",
            "study.parent_run_id": tracker.parent_run_id, "final.source_trial": str(source.number),
            "final.source_run_id": source.user_attrs.get(records.MLFLOW_RUN_ID, ""), "final.chosen_by": chosen_by,
            "mlflow.note.content": f"Trial {source.number}'s configuration ({chosen_by}) trained on train + validation; reported on the test split only."}
    forecast = _forecast(study, final_config, len(data.train_labels), splits, console)  # timed with a validation split, as the trials ran
    console.print(forecast.describe(None, []))
    interrupts.check()  # the last point where stopping leaves nothing behind
    run_id = client.create_run(tracker.experiment_id, run_name="final", tags=tags).info.run_id
    # The launch's progress display: epochs done, the latest training accuracy (there is no validation), predicted time left.
    epochs = final_config.epochs
    def time_left(running: list[Training]) -> str:
        return costs.time_left_field(seconds_left(running, 0, 0.0))

    progress = LiveProgress(console, f"{study.study_name} final", "epochs", epochs, 0, [f"{len(data.train_labels):,} training images", time_left])

    def on_epoch(metrics) -> bool:
        client.log_batch(run_id, metrics=[Metric(key, float(getattr(metrics, key)), _now_ms(), metrics.epoch) for key in FINAL_EPOCH_METRICS])
        progress.epoch("final", metrics.epoch, f"train_loss {metrics.train_loss:.4f}, train_accuracy {metrics.train_accuracy:.4f}")
        progress.update(done=metrics.epoch, status=[f"train_accuracy {metrics.train_accuracy:.4f} (epoch {metrics.epoch})", time_left])
        return False

    try:
        params = [Param(key, str(value)) for key, value in dataclasses.asdict(final_config).items()]
        client.log_batch(run_id, params=[*params, Param("n_train_final", str(len(data.train_labels)))])
        client.log_text(run_id, layer_table_csv(final_config), "layers.csv")
        started = time.monotonic()
        progress.start("final", "final training", epochs, forecast.seconds())
        with interrupts.while_training(), progress:
            result = objectives.train(final_config, data, on_epoch)
            progress.finish("final")  # before the display's last redraw
        interrupts.check()  # stopped as the training ended: its results are not kept, the next finalize trains again
        still_claimed()  # taken over meanwhile: the taker trains, this run is closed FAILED and nothing of it is kept
        console.print(forecast.compare(1, time.monotonic() - started))
        final = {"test_accuracy": result.test_accuracy, "train_seconds": result.train_seconds, "wall_seconds": result.wall_seconds,
                 "train_flops": result.train_flops, "flops_per_example": result.flops_per_example, "param_count": result.param_count,
                 "peak_memory_bytes": result.peak_memory_bytes}
        client.log_batch(run_id, metrics=[Metric(key, float(value), _now_ms(), result.epochs_run) for key, value in final.items()],
                         tags=[RunTag("device", result.device_name), RunTag("precision", result.precision)])
        model_uri = tracker.log_model(run_id, source.number, result, data, name="final")
    except KeyboardInterrupt:
        client.set_terminated(run_id, status="KILLED")
        raise
    except BaseException as error:
        client.set_tag(run_id, "final.fail_reason", f"{type(error).__name__}: {error}".splitlines()[0])
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return Final(source.number, chosen_by, run_id, result.test_accuracy, len(data.train_labels), model_uri, "")
