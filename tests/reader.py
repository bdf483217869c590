"""What a user's own script sees: the platform's records read with Optuna, MLflow, pandas and pyarrow alone, never
importing the platform (`study`, `objectives`, `dashboards`), and the basics such a reader relies on checked.

    python tests/reader.py storage STORAGE TRACKING_URI STUDY...    [--unfinished-ok]
    python tests/reader.py export FILE STORAGE STUDY TRACKING_URI
    python tests/reader.py report FILE.html STORAGE STUDY...
    python tests/reader.py final STORAGE STUDY TRACKING_URI
    python tests/reader.py serve        one JSON request a line on stdin ({"check": "storage", "args": {...}}),
                                        one JSON answer a line on stdout ({"problems": [...], "checked": {...}})

STORAGE is what `--storage` takes: a journal file path, an SQLAlchemy URL, or grpc://HOST:PORT of the storage proxy.
Each check prints the problems it found, one a line, and exits 1 if there are any. What it relies on is the
documented record: one MLflow experiment per study, its parent run (tag `study.role = parent`, `optuna.study_uid` the
study's `study_uid`), one child run per trial (tags `optuna.trial_number`, `optuna.state`), the export's
`mlflow_run_id` column, the report's learning-curve figure (`plot-curves`, one trace per trial named
`<study> trial <number> (<arch>)` in its validation-accuracy panel), and a finalized study's `final` run.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import sys
import traceback
import warnings
from pathlib import Path

import mlflow  # noqa: F401 -- the client below is all this reader uses of it
import optuna
import pandas as pd
import pyarrow.parquet
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

PROJECT = ("study", "objectives", "dashboards")
LEARNING_CURVES = 5  # the best complete trials per study that the report draws
RUN_STATUS = {"COMPLETE": {"FINISHED"}, "PRUNED": {"FINISHED"}, "FAIL": {"FAILED", "KILLED"}}

_storages: dict[str, optuna.storages.BaseStorage] = {}  # one client per storage for the life of the process


def project_modules() -> list[str]:
    return sorted(name for name in sys.modules if name.split(".")[0] in PROJECT)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage as plain Optuna opens it."""
    if url not in _storages:
        if url.startswith("grpc://"):
            host, _, port = url.removeprefix("grpc://").rpartition(":")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                _storages[url] = optuna.storages.GrpcStorageProxy(host=host, port=int(port))
        elif "://" in url:
            _storages[url] = optuna.storages.RDBStorage(url)
        else:
            if not Path(url).is_file():
                raise FileNotFoundError(f"no journal file {url}")
            _storages[url] = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    return _storages[url]


def _study_runs(client: MlflowClient, study: optuna.Study) -> tuple[list, dict[int, list], list]:
    """The study's parent runs, its child runs by trial number, and every run of its experiment."""
    experiment = client.get_experiment_by_name(study.study_name)
    if experiment is None:
        return [], {}, []
    every = client.search_runs([experiment.experiment_id], max_results=50000)
    parents = [run for run in every if run.data.tags.get("study.role") == "parent"
               and run.data.tags.get("optuna.study_uid") == study.user_attrs.get("study_uid")]
    children: dict[int, list] = {}
    for run in every:
        if parents and run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id:
            children.setdefault(int(run.data.tags["optuna.trial_number"]), []).append(run)
    return parents, children, every


def check_storage(storage: str, tracking_uri: str, studies: list[str], unfinished_ok: bool = False) -> tuple[list[str], dict]:
    """Each study: metric names, no trial left RUNNING (nor WAITING, unless `unfinished_ok`: a launch that was stopped),
    and its MLflow mirror: one parent, exactly one child run per finished trial with the trial's state and value, no run
    for a trial Optuna does not hold, no run RUNNING."""
    opened, client = open_storage(storage), MlflowClient(tracking_uri=tracking_uri)
    problems, checked = [], {}
    names = optuna.get_all_study_names(opened)
    for name in studies:
        if name not in names:
            problems.append(f"{name}: no such study in {storage} (it holds {names})")
            continue
        study = optuna.load_study(study_name=name, storage=opened)
        trials = study.get_trials(deepcopy=False)
        checked[name] = {state.name: sum(t.state == state for t in trials) for state in TrialState if any(t.state == state for t in trials)}
        if study.metric_names is None:
            problems.append(f"{name}: the study has no metric names")
        elif len(study.metric_names) != len(study.directions):
            problems.append(f"{name}: {len(study.metric_names)} metric names for {len(study.directions)} objectives")
        left = (TrialState.RUNNING,) if unfinished_ok else (TrialState.RUNNING, TrialState.WAITING)
        problems += [f"{name}: trial {t.number} left {t.state.name}" for t in trials if t.state in left]
        parents, children, every = _study_runs(client, study)
        if len(parents) != 1:
            problems.append(f"{name}: {len(parents)} MLflow parent runs")
        for trial in trials:
            if not trial.state.is_finished():
                continue
            runs = children.get(trial.number, [])
            if len(runs) != 1:
                problems.append(f"{name}: trial {trial.number} ({trial.state.name}) has {len(runs)} MLflow runs")
                continue
            run = runs[0]
            if run.data.tags.get("optuna.state") != trial.state.name:
                problems.append(f"{name}: trial {trial.number} is {trial.state.name}, its run's tag optuna.state {run.data.tags.get('optuna.state')}")
            expected = RUN_STATUS[trial.state.name] if trial.state != TrialState.FAIL else {"KILLED" if trial.user_attrs.get("interrupted") else "FAILED"}
            if run.info.status not in expected:
                problems.append(f"{name}: trial {trial.number} is {trial.state.name}, its run {run.info.status}")
            if trial.state == TrialState.COMPLETE and run.data.metrics.get("val_accuracy") != trial.values[0]:
                problems.append(f"{name}: trial {trial.number} val_accuracy {trial.values[0]}, its run {run.data.metrics.get('val_accuracy')}")
        numbers = {t.number for t in trials}
        problems += [f"{name}: MLflow run for trial {n}, which Optuna does not hold" for n in sorted(set(children) - numbers)]
        problems += [f"{name}: MLflow run {run.info.run_name} ({run.info.run_id}) left RUNNING" for run in every if run.info.status == "RUNNING"]
    return problems, checked


def _columns(path: Path) -> list[str]:
    """The column names as written (pandas would rename a repeated one)."""
    if path.suffix == ".parquet":
        return pyarrow.parquet.read_schema(path).names
    with open(path, newline="") as rows:
        return next(csv.reader(rows))


def check_export(path: str, storage: str, study_name: str, tracking_uri: str) -> tuple[list[str], dict]:
    """The file opens in pandas (CSV) or pyarrow (Parquet) with unique column names, holds one row per trial with its
    state, and each finished trial's mlflow_run_id is a live MLflow run of that trial."""
    file = Path(path)
    columns = _columns(file)
    problems = [f"{file.name}: column {name!r} appears {columns.count(name)} times" for name in sorted(set(columns)) if columns.count(name) > 1]
    frame = pyarrow.parquet.read_table(file).to_pandas() if file.suffix == ".parquet" else pd.read_csv(file)
    trials = {t.number: t for t in optuna.load_study(study_name=study_name, storage=open_storage(storage)).get_trials(deepcopy=False)}
    for column in ("number", "state", "mlflow_run_id"):
        if column not in frame.columns:
            problems.append(f"{file.name}: no column {column}")
    if problems:
        return problems, {"columns": len(columns), "rows": len(frame)}
    if sorted(frame["number"]) != sorted(trials):
        problems.append(f"{file.name}: rows for trials {sorted(frame['number'])}, the study holds {sorted(trials)}")
    client = MlflowClient(tracking_uri=tracking_uri)
    for row in frame.itertuples():
        trial = trials.get(row.number)
        if trial is None:
            continue
        if row.state != trial.state.name:
            problems.append(f"{file.name}: trial {row.number} is {row.state}, Optuna holds {trial.state.name}")
        run_id = row.mlflow_run_id
        if not isinstance(run_id, str) or not run_id:
            if trial.state.is_finished():
                problems.append(f"{file.name}: trial {row.number} ({trial.state.name}) has no mlflow_run_id")
            continue
        try:
            run = client.get_run(run_id)
        except MlflowException as error:
            problems.append(f"{file.name}: trial {row.number}: mlflow_run_id {run_id} is no run ({str(error).splitlines()[0]})")
            continue
        if run.info.lifecycle_stage != "active" or run.data.tags.get("optuna.trial_number") != str(row.number):
            problems.append(f"{file.name}: trial {row.number}: run {run_id} is {run.info.lifecycle_stage}, of trial {run.data.tags.get('optuna.trial_number')}")
    return problems, {"columns": len(columns), "rows": len(frame)}


def plotly_figures(page: str) -> dict[str, tuple[list, dict]]:
    """Every figure of a page written by plotly's to_html: div id -> (traces, layout), arrays decoded."""
    decoder, found, start = json.JSONDecoder(), {}, 0
    while (start := page.find("Plotly.newPlot(", start)) >= 0:
        values, position = [], start + len("Plotly.newPlot(")
        for _ in range(3):  # the div id, the traces, the layout
            while page[position] in " \n\t,":
                position += 1
            value, position = decoder.raw_decode(page, position)
            values.append(value)
        found[values[0]] = (_decoded(values[1]), values[2])
        start = position
    return found


def _decoded(value):
    """Plotly writes numeric arrays as {"dtype", "bdata"} (base64 of the raw little-endian values)."""
    if isinstance(value, dict) and set(value) >= {"dtype", "bdata"}:
        import numpy

        return numpy.frombuffer(base64.b64decode(value["bdata"]), dtype=numpy.dtype(value["dtype"]).newbyteorder("<")).tolist()
    if isinstance(value, dict):
        return {key: _decoded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decoded(item) for item in value]
    return value


def check_report(path: str, storage: str, studies: list[str]) -> tuple[list[str], dict]:
    """Every trial the learning curves draw (the best complete ones of each study, every pruned one) that ran an epoch
    has a validation-accuracy curve with a point per epoch it ran."""
    figures = plotly_figures(Path(path).read_text(encoding="utf-8"))
    if "plot-curves" not in figures:
        return [f"{Path(path).name}: no learning-curve figure (plot-curves); figures: {sorted(figures)}"], {}
    traces = [t for t in figures["plot-curves"][0] if t.get("xaxis", "x") == "x"]  # the validation-accuracy panel
    curves = {t.get("name"): [y for y in t.get("y") or [] if y is not None and math.isfinite(y)] for t in traces}
    problems, drawn = [], 0
    for name in studies:
        trials = optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials(deepcopy=False)
        ran = [t for t in trials if t.user_attrs.get("epochs_run", 0) >= 1]
        best = sorted((t for t in ran if t.state == TrialState.COMPLETE), key=lambda t: -t.values[0])[:LEARNING_CURVES]
        for trial in best:
            label = f"{name} trial {trial.number} ({trial.user_attrs.get('config', {}).get('arch')})"
            if label not in curves:
                problems.append(f"{Path(path).name}: no curve {label!r}; curves: {sorted(map(str, curves))}")
            elif len(curves[label]) != trial.user_attrs["epochs_run"]:
                problems.append(f"{Path(path).name}: curve {label!r} has {len(curves[label])} points for {trial.user_attrs['epochs_run']} epochs")
            drawn += 1
        pruned = sum(t.state == TrialState.PRUNED for t in ran)
        if pruned and not curves.get("pruned trials"):
            problems.append(f"{Path(path).name}: {name} has {pruned} pruned trials and no pruned curve")
    return problems, {"curves": drawn}


def check_final(storage: str, study_name: str, tracking_uri: str) -> tuple[list[str], dict]:
    """A finalized study: its parent names a FINISHED `final` run, trained from one of its complete trials, whose model
    is registered; no final run is left RUNNING."""
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    client = MlflowClient(tracking_uri=tracking_uri)
    parents, _, every = _study_runs(client, study)
    finals = [run for run in every if run.data.tags.get("study.role") == "final"]
    problems = [f"{study_name}: final run {run.info.run_id} left RUNNING" for run in finals if run.info.status == "RUNNING"]
    final_id = parents[0].data.tags.get("final_run_id") if parents else None
    final = next((run for run in finals if run.info.run_id == final_id), None)
    if final is None:
        return [*problems, f"{study_name}: the parent names no final run ({final_id}); final runs: {[r.info.run_id for r in finals]}"], {}
    if final.info.status != "FINISHED":
        problems.append(f"{study_name}: final run {final_id} is {final.info.status}")
    source = int(final.data.tags.get("final.source_trial", -1))
    complete = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    if source not in complete:
        problems.append(f"{study_name}: the final run's source trial {source} is not a complete trial")
    if not client.search_model_versions(f"run_id = '{final_id}'"):
        problems.append(f"{study_name}: no registered model version from final run {final_id}")
    return problems, {"final_runs": len(finals)}


CHECKS = {"storage": check_storage, "export": check_export, "report": check_report, "final": check_final}


def answer(check: str, args: dict) -> dict:
    """One check; its problems, also the one that it could not run (as its last traceback line), and any project module
    that got imported."""
    try:
        problems, checked = CHECKS[check](**args)
    except Exception:  # noqa: BLE001 -- reported to the test, which fails with it
        problems, checked = [f"{check} could not run: {traceback.format_exc().strip().splitlines()[-1]}"], {}
    if project_modules():
        problems.append(f"the reader imported the project: {project_modules()}")
    return {"problems": problems, "checked": checked}


def serve() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(answer(request["check"], request["args"])), flush=True)


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    if command == "serve":
        serve()
        return 0
    flags = [a for a in rest if a.startswith("--")]
    rest = [a for a in rest if not a.startswith("--")]
    args = {"storage": lambda: {"storage": rest[0], "tracking_uri": rest[1], "studies": rest[2:], "unfinished_ok": "--unfinished-ok" in flags},
            "export": lambda: dict(zip(("path", "storage", "study_name", "tracking_uri"), rest)),
            "report": lambda: {"path": rest[0], "storage": rest[1], "studies": rest[2:]},
            "final": lambda: dict(zip(("storage", "study_name", "tracking_uri"), rest))}[command]()
    result = answer(command, args)
    print("\n".join(result["problems"]) or f"ok: {json.dumps(result['checked'])}")
    return 1 if result["problems"] else 0


assert not project_modules(), f"the reader must not import the project: {project_modules()}"

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
