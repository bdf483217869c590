"""MLflow glue on the client API with explicit run ids (no active-run globals).

Layout: one experiment per study, one parent run per study, one nested child run per
trial named `trial-<number>`. Params are the trial's resolved TrainConfig; metrics per
epoch use step = epoch; tags say the Optuna study, trial number, state and why.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time
from pathlib import Path

import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from objectives.train import EpochMetrics, TrainConfig, TrainResult

PROJECT_DIR = Path(__file__).resolve().parent.parent
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_accuracy", "epoch_seconds", "examples_per_second")
# Logged once at the end. val_accuracy, train_loss and train_accuracy are not repeated here: their
# last per-epoch value is the final one, and logging it again would add a second point at that step.
FINAL_METRICS = ("test_accuracy", "train_seconds", "wall_seconds", "flops_per_example", "train_flops", "params", "peak_memory_bytes", "epochs_run")
# Optuna state -> MLflow run status. Pruned trials finished normally; their tag says they were pruned.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED", "INTERRUPTED": "KILLED"}


def tracking_uri(home: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite store beside the study storage."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(home / 'mlflow.db').resolve()}"


def ui_url(uri: str) -> str:
    """Where run links in reports point: the tracking server itself, or `python -m study ui`'s default."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(PROJECT_DIR), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """The MLflow side of one study: its experiment, its parent run, and one child run per trial."""

    def __init__(self, study_name: str, uri: str, artifact_root: Path | None = None):
        self.client = MlflowClient(tracking_uri=uri)
        self.study_name = study_name
        experiment = self.client.get_experiment_by_name(study_name)
        if experiment is None:
            location = (artifact_root / study_name).resolve().as_uri() if artifact_root and not uri.startswith("http") else None
            # The experiment kind makes the MLflow UI open on the runs table, not its GenAI overview.
            self.experiment_id = self.client.create_experiment(study_name, artifact_location=location,
                                                               tags={"mlflow.experimentKind": "custom_model_development"})
        else:
            self.experiment_id = experiment.experiment_id
        self.parent_run_id = self._parent_run()
        self.common_tags = {
            "optuna.study_name": study_name,
            "host": socket.gethostname(),
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda or "none",
            **({"git_commit": commit} if (commit := git_commit()) else {}),
        }

    def _parent_run(self) -> str:
        # A relaunch reuses the study's parent run, so trials from every launch sit under one parent.
        found = self.client.search_runs([self.experiment_id], filter_string="tags.`study.role` = 'parent'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=self.study_name, tags={"study.role": "parent", "optuna.study_name": self.study_name})
        return run.info.run_id

    def describe_study(self, spec_text: str, preset: str, storage: str, sampler: str, pruner: str) -> None:
        params = [Param("preset", preset), Param("sampler", sampler), Param("pruner", pruner)]
        existing = self.client.get_run(self.parent_run_id).data.params
        params = [p for p in params if p.key not in existing]  # params are write-once in MLflow
        self.client.log_batch(self.parent_run_id, params=params, tags=[RunTag("optuna.storage", storage)])
        self.client.log_text(self.parent_run_id, spec_text, "spec.toml")

    def start_trial(self, number: int, config: TrainConfig, sampled: dict) -> str:
        tags = {
            **self.common_tags,
            "mlflow.parentRunId": self.parent_run_id,
            "optuna.trial_number": str(number),
            "optuna.state": "RUNNING",
            "sampled_params": ",".join(sorted(sampled)),
        }
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{number}", tags=tags)
        params = [Param(key, str(value)) for key, value in dataclasses.asdict(config).items()]
        self.client.log_batch(run.info.run_id, params=params)
        return run.info.run_id

    def log_epoch(self, run_id: str, metrics: EpochMetrics) -> None:
        timestamp = _now_ms()
        self.client.log_batch(run_id, metrics=[Metric(key, float(getattr(metrics, key)), timestamp, metrics.epoch) for key in EPOCH_METRICS])

    def finish_trial(self, run_id: str, state: str, result: TrainResult | None = None, reason: str | None = None) -> None:
        """Close a child run: final metrics, state tags, and the MLflow status that matches the Optuna state."""
        tags = [RunTag("optuna.state", "FAIL" if state == "INTERRUPTED" else state)]
        if reason:
            tags.append(RunTag("optuna.fail_reason", reason))
        metrics = []
        if result is not None:
            timestamp = _now_ms()
            metrics = [Metric(key, float(getattr(result, key)), timestamp, result.epochs_run) for key in FINAL_METRICS]
            tags += [RunTag("device", result.device_name), RunTag("peak_memory_source", result.peak_memory_source)]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, status=RUN_STATUS[state])

    def update_parent(self, best_number: int | None, best_value: float | None, counts: dict[str, int]) -> None:
        metrics = [Metric(f"trials_{state.lower()}", float(n), _now_ms(), 0) for state, n in counts.items()]
        tags = []
        if best_number is not None:
            metrics.append(Metric("best_val_accuracy", float(best_value), _now_ms(), 0))
            tags.append(RunTag("best_trial", str(best_number)))
        self.client.log_batch(self.parent_run_id, metrics=metrics, tags=tags)

    def close_parent(self, status: str) -> None:
        self.client.set_terminated(self.parent_run_id, status=status)
