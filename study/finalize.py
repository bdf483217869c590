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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import optuna
from mlflow.entities import Metric, Param, RunTag
from optuna.trial import TrialState
from rich.console import Console

import objectives
from dashboards import record
from dashboards.confirmed import confirmed, load_companion, search_ranking
from study.tracking import Tracker, _now_ms, layer_table_csv

FINAL_EPOCH_METRICS = ("train_loss", "train_accuracy", "epoch_seconds", "examples_per_second")  # no val_accuracy: there is no validation split


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


def run_finalize(study: optuna.Study, uri: str, artifact_root, console: Console, number: int | None, register: str,
                 data_dir: str | None = None) -> Final:
    source, chosen_by = choose(study, number)
    config = record.train_config(source)
    if config is None:
        raise ValueError(f"trial {source.number} of {study.study_name} does not record its configuration; choose another with --trial")
    data = objectives.load_fashion_mnist(data_dir).with_validation_in_train(config.n_train, config.n_val)
    final_config = dataclasses.replace(config, n_train=None, n_val=None)  # the merged split is exactly what to train on
    console.print(f"finalize {study.study_name}: trial {source.number} ({chosen_by}) on {len(data.train_labels):,} training images "
                  f"(train + validation), tested once on {len(data.test_labels[:config.n_test]):,}")
    tracker = Tracker(study.study_name, uri, artifact_root=artifact_root, study_uid=study.user_attrs.get(record.STUDY_UID), reopen=False)
    client = tracker.client
    tags = {**tracker.common_tags, "mlflow.source.name": "python -m study finalize", "study.role": "final",
            "study.parent_run_id": tracker.parent_run_id, "final.source_trial": str(source.number),
            "final.source_run_id": source.user_attrs.get(record.MLFLOW_RUN_ID, ""), "final.chosen_by": chosen_by,
            "mlflow.note.content": f"Trial {source.number}'s configuration ({chosen_by}) trained on train + validation; reported on the test split only."}
    run_id = client.create_run(tracker.experiment_id, run_name="final", tags=tags).info.run_id
    params = [Param(key, str(value)) for key, value in dataclasses.asdict(final_config).items()]
    client.log_batch(run_id, params=[*params, Param("n_train_final", str(len(data.train_labels)))])
    client.log_text(run_id, layer_table_csv(final_config), "layers.csv")

    def on_epoch(metrics) -> bool:
        client.log_batch(run_id, metrics=[Metric(key, float(getattr(metrics, key)), _now_ms(), metrics.epoch) for key in FINAL_EPOCH_METRICS])
        console.print(f"epoch {metrics.epoch}: train_loss {metrics.train_loss:.4f}, train_accuracy {metrics.train_accuracy:.4f}")
        return False

    try:
        result = objectives.train(final_config, data, on_epoch)
    except KeyboardInterrupt:
        client.set_terminated(run_id, status="KILLED")
        raise
    except BaseException as error:
        client.set_tag(run_id, "final.fail_reason", f"{type(error).__name__}: {error}".splitlines()[0])
        client.set_terminated(run_id, status="FAILED")
        raise
    final = {"test_accuracy": result.test_accuracy, "train_seconds": result.train_seconds, "wall_seconds": result.wall_seconds,
             "train_flops": result.train_flops, "flops_per_example": result.flops_per_example, "params": result.params,
             "peak_memory_bytes": result.peak_memory_bytes}
    client.log_batch(run_id, metrics=[Metric(key, float(value), _now_ms(), result.epochs_run) for key, value in final.items()],
                     tags=[RunTag("device", result.device_name), RunTag("precision", result.precision)])
    model_uri = tracker.log_model(run_id, source.number, result, data, name="final")
    client.set_terminated(run_id, status="FINISHED")
    version = tracker.register_run_model(register, run_id, f"final model of study {study.study_name}, trial {source.number}'s configuration "
                                         "trained on train + validation", source.number, {"test_accuracy": result.test_accuracy},
                                         dataclasses.asdict(final_config))
    client.set_tag(tracker.parent_run_id, "final_run_id", run_id)
    return Final(source.number, chosen_by, run_id, result.test_accuracy, len(data.train_labels), model_uri, f"{register} version {version.version}")
