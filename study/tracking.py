"""MLflow glue on the client API with explicit run ids (no active-run globals).

Layout: one experiment per study, one parent run per study, one nested child run per
trial named `trial-<number>` (a confirm trial `confirm-<trial>-seed-<s>`). Params are the trial's resolved TrainConfig; metrics per
epoch use step = epoch; tags say the Optuna study, trial number, state and why, device,
torch/CUDA versions, project version and git commit. Each child run also holds its
dataset input (Fashion-MNIST: digest and split sizes) and its layer table; chosen trials
hold their trained network as an MLflow PyTorch model (a LoggedModel linked to the run)
and a confusion matrix on the test split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import random
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import records
from dashboards.files import slug
from objectives.data import FashionMNIST, cache_root
from objectives.models import get_architecture
from objectives.train import EpochMetrics, TrainConfig, TrainResult, resolve_device
from study.mlflow_app import APP_NAME, MODEL_TRAINING
from study.storage import home_holds_tracking, mask, pid_alive

PROJECT_DIR = Path(__file__).resolve().parent.parent
EPOCH_METRICS = records.EPOCH_METRICS
# Logged once at the end: the trial's recorded results, less the per-epoch metrics, whose last value is the
# final one (logging it again would add a second point at that step).
FINAL_METRICS = tuple(name for name in records.RESULT_FIELDS if name not in EPOCH_METRICS)
# Optuna state -> MLflow run status. Pruned trials finished normally; their tag says they were pruned.
# The settings a registered version's description and tags name.
REGISTRY_CONFIG = ("arch", "resize", "ratio", "lr", "epochs", "batch_size", "momentum", "n_train")
# Said once per launch that logs models, in place of MLflow's warning at every save.
PICKLE_NOTE = ("models are logged as pickled PyTorch modules (mlflow.pytorch.load_model gives the nn.Module back); "
               "like any pickle, load them only from a tracking store you trust")
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED", "INTERRUPTED": "KILLED"}


MLFLOW_WAIT = 60  # seconds a command waits for a tracking server to answer /health and then its API, before anything is written
MLFLOW_WAIT_ENV = "STUDY_MLFLOW_WAIT"  # the environment's bound, which --mlflow-wait overrides
API_PROBE = "api/2.0/mlflow/experiments/search"  # a cheap call that reads the tracking store, as MLflow's client does


class TrackingUnreachable(ConnectionError):
    """The MLflow tracking store cannot be reached or opened."""


def mlflow_wait(flag: float | None = None) -> float:
    """How long to wait for a tracking server: --mlflow-wait, else $STUDY_MLFLOW_WAIT, else MLFLOW_WAIT. Sized for a
    server busy with a crowd of workers starting at once, which answers late rather than never."""
    if flag is not None:
        return flag
    text = os.environ.get(MLFLOW_WAIT_ENV, "").strip()
    if not text:
        return MLFLOW_WAIT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        raise ValueError(f"{MLFLOW_WAIT_ENV}={text!r}: give the seconds to wait for the MLflow server, a number > 0 (default: {MLFLOW_WAIT})")
    return value


def check_reachable(uri: str, wait: float | None = None) -> None:
    """Before a command uses the tracking store (a launch, before it writes anything): a tracking server answers, an
    existing local store opens. A server gets `wait` seconds in all (mlflow_wait), /health and its API together."""
    if uri.startswith(("http://", "https://")):
        wait = mlflow_wait(wait)
        deadline = time.monotonic() + wait
        try:
            ask_server(f"{uri.rstrip('/')}/health", deadline)
        except OSError as error:
            why = getattr(error, "reason", None) or error
            raise TrackingUnreachable(f"MLflow server {mask(uri)} does not answer within {wait:g} s ({mask(str(why))}); start it, wait longer "
                                      f"(--mlflow-wait or {MLFLOW_WAIT_ENV}), or unset MLFLOW_TRACKING_URI to use the local store") from None
        _check_api_answers(uri, deadline, wait)
    elif uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite:///")).exists():
        open_sqlite_store(Path(uri.removeprefix("sqlite:///")))


def _check_api_answers(uri: str, deadline: float, wait: float) -> None:
    """The server answers its REST API too, by `deadline`.

    /health is served without the tracking store, so a server whose database hangs (or a proxy in front of a dead
    one) passes it; then every MLflow call waits out its timeout and retries (20 s each under the CLI's
    MLFLOW_HTTP_DEFAULTS), minutes in all. Any HTTP answer counts (an auth server's 401 too: MLflow's own client
    sends the credentials and reports a refusal itself).
    """
    import urllib.error

    try:
        ask_server(f"{uri.rstrip('/')}/{API_PROBE}", deadline, body=b'{"max_results": 1}')
    except urllib.error.HTTPError:
        pass  # an answer
    except OSError as error:
        why = getattr(error, "reason", None) or error
        raise TrackingUnreachable(f"MLflow server {mask(uri)} answers /health but not its API (POST /{API_PROBE}) within {wait:g} s "
                                  f"({mask(str(why))}); check the server and its database, wait longer (--mlflow-wait or {MLFLOW_WAIT_ENV}), "
                                  "or unset MLFLOW_TRACKING_URI to use the local store") from None


def ask_server(url: str, deadline: float, body: bytes | None = None) -> None:
    """A request to an HTTP server (a JSON POST when `body` is given), answered whole (status, headers, body) by
    `deadline` (time.monotonic()); tried again, with backoff and jitter, while the server refuses or drops the
    connection, so that workers starting together spread out rather than retry in step. urllib.error.HTTPError for
    an error status (an answer: not tried again), else the last failure once the deadline passed (TimeoutError for
    a server that never answered whole)."""
    import urllib.error

    pause = 0.25
    while True:
        try:
            _ask_once(url, body, deadline - time.monotonic())
            return
        except urllib.error.HTTPError:
            raise
        except OSError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            time.sleep(min(left, pause * random.uniform(0.5, 1.5)))
            pause = min(2 * pause, 4.0)


def _ask_once(url: str, body: bytes | None, seconds: float) -> None:
    """One request, answered whole within `seconds` of its start.

    A socket timeout bounds each read, not the request: a server sending a byte every few seconds would hold it for
    ever. So the request runs in a thread of its own, waited for until the deadline; a thread still waiting then is
    left behind (a daemon: it never holds the process) and ends when the server closes the connection. Credentials in
    the URL (user:password@) go as HTTP basic auth, as MLflow's own client sends them.
    """
    import base64
    import threading
    import urllib.request

    if seconds <= 0:
        raise TimeoutError("timed out")
    parts = urllib.parse.urlsplit(url)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if parts.username is not None or parts.password is not None:
        pair = f"{urllib.parse.unquote(parts.username or '')}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
    request = urllib.request.Request(urllib.parse.urlunsplit(parts), data=body, headers=headers)
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            with urllib.request.urlopen(request, timeout=seconds) as response:
                response.read()
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 -- raised again in the caller's thread
            outcome.append(error)

    asking = threading.Thread(target=ask, name=f"ask {parts.netloc}", daemon=True)
    asking.start()
    asking.join(seconds)
    if not outcome:
        raise TimeoutError("timed out")
    if outcome[0] is not None:
        raise outcome[0]


def open_sqlite_store(path: Path) -> None:
    """Create a new local MLflow store whole, or fail in one line on one left half-made.

    MLflow builds a SQLite store in many steps (tables, then a chain of migrations); a process killed in
    between leaves a file every later start fails on, and two first launches racing corrupt each other.
    So the store is built under a temporary name and linked into place in one step: of two racing
    launches one store wins, the other is discarded before anything was written to it.
    """
    # MLflow logs each creation step, and a failed one with its traceback: the one line below says it all.
    quiet = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        _create_whole(path)
        MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 -- sqlalchemy and alembic raise many types for a damaged store
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise TrackingUnreachable(f"MLflow store {path} cannot be opened ({first_line[:200]}); it was probably left half-made by an "
                                  "interrupted first launch: move it away and launch again (the Optuna storage keeps every trial, "
                                  "and the next launch writes their MLflow runs again)") from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def _create_whole(path: Path) -> None:
    if path.exists():
        return
    building = _building_name(path)
    try:
        _copy_empty_store(building)
        try:
            os.link(building, path)
        except FileExistsError:
            pass  # another launch created it first
    finally:
        building.unlink(missing_ok=True)


def _building_name(path: Path) -> Path:
    """A name of this process's own to build `path` under; what processes killed while building left is removed."""
    for left in path.parent.glob(f".{path.name}.building-*"):
        if not pid_alive(int(left.name.split("-")[1])):
            left.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.building-{os.getpid()}-{time.monotonic_ns()}")


def _copy_empty_store(path: Path) -> None:
    """An empty MLflow store at `path`, copied from one built once per MLflow version in the user's cache: building
    one runs MLflow's 200-odd schema migrations, 1-2 s for every new study home. Built in place where the cache
    cannot be written."""
    import shutil

    import mlflow

    template = cache_root() / f"mlflow-{mlflow.__version__}-empty.db"
    if not template.exists():
        building = _building_name(template)
        try:
            template.parent.mkdir(parents=True, exist_ok=True)
            MlflowClient(tracking_uri=f"sqlite:///{building}").search_experiments(max_results=1)
            os.replace(building, template)  # whole or absent: racing launches each build their own, one wins
        except Exception:  # noqa: BLE001 -- a cache we cannot write (read-only home, full disk): build the store itself
            building.unlink(missing_ok=True)
            MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)
            return
    shutil.copyfile(template, path)


def tracking_uri(home: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite store beside the study storage."""
    return f"sqlite:///{(home / 'mlflow.db').resolve()}" if home_holds_tracking() else os.environ["MLFLOW_TRACKING_URI"]


def read_only_uri(home: Path) -> str | None:
    """The tracking store as the commands that only read open it: a server must answer (check_reachable), and the
    local SQLite store is opened in SQLite's read-only mode, so that nothing MLflow does on opening it (creating
    the file, its tables, the default experiment) can write. None when that store does not exist yet: there is
    no MLflow run to read, and nothing is created."""
    from urllib.parse import quote

    uri = tracking_uri(home)
    if not uri.startswith("sqlite:///"):
        check_reachable(uri)
        return uri
    path = Path(uri.removeprefix("sqlite:///"))
    if not path.exists():
        return None
    # An SQLite URI filename with every "/" escaped (SQLite decodes it), quoted once more for SQLAlchemy, which decodes
    # that layer: MLflow makes the parent directories of the database path SQLAlchemy reads, and with no "/" left in
    # that path its parent is the working directory, which exists (escaped once only, "file:/home" became a folder).
    read_only = f"sqlite:///{quote('file:' + quote(str(path), safe=''), safe='')}?mode=ro&uri=true"
    try:
        MlflowClient(tracking_uri=read_only).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 -- sqlalchemy and alembic raise many types for a damaged store
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise TrackingUnreachable(f"MLflow store {path} cannot be read ({first_line[:200]}); if an interrupted first launch left it "
                                  "half-made, move it away: the next launch writes the runs again") from None
    return read_only


def ui_url(uri: str) -> str:
    """Where run links in reports point: the tracking server itself, or `python -m study ui`'s default. Without the
    URI's credentials (the browser asks for them), and masked like every URL the platform shows."""
    if not uri.startswith(("http://", "https://")):
        return "http://127.0.0.1:5000"
    parts = urllib.parse.urlsplit(uri)
    return mask(urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))).rstrip("/")


# The MLflow UI's first view of a study, kept on its experiment as a shared view state (what the UI's "share"
# button stores, tag `mlflow.sharedViewState.<key>`, opened by `?viewStateShareKey=<key>`): the runs ordered
# by val_accuracy, which lists the trials flat rather than folded under the parent run, and the charts opening
# on the per-epoch curves; the UI adds a chart for every other metric below them.
VIEW_KEY = "trials"
CURVES = ("val_accuracy", *(name for name in EPOCH_METRICS if name != "val_accuracy"))


def first_view() -> str:
    def line(metric: str) -> dict:
        return {"uuid": f"curve-{metric}", "type": "LINE", "runsCountToCompare": 10, "metricSectionId": "curves", "deleted": False,
                "isGenerated": False, "displayName": metric, "metricKey": metric, "selectedMetricKeys": [metric], "lineSmoothness": 0,
                "xAxisScaleType": "linear", "scaleType": "linear", "range": {}, "xAxisKey": "step", "selectedXAxisMetricKey": "",
                "yAxisKey": "METRIC", "yAxisExpressions": [], "ignoreOutliers": False, "useGlobalXaxisKey": False, "useGlobalLineSmoothing": True}

    sections = [{"uuid": "curves", "name": "Per-epoch curves", "display": True, "isReordered": False, "deleted": False, "isGenerated": False},
                {"uuid": "model-metrics", "name": "Model metrics", "display": True, "isReordered": False, "deleted": False, "isGenerated": True}]
    return json.dumps({"orderByKey": "metrics.`val_accuracy`", "orderByAsc": False, "compareRunCharts": [line(m) for m in CURVES],
                       "compareRunSections": sections, "isAccordionReordered": True})


# MLflow 3's UI shows a page in its model-training view or its GenAI view by the `workflowType` of the page's
# address, else by the choice its sidebar switch stored in the browser (localStorage `mlflow.workflowType_v1`),
# else GenAI. The UI ignores the experiment's `mlflow.experimentKind` tag there. `study ui` serves MLflow with the
# app of study/mlflow_app.py, which stores the model-training choice in a browser that has none; every address we
# print or write carries the view too, for an `mlflow server` of someone else's (MLFLOW_TRACKING_URI).
MODEL_TRAINING_VIEW = f"workflowType={MODEL_TRAINING}"
# For the pages of such a server that no printed address reaches (the home page first): the one click that stores
# the choice, unless that server runs this project's app.
MODEL_TRAINING_CLICK = ('other pages of that server (its home page first) open in its GenAI view until you click "Model training"\n'
                        f"at the top of the sidebar on such a page (the browser keeps that choice), unless that server runs with --app-name {APP_NAME}")


def ui_links(client: MlflowClient, base: str) -> list[tuple[str, str]]:
    """(what, link) in the MLflow UI at `base`, each in its model-training view: every study's experiment at its
    first view (VIEW_KEY), and the latest version of every registered model."""
    links = []
    for experiment in client.search_experiments():
        if experiment.name == "Default":
            continue
        view = f"viewStateShareKey={VIEW_KEY}&" if f"mlflow.sharedViewState.{VIEW_KEY}" in experiment.tags else ""
        links.append((experiment.name, f"{base}/#/experiments/{experiment.experiment_id}/runs?{view}compareRunsMode=CHART&{MODEL_TRAINING_VIEW}"))
    for model in client.search_registered_models():
        if model.latest_versions:
            version = max(int(v.version) for v in model.latest_versions)
            links.append((f"model {model.name} v{version}", f"{base}/#/models/{urllib.parse.quote(model.name, safe='')}/versions/{version}?{MODEL_TRAINING_VIEW}"))
    return links


def project_version() -> str:
    try:
        return importlib.metadata.version("cnn-study")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def device_name(device: str) -> str:
    resolved = resolve_device(device)
    return torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else resolved.type


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in some containers
        return "unknown"


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

    def __init__(self, study_name: str, uri: str, artifact_root: Path | None = None, study_uid: str | None = None, reopen: bool = True):
        if uri.startswith("sqlite:///"):
            open_sqlite_store(Path(uri.removeprefix("sqlite:///")))
        self.client = MlflowClient(tracking_uri=uri)
        self.study_name, self.study_uid = study_name, study_uid
        self.other_studies = 0  # parent runs of other studies of this name (other storages) in the experiment
        experiment = self.client.get_experiment_by_name(study_name)
        if experiment is None:
            location = (artifact_root / slug(study_name)).resolve().as_uri() if artifact_root and not uri.startswith("http") else None
            # The kind MLflow gives model-training experiments; MLflow 3.18's UI picks its view by
            # MODEL_TRAINING_VIEW or the browser's stored choice, not by this tag.
            self.experiment_id = self.client.create_experiment(study_name, artifact_location=location,
                                                               tags={"mlflow.experimentKind": "custom_model_development"})
        else:
            self.experiment_id = experiment.experiment_id
        self.client.set_experiment_tag(self.experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", first_view())
        self.parent_run_id = self._parent_run(reopen)
        self.common_tags = {
            "optuna.study_name": study_name,
            "host": socket.gethostname(),
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda or "none",
            "project_version": project_version(),
            "mlflow.source.name": "python -m study launch",  # what the UI shows as the run's source
            "mlflow.user": _user(),
            # mlflow.source.git.commit is the tag the MLflow UI shows on the run page.
            **({"git_commit": commit, "mlflow.source.git.commit": commit} if (commit := git_commit()) else {}),
        }

    def _parent_run(self, reopen: bool = True) -> str:
        """The study's parent run, found by the study's identity, not its name alone; a relaunch reuses it, so
        trials from every launch sit under one parent. reopen=False: only read it (confirm and finalize link to
        it without running the study)."""
        mine = records.parent_runs(self.client, self.experiment_id, self.study_uid)
        if mine:
            run_id = mine[0].info.run_id
            if reopen:
                self.client.update_run(run_id, status="RUNNING")
            return run_id
        self.other_studies = len(self.client.search_runs([self.experiment_id], filter_string=records.PARENT_FILTER, max_results=1000))
        tags = {"study.role": "parent", "optuna.study_name": self.study_name, **({records.UID_TAG: self.study_uid} if self.study_uid else {})}
        return self.client.create_run(self.experiment_id, run_name=self.study_name, tags=tags).info.run_id

    def describe_study(self, spec_text: str, preset: str, storage: str, sampler: str, pruner: str) -> None:
        params = [Param("preset", preset), Param("sampler", sampler), Param("pruner", pruner)]
        existing = self.client.get_run(self.parent_run_id).data.params
        params = [p for p in params if p.key not in existing]  # params are write-once in MLflow
        note = (f"Optuna study **{self.study_name}** (preset {preset}, {sampler}, {pruner}); one nested run per trial. "
                "The spec is the artifact spec.toml; best_trial and the best_* metrics follow the study as it runs.")
        tags = [RunTag("optuna.storage", mask(storage)), RunTag("mlflow.note.content", note),  # MLflow keeps no secret
                *(RunTag(key, value) for key, value in self.common_tags.items() if key != "host")]
        self.client.log_batch(self.parent_run_id, params=params, tags=tags)
        self.client.log_text(self.parent_run_id, spec_text, "spec.toml")

    def start_trial(self, number: int, name: str, config: TrainConfig, sampled: dict, data: FashionMNIST | None = None,
                    extra_tags: dict | None = None) -> str:
        """Open a trial's child run, named `name` (records.run_name): tags, every setting as a param, its layer table and its dataset input."""
        tags = {
            **(extra_tags or {}),
            **self.common_tags,
            "mlflow.parentRunId": self.parent_run_id,
            "optuna.trial_number": str(number),
            "optuna.state": "RUNNING",
            "sampled_params": ",".join(sorted(sampled)),
            "device": device_name(config.device),
        }
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        params = [Param(key, str(value)) for key, value in dataclasses.asdict(config).items()]
        self.client.log_batch(run_id, params=params)
        self.client.log_text(run_id, layer_table_csv(config), "layers.csv")
        if data is not None:
            dataset = dataset_input(data, config)
            try:
                self.client.log_inputs(run_id, datasets=[dataset])
            except MlflowException as error:
                # MLflow looks for the dataset, then inserts it: of two first trials at once (two launches, or
                # workers on other machines) one is refused by the unique key (a bad request), and links the other's
                # dataset now. A store that does not answer is not asked twice.
                if error.error_code != "BAD_REQUEST":
                    raise
                self.client.log_inputs(run_id, datasets=[dataset])
        return run_id

    def log_epoch(self, run_id: str, metrics: EpochMetrics) -> None:
        timestamp = _now_ms()
        self.client.log_batch(run_id, metrics=[Metric(key, float(getattr(metrics, key)), timestamp, metrics.epoch) for key in EPOCH_METRICS])

    def finish_trial(self, run_id: str, state: str, result: TrainResult | None = None, reason: str | None = None) -> None:
        """Close a child run: final metrics, state tags, and the MLflow status that matches the Optuna state."""
        tags = [RunTag("optuna.state", "FAIL" if state == "INTERRUPTED" else state)]
        if reason:
            tags.append(RunTag("optuna.fail_reason", reason))
        if state == "PRUNED" and result is not None:
            reason = f"pruned after epoch {result.epochs_run} at val_accuracy {result.val_accuracy:.4f}"
        if reason:
            tags.append(RunTag("optuna.state_reason", reason))
        # The run page's description: the outcome in one sentence.
        note = f"Optuna state {tags[0].value}"
        if result is not None:
            note += (f": val_accuracy {result.val_accuracy:.4f}, test_accuracy {result.test_accuracy:.4f} after {records.count(result.epochs_run, 'epoch')} "
                     f"({result.train_seconds:.1f} s of training on {result.device_name})")
        tags.append(RunTag("mlflow.note.content", note + (f"; {reason}" if reason else "")))
        metrics = []
        if result is not None:
            timestamp = _now_ms()
            metrics = [Metric(key, float(getattr(result, key)), timestamp, result.epochs_run) for key in FINAL_METRICS]
            tags += [RunTag("device", result.device_name), RunTag("peak_memory_source", result.peak_memory_source),
                     RunTag("precision", result.precision), RunTag("channels_last", str(result.channels_last)),
                     RunTag("cuda_graph", str(result.cuda_graph))]  # as resolved from "auto"
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, status=RUN_STATUS[state])

    def trial_run_id(self, number: int, recorded: str | None) -> str | None:
        """Trial `number`'s run under this study's parent as MLflow holds it now, else the id the trial `recorded`: a
        rebuilt store holds a run written again, whose id the finished trial cannot record."""
        runs = records.trial_runs(self.client, self.experiment_id, self.parent_run_id, number).get(number)
        return runs[0].info.run_id if runs else recorded

    def update_parent(self, best_number: int | None, best_value: float | None, counts: dict[str, int],
                      best_metrics: dict[str, float] | None = None, best_run_id: str | None = None) -> None:
        """The study so far; step = finished trials, so the parent's charts show the best value as the study goes.
        `best_run_id`: the run id the best trial recorded."""
        step, now = sum(counts.values()), _now_ms()
        metrics = [Metric(f"trials_{state.lower()}", float(n), now, step) for state, n in counts.items()]
        tags = []
        if best_number is not None:
            metrics.append(Metric("best_val_accuracy", float(best_value), now, step))
            metrics += [Metric(f"best_{key}", float(value), now, step) for key, value in (best_metrics or {}).items()]
            tags.append(RunTag("best_trial", str(best_number)))
            if run_id := self.trial_run_id(best_number, best_run_id):
                tags.append(RunTag("best_trial_run_id", run_id))
        self.client.log_batch(self.parent_run_id, metrics=metrics, tags=tags)

    def log_model(self, run_id: str, number: int, result: TrainResult, data: FashionMNIST, name: str | None = None) -> str:
        """The trial's trained network as an MLflow PyTorch model, and its confusion matrix on the test split.

        MLflow 3 keeps models as LoggedModels beside runs; the client API below does what
        mlflow.pytorch.log_model does for an active run, with explicit ids. Returns the model's URI,
        `models:/<model_id>`, which mlflow.pytorch.load_model and the model registry accept.
        """
        import mlflow.pytorch
        from mlflow.models import Model, infer_signature

        from objectives.predict import confusion_matrix, model_inputs, predict

        config = result.config
        resize = config.resize or get_architecture(config.arch).default_resize
        model = result.model.to("cpu").eval()  # loadable on machines without the training device
        test = data.subset(n_test=config.n_test)
        example = model_inputs(test.test_images[:4], resize)
        with torch.inference_mode():
            signature = infer_signature(example.numpy(), model(example).numpy())
        params = {key: str(value) for key, value in dataclasses.asdict(config).items()}
        name = name or f"trial-{number}"
        logged = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=run_id, params=params,
                                                 tags={"optuna.study_name": self.study_name, "optuna.trial_number": str(number)}, model_type="pytorch")
        metadata = {"input": f"float32 images (N, 1, {resize}, {resize}) in [0, 1]: Fashion-MNIST resized bilinearly (objectives.predict.model_inputs)",
                    "output": "logits (N, 10), Fashion-MNIST classes by label", "project_version": project_version()}
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model"
                mlflow_model = Model(artifact_path=logged.artifact_location, run_id=run_id, model_uuid=logged.model_id, model_id=logged.model_id)
                # Explicit requirements: MLflow would otherwise infer them by loading the model in a subprocess.
                # Pickle gives a plain nn.Module back (MLflow 3 defaults to torch.export). MLflow warns about pickle on every
                # save; the launch says it once instead (PICKLE_NOTE), so the warning stays out of the progress output.
                pytorch_logger = logging.getLogger("mlflow.pytorch")
                level = pytorch_logger.level
                pytorch_logger.setLevel(logging.ERROR)
                try:
                    mlflow.pytorch.save_model(model, str(path), mlflow_model=mlflow_model, signature=signature, input_example=example.numpy(),
                                              pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], metadata=metadata,
                                              serialization_format="pickle")
                finally:
                    pytorch_logger.setLevel(level)
                self.client.log_model_artifacts(logged.model_id, str(path))
            self.client.finalize_logged_model(logged.model_id, "READY")
        except BaseException:
            self.discard_model(logged.model_id)  # never a model left PENDING with half its files (a full artifact store)
            raise
        self.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=result.epochs_run)])
        model_uri = f"models:/{logged.model_id}"
        self.client.set_tag(run_id, "model_uri", model_uri)

        # On the GPU when there is one: the test split through a large network takes minutes on a CPU.
        predict_device = "cuda" if torch.cuda.is_available() else "cpu"
        counts = confusion_matrix(predict(model.to(predict_device), test.test_images, resize), test.test_labels)
        model.to("cpu")
        self.client.log_text(run_id, confusion_csv(counts), "confusion_matrix.csv")
        self.client.log_figure(run_id, confusion_figure(counts, f"{name}: test split, {int(counts.sum())} images"), "confusion_matrix.png")
        return model_uri

    def register_model(self, name: str, trial):
        """A version of registered model `name` for the model logged by Optuna trial `trial`; None when it has no model.

        The version's source is `models:/<model_id>`, MLflow 3's link to the logged model (its id also as the tag
        `model_id`, and the logged model lists the version under `mlflow.modelVersions`, as mlflow.register_model
        does); its description and tags say the study, trial, accuracy and configuration. Registering the same model
        again returns its existing version."""
        config = records.config(trial)
        test_accuracy = trial.user_attrs.get("test_accuracy")
        scores = {"val_accuracy": trial.values[0], **({"test_accuracy": test_accuracy} if test_accuracy is not None else {})}
        run_id = self.trial_run_id(trial.number, trial.user_attrs.get(records.MLFLOW_RUN_ID))
        if run_id is None:
            return None
        return self.register_run_model(name, run_id, f"Optuna study {self.study_name}, trial {trial.number}",
                                       trial.number, scores, config)

    def register_run_model(self, name: str, run_id: str, what: str, number: int, scores: dict[str, float], config: dict):
        """A version of registered model `name` for the model logged on `run_id` (`what` it is, the trial `number` it
        comes from, its `scores` and `config` go into its description and tags); None when the run has no model."""
        import mlflow

        model_uri = self.client.get_run(run_id).data.tags.get("model_uri")
        if model_uri is None:
            return None
        if not self.client.search_registered_models(filter_string=f"name = '{name}'"):
            self.client.create_registered_model(name, tags={"optuna.study_name": self.study_name},
                                                description=f"Best networks of the Optuna study {self.study_name} (Fashion-MNIST classifiers).")
        model_id = model_uri.removeprefix("models:/")
        for version in self.client.search_model_versions(f"name = '{name}'"):
            if version.tags.get("model_id") == model_id:
                return version
        summary = ", ".join(f"{key}={value}" for key, value in config.items() if key in REGISTRY_CONFIG and value is not None)
        description = (f"{what}: " + ", ".join(f"{key} {value:.4f}" for key, value in scores.items()) + f". Configuration: {summary}. "
                       f"Input: float32 images (N, 1, {config.get('resize')}, {config.get('resize')}) in [0, 1]; output: logits for the 10 classes.")
        tags = {"optuna.study_name": self.study_name, "optuna.trial_number": str(number), "model_id": model_id,
                **{key: f"{value:.4f}" for key, value in scores.items()},
                **{key: str(config[key]) for key in REGISTRY_CONFIG if config.get(key) is not None}}
        # A local registry store resolves models:/ through MLflow's global tracking URI, not this client's: point it
        # here meanwhile, then put back exactly what was there (set_tracking_uri also writes MLFLOW_TRACKING_URI).
        from mlflow.tracking._tracking_service import utils

        saved_uri, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.client.tracking_uri)
        try:
            version = self.client.create_model_version(name, model_uri, run_id=run_id, tags=tags, description=description, model_id=model_id)
        finally:
            utils._tracking_uri = saved_uri
            if saved_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved_env
        listed = json.loads(self.client.get_logged_model(model_id).tags.get("mlflow.modelVersions", "[]"))
        self.client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps([*listed, {"name": name, "version": version.version}])})
        return version

    def discard_model(self, model_id: str) -> None:
        """A logged model whose writing failed: its artifacts deleted and its status FAILED, as far as MLflow answers;
        what it does not, the next launch does (study.reconcile.repair_models)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        # Any error (a store that cannot delete, MLflow down) is left: the FAILED status says the files are not a model,
        # and a model MLflow could not mark the next launch marks.
        with contextlib.suppress(Exception):
            get_artifact_repository(self.client.get_logged_model(model_id).artifact_location).delete_artifacts()
        with contextlib.suppress(Exception):
            self.client.finalize_logged_model(model_id, "FAILED")

    def close_parent(self, status: str) -> None:
        self.client.set_terminated(self.parent_run_id, status=status)

    def close_parent_on_exit(self, status: str) -> None:
        """close_parent on the way out of a launch that failed, maybe because MLflow did: a parent MLflow cannot close
        now stays RUNNING until the next launch, which reopens and closes it."""
        with contextlib.suppress(Exception):  # MlflowException, connection and database errors alike: the launch's own error is what to say
            self.close_parent(status)


def dataset_input(data: FashionMNIST, config: TrainConfig) -> DatasetInput:
    """Fashion-MNIST as the run's MLflow dataset input: the verified files and the split sizes the trial used.

    MLflow keeps one dataset per (name, digest) in an experiment, so the digest covers the split
    sizes as well as the files: trials on different subsets show as different datasets.
    """
    sizes = {split: min(n or len(full), len(full)) for split, n, full in
             (("train", config.n_train, data.train_labels), ("validation", config.n_val, data.val_labels), ("test", config.n_test, data.test_labels))}
    digest = hashlib.md5(f"{data.digest}:{sizes['train']}:{sizes['validation']}:{sizes['test']}".encode()).hexdigest()
    profile = {"num_rows": sum(sizes.values()), **sizes, "files_md5": data.digest, "image_shape": [28, 28], "classes": 10}
    dataset = Dataset(name="fashion-mnist", digest=digest, source_type="local", source=json.dumps({"uri": Path(data.source).resolve().as_uri()}),
                      profile=json.dumps(profile))
    tags = [InputTag("mlflow.data.context", "training"), *(InputTag(f"n_{split}", str(n)) for split, n in sizes.items())]
    return DatasetInput(dataset, tags)


def layer_table_csv(config: TrainConfig) -> str:
    """`python -m study inspect` for the trial's network, as CSV: per layer output shape, params, FLOPs, activation bytes."""
    from objectives.inspect import layer_costs

    rows = layer_costs(config.arch, config.resize, config.ratio)
    lines = ["index,layer,output_shape,params,flops,activation_bytes"]
    lines += [f"{r.index},{r.layer},{'x'.join(map(str, r.output_shape))},{r.params},{r.flops},{r.activation_bytes}" for r in rows]
    return "\n".join(lines) + "\n"


def confusion_csv(counts: torch.Tensor) -> str:
    from objectives.predict import CLASS_NAMES

    lines = ["true \\ predicted," + ",".join(CLASS_NAMES)]
    lines += [f"{name}," + ",".join(str(int(n)) for n in row) for name, row in zip(CLASS_NAMES, counts.tolist())]
    return "\n".join(lines) + "\n"


def confusion_figure(counts: torch.Tensor, title: str):
    """A labelled heat map of the counts (matplotlib, so the PNG needs no browser to render)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe in a launcher started from a terminal without one
    import matplotlib.pyplot as plt

    from objectives.predict import CLASS_NAMES

    figure, axes = plt.subplots(figsize=(7.5, 6.5), layout="constrained")
    axes.imshow(counts.numpy(), cmap="Blues")
    for (row, column), n in zip(((r, c) for r in range(len(counts)) for c in range(len(counts))), counts.flatten().tolist()):
        if n:
            axes.text(column, row, str(n), ha="center", va="center", fontsize=8, color="white" if n > counts.max() / 2 else "black")
    axes.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
    axes.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    plt.close(figure)  # log_figure saves it; pyplot need not keep it
    return figure
