"""What a user sees of a study in the tools around it: the terminal, Optuna's and MLflow's clients, the
model registry, exports, the MLflow UI's server and the report, each checked as that tool shows it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import records
from conftest import ARTIFACTS, ROOT, journal, make_spec, run_cli

# A LeNet study that trains in seconds; its first trial runs a single epoch ("after 1 epoch").
LENET_SMALL = {
    "fixed": {"arch": "lenet", "batch_size": 64, "n_train": 1024, "n_val": 256, "n_test": 256},
    "search": {"lr": {"low": 0.1, "high": 1.0, "log": True}, "epochs": {"low": 1, "high": 2}},
    "enqueue": [{"lr": 0.9, "epochs": 1}],
}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One launch of the LeNet study, its best model registered: (home, the launch's output). A whole new
    interpreter, so that the output holds what importing prints too."""
    home = tmp_path_factory.mktemp("tools") / "home"
    spec = make_spec(home.parent, "lenet_small", LENET_SMALL)
    result = run_cli("launch", str(spec), "--trials", "3", "--preset", "cpu", "--register", "lenet-small-best",
                     env={"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": ""}, fresh=True)
    assert result.returncode == 0, result.stderr
    return home, result


def _uri(home: Path) -> str:
    return f"sqlite:///{home / 'mlflow.db'}"


# --- the terminal -------------------------------------------------------------------------------------------

def test_launch_output_is_free_of_warnings(launched):
    _, result = launched
    output = result.stdout + result.stderr
    assert "warning" not in output.lower(), output
    # MLflow's pickle warning, once per model, is replaced by one sentence per launch.
    assert output.count("pickled PyTorch modules") == 1
    assert "after 1 epoch," in result.stdout and "after 1 epochs" not in result.stdout


def test_list_shows_the_ranges_this_machine_runs_and_survives_a_closed_pipe():
    import torch

    from study.specs import load_spec, resolve

    preset = "full" if torch.cuda.is_available() else "cpu"
    listing = run_cli("list")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].startswith(f"search spaces of preset {preset}:")
    assert f"{'vgg_ratio':22} {resolve(load_spec('vgg_ratio'), preset).summary()}" in lines
    full = run_cli("list", "--preset", "full")
    assert f"{'vgg_ratio':22} {load_spec('vgg_ratio').summary()}" in full.stdout.splitlines()

    piped = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m study list | head -1"], capture_output=True, text=True,
                           cwd=ROOT, timeout=120, check=False)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
    assert piped.stdout.startswith("search spaces of preset")


def test_show_fits_80_columns_without_cutting_headers(launched):
    home, _ = launched
    result = run_cli("show", "lenet_small", env={"STUDY_HOME": str(home), "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    for word in ("trial", "epochs", "lr", "accuracy", "test_", "val_", "seconds"):
        assert word in result.stdout


# --- names other tools show ---------------------------------------------------------------------------------

def test_optuna_metric_names(launched, tmp_path, monkeypatch):
    home, _ = launched
    assert optuna.load_study(study_name="lenet_small", storage=journal(home)).metric_names == ["val_accuracy"]

    # A cost-aware study names its cost too (created only: no trial needs to run).
    from study.session import Request, open_session
    from study.specs import load_spec

    spec = make_spec(tmp_path, "lenet_cost", LENET_SMALL)
    storage = str(tmp_path / "cost.journal")
    request = Request(name=str(spec), trials=2, preset="cpu", objective="accuracy,cost", cost="train_flops", storage=storage)
    open_session(request, load_spec(str(spec)))
    loaded = optuna.load_study(study_name="lenet_cost", storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage)))
    assert loaded.metric_names == ["val_accuracy", "train_flops"]


def test_parent_and_trial_runs_name_the_parameter_count(launched):
    home, _ = launched
    client = MlflowClient(tracking_uri=_uri(home))
    experiment = client.get_experiment_by_name("lenet_small")
    (parent,) = client.search_runs([experiment.experiment_id], filter_string="tags.`study.role` = 'parent'")
    assert parent.data.metrics["best_param_count"] == 61706  # LeNet
    assert "best_params" not in parent.data.metrics
    runs = [run for found in records.trial_runs(client, experiment.experiment_id, parent.info.run_id).values() for run in found]
    assert runs and all(run.data.metrics["param_count"] == 61706 and "params" not in run.data.metrics for run in runs)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_columns_and_types(launched, tmp_path, suffix):
    home, _ = launched
    path = tmp_path / f"trials{suffix}"
    result = run_cli("export", "lenet_small", "-o", str(path), env={"STUDY_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    columns = set(frame.columns)
    assert {"params_lr", "params_epochs", "param_count", "duration_seconds", "val_accuracy", "mlflow.status"} <= columns
    assert "params" not in columns and "duration" not in columns
    assert pd.api.types.is_float_dtype(frame["duration_seconds"]) and (frame["duration_seconds"] > 0).all()
    assert pd.api.types.is_integer_dtype(frame["param_count"]) and (frame["param_count"] == 61706).all()
    # MLflow's columns add what the trial does not hold (the last epoch's seconds); none repeats an Optuna column.
    mlflow_columns = {c.removeprefix("mlflow.") for c in columns if c.startswith("mlflow.")}
    assert "epoch_seconds" in mlflow_columns
    assert not mlflow_columns & columns, mlflow_columns & columns


# --- the registry --------------------------------------------------------------------------------------------

def test_registered_version_says_what_it_is(launched, monkeypatch):
    home, result = launched
    client = MlflowClient(tracking_uri=_uri(home))
    study = optuna.load_study(study_name="lenet_small", storage=journal(home))
    best = study.best_trial
    run = client.get_run(best.user_attrs["mlflow_run_id"])
    model_id = run.data.tags["model_uri"].removeprefix("models:/")

    (registered,) = client.search_registered_models(filter_string="name = 'lenet-small-best'")
    assert "lenet_small" in registered.description
    version = client.get_model_version("lenet-small-best", "1")
    # The link to the logged model: MLflow 3's models:/<model_id> source (the local registry store keeps no
    # model_id field), the id as a tag, and the logged model listing its version.
    assert version.source == f"models:/{model_id}" and version.run_id == run.info.run_id
    assert version.tags["model_id"] == model_id
    assert json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"]) == [{"name": "lenet-small-best", "version": 1}]
    for text in ("Optuna study lenet_small", f"trial {best.number}", f"val_accuracy {best.value:.4f}", "arch=lenet", f"lr={best.params['lr']}"):
        assert text in version.description, version.description
    assert version.tags["optuna.study_name"] == "lenet_small" and version.tags["optuna.trial_number"] == str(best.number)
    assert version.tags["arch"] == "lenet" and version.tags["val_accuracy"] == f"{best.value:.4f}"
    assert "load it with mlflow.pytorch.load_model('models:/lenet-small-best/1')" in result.stdout

    monkeypatch.setenv("MLFLOW_TRACKING_URI", _uri(home))
    model = mlflow.pytorch.load_model("models:/lenet-small-best/1")
    assert sum(p.numel() for p in model.parameters()) == 61706


# --- peak memory ---------------------------------------------------------------------------------------------

MEMORY_SCRIPT = """
import json
from objectives import TrainConfig, load_fashion_mnist, train
data = load_fashion_mnist()
peaks = []
for arch, ratio, resize in [("lenet", 1, 28)] * 3 + [("vgg11", 4, 32)]:
    config = TrainConfig(arch=arch, ratio=ratio, resize=resize, lr=0.1, epochs=1, batch_size=128, n_train=1024, n_val=256, n_test=256)
    result = train(config, data)
    peaks.append((result.peak_memory_bytes, result.peak_memory_source))
print(json.dumps(peaks))
"""


def test_cpu_peak_memory_is_each_trials_own():
    """Trials in one process, as a launch's worker runs them: identical LeNets measure alike, a VGG-11 more."""
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=900, check=False,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    peaks = json.loads(result.stdout.splitlines()[-1])
    assert {source for _, source in peaks} == {"cpu_rss_above_start"}
    lenets, vgg = [bytes_ for bytes_, _ in peaks[:3]], peaks[3][0]
    assert min(lenets) > 0
    # No growth from trial to trial, as the process-wide peak had (each trial adds its own on top: 3x the first by the
    # third): identical LeNets measure within the allocator's noise of each other (fp32 on an AVX2 CPU: 15-22.5 MB).
    assert max(lenets) < 2 * min(lenets), lenets
    assert vgg > 3 * max(lenets), (vgg, lenets)


def test_launch_records_what_peak_memory_measured(launched):
    home, _ = launched
    study = optuna.load_study(study_name="lenet_small", storage=journal(home))
    client = MlflowClient(tracking_uri=_uri(home))
    for trial in study.trials:
        assert trial.user_attrs["peak_memory_source"] == "cpu_rss_above_start"
        assert client.get_run(trial.user_attrs["mlflow_run_id"]).data.tags["peak_memory_source"] == "cpu_rss_above_start"
    report = (home / "reports" / "lenet_small.html").read_text()
    assert "peak resident memory added per trial, CPU" in report


# --- `study ui` (its server: test_mlflow_ui.py) ---------------------------------------------------------------

def test_ui_on_a_busy_port_is_one_line_and_exit_1(launched):
    home, _ = launched
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("ui", "--port", str(port), env={"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": ""}, timeout=120)
    assert result.returncode == 1
    assert result.stdout == ""  # no links to a server that is not ours
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: --port {port}: 127.0.0.1:{port} is already in use") and "--port " in line.split(";")[1]


# --- the report ----------------------------------------------------------------------------------------------

def _luminance(colour: str) -> float:
    """Relative luminance (0 black, 1 white) of '#rrggbb' or 'rgb(r, g, b)'."""
    if colour.startswith("#"):
        rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    else:
        rgb = [float(v) for v in colour[colour.index("(") + 1:colour.index(")")].split(",")[:3]]
    linear = [(c / 255 / 12.92) if c / 255 <= 0.04045 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def _big_study(storage, n: int) -> optuna.Study:
    """A LeNet study of `n` trials recorded as the launcher records them, added through Optuna's API."""
    import random

    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study(study_name="big", storage=storage, direction="maximize")
    study.set_metric_names(["val_accuracy"])
    study.set_user_attr("preset", "cpu")
    distributions = {"lr": FloatDistribution(0.05, 2.0, log=True), "epochs": IntDistribution(1, 20), "ratio": CategoricalDistribution([1, 2])}
    draw = random.Random(0)
    trials = []
    for number in range(n):
        params = {"lr": 0.05 * 40 ** draw.random(), "epochs": draw.randint(1, 20), "ratio": draw.choice([1, 2])}
        state = TrialState.FAIL if number % 20 == 19 else TrialState.PRUNED if number % 3 == 2 else TrialState.COMPLETE
        curve = [min(0.9, 0.1 + 0.05 * epoch * params["lr"] ** 0.3) for epoch in range(1, params["epochs"] + 1)]
        if state == TrialState.PRUNED:
            curve = curve[:max(1, len(curve) // 3)]
        config = {"arch": "lenet", "resize": 28, "batch_size": 256, **params}
        attrs = {"config": config, "device": "cpu", "peak_memory_source": "cpu_rss_above_start"}
        if state != TrialState.FAIL:
            seconds = 0.5 * len(curve) / params["ratio"]
            attrs |= {"test_accuracy": curve[-1] - 0.01, "train_seconds": seconds, "wall_seconds": seconds + 1, "train_flops": 4e11 * len(curve),
                      "peak_memory_bytes": 2**24 * params["ratio"], "flops_per_example": 4.2e5, "param_count": 61706, "epochs_run": len(curve),
                      "train_loss": 2.3 - curve[-1], "train_accuracy": curve[-1], "examples_per_second": 5000.0}
        else:
            attrs["fail_reason"] = "diverged: training loss became nan in epoch 1"
        trials.append(create_trial(state=state, value=curve[-1] if state == TrialState.COMPLETE else None, params=params,
                                   distributions=distributions, user_attrs=attrs,
                                   intermediate_values=dict(enumerate(curve, start=1)) if state != TrialState.FAIL else {}))
    study.add_trials(trials)
    return study


def test_report_of_2000_trials_stays_usable(study_home, page):
    """Size and load time of a 2,000-trial report, every plot drawn, colour scales visible, no empty AlexNet section."""
    from dashboards import write_report

    study_home.mkdir(parents=True)
    study = _big_study(journal(study_home), 2000)
    path = study_home / "big.html"
    started = time.monotonic()
    write_report([study], path)
    written = time.monotonic() - started
    size = path.stat().st_size

    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    started = time.monotonic()
    page.goto(path.as_uri(), timeout=300_000)
    plots = page.evaluate("Array.from(document.querySelectorAll('.plotly-graph-div')).map(p => p.id)")
    for plot in plots:
        page.wait_for_function(f"document.getElementById('{plot}').calcdata !== undefined", timeout=300_000)
    loaded = time.monotonic() - started
    print(f"2000-trial report: {size / 2**20:.1f} MiB, written in {written:.1f} s, loaded and drawn in Chromium in {loaded:.1f} s")
    (ARTIFACTS / "report-2000-trials.txt").write_text(f"size_bytes={size}\nwrite_seconds={written:.1f}\nload_seconds={loaded:.1f}\n")
    assert errors == []
    assert {"plot-cost", "plot-history", "plot-curves", "plot-importance", "plot-parallel-0", "plot-slice-0"} <= set(plots)
    assert size < 30 * 2**20  # generous bounds: a page a laptop opens, not a speed test
    assert loaded < 240
    assert page.locator("#trials tbody tr").count() == 2000

    # No study holds both AlexNets: the section and its link are left out.
    assert page.locator("section#alexnet").count() == 0 and page.locator("nav a[href='#alexnet']").count() == 0
    # Every point of the parallel coordinates and the slices keeps a colour darker than near-white.
    # (Optuna draws each parallel-coordinates line as its own trace, coloured from the scale of its colour bar.)
    lines = page.evaluate("document.getElementById('plot-parallel-0').data.filter(t => t.mode === 'lines').map(t => t.line.color)")
    scales = page.evaluate("""['plot-parallel-0', 'plot-slice-0'].flatMap(id => document.getElementById(id).data
                              .filter(t => t.marker && t.marker.colorscale).map(t => t.marker.colorscale))""")
    assert len(lines) >= 1200 and len(scales) >= 2  # one line per complete trial
    assert max(_luminance(colour) for colour in lines) < 0.85
    for scale in scales:
        colours = [colour for _, colour in scale] if isinstance(scale, list) else [c for _, c in __import__("plotly").colors.get_colorscale(scale)]
        assert max(_luminance(colour) for colour in colours) < 0.85, scale
    # The learning curves draw a sample of the 650 pruned trials.
    curves = page.evaluate("document.getElementById('plot-curves').data.length")
    assert curves <= 5 + 100
    page.locator("section#search").screenshot(path=str(ARTIFACTS / "report-search-2000-trials.png"))
