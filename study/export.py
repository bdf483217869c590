"""`python -m study export`: one row per trial, the Optuna side (number, state, values, params, attributes)
joined with the MLflow side (the child run's status, and its metrics that the trial does not hold already,
columns prefixed `mlflow.`).

Column names: `params_<name>` are Optuna's hyperparameters, `param_count` the network's parameter count,
`config.<name>` the resolved TrainConfig, `duration_seconds` the trial's wall time as a number. Every name is
one column: the cost objective of an accuracy,cost study is also a recorded result (`train_seconds`), kept once.

`mlflow_run_id` is the trial's run as MLflow holds it now, found by the study's identity and the trial number
(records): after a rebuilt store, the run written again, not the one the trial recorded."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
from mlflow.tracking import MlflowClient

import records
from dashboards.files import write_whole


def trials_table(study: optuna.Study, uri: str | None) -> pd.DataFrame:
    frame = study.trials_dataframe(attrs=("number", "state", "values", "datetime_start", "datetime_complete", "duration", "params", "user_attrs"))
    if frame.empty:
        return frame
    # Name the objective columns after what they hold.
    cost = study.user_attrs.get("objective", "accuracy").partition(",")[2]
    # Optuna names them value_<metric name> when the study has metric names, else value or values_<i>.
    # A study written by plain Optuna records no cost: its second objective keeps Optuna's name.
    frame = frame.rename(columns={"value": "val_accuracy", "values_0": "val_accuracy", "values_1": cost or "values_1",
                                  **{f"{prefix}_{name}": name for prefix in ("value", "values") for name in study.metric_names or []}})
    frame.columns = [name.removeprefix("user_attrs_") for name in frame.columns]
    # A result recorded under its old name (records.RENAMED, e.g. `params`) joins the column of the name written now.
    frame = _one_column_per_name(frame.rename(columns=records.RENAMED))
    # The per-epoch record is a list per trial, which fits neither CSV nor Parquet: the `mlflow.` columns carry each
    # epoch metric's last value, and MLflow its curve.
    frame = frame.drop(columns=records.HISTORY, errors="ignore")
    frame["duration"] = frame["duration"].dt.total_seconds()  # a number in CSV, not "0 days 00:00:12.3"
    frame = frame.rename(columns={"duration": "duration_seconds"})
    if records.CONFIG in frame.columns:
        # The resolved TrainConfig, one column per setting (a nested dict fits neither CSV nor Parquet).
        settings = pd.DataFrame([value if isinstance(value, dict) else {} for value in frame.pop(records.CONFIG)], index=frame.index)
        frame = frame.join(settings.add_prefix(f"{records.CONFIG}."))
    client = MlflowClient(tracking_uri=uri) if uri else None  # None: no MLflow store yet, and none is created
    experiment = client.get_experiment_by_name(study.study_name) if client else None
    live = records.live_trial_runs(client, experiment.experiment_id, study.user_attrs.get(records.STUDY_UID)) if experiment else {}
    # The id the trial recorded may name a run a rebuilt store no longer holds: the live run's id replaces it.
    frame = frame.drop(columns=records.MLFLOW_RUN_ID, errors="ignore")
    # Only the metrics the trial does not record itself (e.g. the last epoch_seconds), nor one a run logged under its
    # old name (records.RENAMED): no column twice.
    held = {*frame.columns, *records.RENAMED}
    runs = [{"number": number, records.MLFLOW_RUN_ID: run.info.run_id, "mlflow.status": run.info.status,
             **{f"mlflow.{key}": value for key, value in run.data.metrics.items() if key not in held}} for number, run in live.items()]
    mlflow_frame = pd.DataFrame(runs, columns=None if runs else ["number", records.MLFLOW_RUN_ID, "mlflow.status"]).astype({"number": "int64"})
    return frame.merge(mlflow_frame, on="number", how="left")


def _one_column_per_name(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns of the same name made one: an accuracy,cost study's cost objective and the trial's recorded result of
    that name hold the same number; the objective where Optuna keeps values, else the recorded result (a pruned trial
    of a multi-objective study keeps no values, but its measured cost)."""
    merged = {}
    for name in dict.fromkeys(frame.columns):
        same = frame.loc[:, frame.columns == name]
        column = same.iloc[:, 0]
        for index in range(1, same.shape[1]):
            column = column.combine_first(same.iloc[:, index])
        merged[name] = column
    return pd.DataFrame(merged, index=frame.index)


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """CSV or Parquet by the suffix, written whole or not at all (dashboards.files)."""
    if path.suffix == ".parquet":
        write_whole(path, lambda out: frame.to_parquet(out, index=False))
    else:
        write_whole(path, lambda out: out.write(frame.to_csv(index=False).encode()))
