"""`python -m study export`: one row per trial, the Optuna side (number, state, values, params, attributes)
joined with the MLflow side (the child run's status and latest metrics, columns prefixed `mlflow.`)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
from mlflow.tracking import MlflowClient

from dashboards import record


def trials_table(study: optuna.Study, uri: str) -> pd.DataFrame:
    frame = study.trials_dataframe(attrs=("number", "state", "values", "datetime_start", "datetime_complete", "duration", "params", "user_attrs"))
    if frame.empty:
        return frame
    # Name the objective columns after what they hold.
    cost = study.user_attrs.get("objective", "accuracy").partition(",")[2]
    frame = frame.rename(columns={"value": "val_accuracy", "values_0": "val_accuracy", "values_1": cost})
    frame.columns = [name.removeprefix("user_attrs_") for name in frame.columns]
    if record.CONFIG in frame.columns:
        # The resolved TrainConfig, one column per setting (a nested dict fits neither CSV nor Parquet).
        settings = pd.DataFrame([value if isinstance(value, dict) else {} for value in frame.pop(record.CONFIG)], index=frame.index)
        frame = frame.join(settings.add_prefix(f"{record.CONFIG}."))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(study.study_name)
    runs = []
    if experiment is not None:
        found = client.search_runs([experiment.experiment_id], filter_string="tags.`optuna.trial_number` != ''", max_results=50000)
        runs = [{record.MLFLOW_RUN_ID: run.info.run_id, "mlflow.status": run.info.status,
                 **{f"mlflow.{key}": value for key, value in run.data.metrics.items()}} for run in found]
    mlflow_frame = pd.DataFrame(runs, columns=[record.MLFLOW_RUN_ID, "mlflow.status"] if not runs else None)
    if record.MLFLOW_RUN_ID not in frame.columns:
        frame[record.MLFLOW_RUN_ID] = None
    return frame.merge(mlflow_frame, on=record.MLFLOW_RUN_ID, how="left")


def write_table(frame: pd.DataFrame, path: Path) -> None:
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
