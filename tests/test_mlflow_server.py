"""A study logged over HTTP to a real `mlflow server`, backed by SQLite and by PostgreSQL.

One tiny study per backend, every trial enqueued so that its outcome is fixed: trial 0 completes,
trial 1 diverges (FAIL), trial 2 learns nothing and is pruned after its first epoch (median
pruner, one startup trial), trial 3 completes.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import signal
import subprocess
import sys

import mlflow
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import ARTIFACTS, free_port, journal, postgres_database, run_main, wait_until_up

pytestmark = pytest.mark.slow  # real `mlflow server` processes: `make test` runs them, `make test-fast` does not

TRACKED_SPEC = """
description = "tiny study for the MLflow tests: two COMPLETE, one FAIL (diverges), one PRUNED"

[fixed]
batch_size = 32
momentum = 0.9
n_train = 512
n_val = 128
n_test = 128

[search]
arch = { choices = ["lenet_bn", "vgg11"] }
lr = { low = 1e-6, high = 1e12, log = true }  # holds every first trial's lr; no trial is drawn
epochs = { low = 1, high = 2 }

[conditional.lenet_bn]
resize = { low = 28, high = 28 }
ratio = { low = 1, high = 1 }

[conditional.vgg11]
resize = { low = 32, high = 32 }
ratio = { low = 16, high = 16 }

[[enqueue]]
arch = "lenet_bn"
lr = 0.1
epochs = 2
resize = 28
ratio = 1

[[enqueue]]
arch = "vgg11"
lr = 1e12
epochs = 1
resize = 32
ratio = 16

[[enqueue]]
arch = "lenet_bn"
lr = 1e-6
epochs = 2
resize = 28
ratio = 1

# One epoch only: pruning compares it with the first trial's first epoch (lr 0.1: about 0.38), which lr 0.2
# passes by far (about 0.55); at the second epoch the two lie within a point of each other.
[[enqueue]]
arch = "lenet_bn"
lr = 0.2
epochs = 1
resize = 28
ratio = 1

[pruner]
name = "median"
n_startup_trials = 1
"""
EXPECTED_STATES = {0: ("COMPLETE", "FINISHED"), 1: ("FAIL", "FAILED"), 2: ("PRUNED", "FINISHED"), 3: ("COMPLETE", "FINISHED")}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def tracked(request, tmp_path_factory):
    """An `mlflow server` on a free port and a tiny study launched against it over HTTP."""
    tmp = tmp_path_factory.mktemp(f"mlflow-{request.param}")
    with contextlib.ExitStack() as stack:
        backend = f"sqlite:///{tmp / 'mlflow.db'}" if request.param == "sqlite" else stack.enter_context(postgres_database("mlflow_server"))
        port = free_port()
        uri = f"http://127.0.0.1:{port}"
        log = stack.enter_context(open(tmp / "server.log", "w"))
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination", str(tmp / "artifacts"),
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_up(f"{uri}/health", server, "mlflow server", log=lambda: (tmp / "server.log").read_text()[-3000:])
            spec = tmp / "tracked.toml"
            spec.write_text(TRACKED_SPEC)
            home = tmp / "home"
            result = run_main("launch", str(spec), "--trials", "4", "--register", "tracked-best",
                             env={"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": uri})
            assert result.returncode == 0, result.stderr
            study = optuna.load_study(study_name="tracked", storage=journal(home))
            yield {"uri": uri, "client": MlflowClient(tracking_uri=uri), "study": study, "stdout": result.stdout, "backend": request.param}
        finally:
            os.killpg(server.pid, signal.SIGKILL)  # the server, its uvicorn worker and its job runner; nothing to keep
            server.wait(timeout=30)


def _runs(tracked):
    client = tracked["client"]
    experiment = client.get_experiment_by_name("tracked")
    return client.search_runs([experiment.experiment_id])


def test_one_parent_and_one_nested_run_per_trial(tracked):
    client, study = tracked["client"], tracked["study"]
    runs = _runs(tracked)
    parents = [r for r in runs if r.data.tags.get("study.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == ["trial-0", "trial-1", "trial-2", "trial-3"]
    assert len(runs) == 5

    for trial in study.trials:
        run = children[f"trial-{trial.number}"]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        tags = run.data.tags
        # The Optuna state, its reason, and the MLflow status that goes with it.
        optuna_state, status = EXPECTED_STATES[trial.number]
        assert trial.state.name == optuna_state
        assert (tags["optuna.state"], run.info.status) == (optuna_state, status)
        # Per-epoch history: one point per epoch the trial ran (none for the trial that diverged in epoch 1).
        epochs = trial.user_attrs.get("epochs_run", 0)
        assert epochs == {0: 2, 1: 0, 2: 1, 3: 1}[trial.number]
        for key in ("train_loss", "val_accuracy", "epoch_seconds"):
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, epochs + 1))
        # Reproducibility: every setting, versions, device, and the data it trained on.
        assert run.data.params["lr"] == str(trial.params["lr"]) and run.data.params["n_train"] == "512"
        assert tags["project_version"] == importlib.metadata.version("cnn-study")
        assert tags["torch_version"] == torch.__version__ and tags["device"] == "cpu" and tags["optuna.trial_number"] == str(trial.number)
        assert tags.get("mlflow.source.git.commit", "") == tags.get("git_commit", "")
        (dataset,) = run.inputs.dataset_inputs
        assert dataset.dataset.name == "fashion-mnist" and len(dataset.dataset.digest) == 32
        assert '"train": 512, "validation": 128, "test": 128' in dataset.dataset.profile
        layers = client.download_artifacts(run.info.run_id, "layers.csv")
        with open(layers) as file:
            table = file.read().splitlines()
        assert table[0] == "index,layer,output_shape,params,flops,activation_bytes" and table[-1].endswith(",40")  # 10 logits, fp32

    fail, pruned = children["trial-1"].data.tags, children["trial-2"].data.tags
    assert fail["optuna.fail_reason"].startswith("diverged: training loss became nan") and fail["optuna.state_reason"] == fail["optuna.fail_reason"]
    assert pruned["optuna.state_reason"].startswith("pruned after epoch 1")

    # The parent: the spec, sampler and pruner, and the best trial as the study ended.
    assert parent.data.params["sampler"] == "TPESampler" and parent.data.params["pruner"] == "MedianPruner"
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["spec.toml"]
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert parent.data.tags["best_trial_run_id"] == study.best_trial.user_attrs["mlflow_run_id"]
    assert parent.data.metrics["best_val_accuracy"] == study.best_value
    assert parent.data.metrics["best_test_accuracy"] == study.best_trial.user_attrs["test_accuracy"]
    assert parent.data.metrics["trials_fail"] == 1 and parent.data.metrics["trials_pruned"] == 1
    # Updated after every trial: one point per finished trial.
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "trials_complete")] == [1, 2, 3, 4]


def test_best_models_are_logged_with_a_confusion_matrix_and_registered(tracked, monkeypatch):
    client, study = tracked["client"], tracked["study"]
    runs = {r.info.run_name: r for r in _runs(tracked)}
    # --log-model best: each trial that was the best when it finished, and no other.
    best_so_far, expected = -1.0, set()
    for trial in study.trials:
        if trial.state.name == "COMPLETE" and trial.value >= best_so_far:
            best_so_far, expected = trial.value, expected | {f"trial-{trial.number}"}
    assert {name for name, run in runs.items() if "model_uri" in run.data.tags} == expected
    best = runs[f"trial-{study.best_trial.number}"]
    assert {"confusion_matrix.png", "confusion_matrix.csv", "layers.csv"} <= {a.path for a in client.list_artifacts(best.info.run_id)}
    assert [o.model_id for o in best.outputs.model_outputs] == [best.data.tags["model_uri"].removeprefix("models:/")]

    # The logged network loads back and scores exactly the test accuracy the trial logged.
    from objectives import load_fashion_mnist
    from objectives.predict import model_inputs, predict

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["uri"])  # models:/ URIs resolve through MLflow's tracking URI
    model = mlflow.pytorch.load_model(best.data.tags["model_uri"])
    test = load_fashion_mnist().subset(n_test=128)
    predicted = predict(model, test.test_images, resize=int(best.data.params["resize"]))
    assert (predicted == test.test_labels).float().mean().item() == best.data.metrics["test_accuracy"]
    # Its confusion matrix counts the same predictions.
    path = client.download_artifacts(best.info.run_id, "confusion_matrix.csv")
    with open(path) as file:
        rows = [line.split(",")[1:] for line in file.read().splitlines()[1:]]
    assert sum(int(rows[i][i]) for i in range(10)) == (predicted == test.test_labels).sum().item()
    assert sum(int(n) for row in rows for n in row) == 128
    # The signature says what the network takes.
    info = mlflow.models.get_model_info(client.get_logged_model(best.data.tags["model_uri"].removeprefix("models:/")).artifact_location)
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 28, 28)
    assert model_inputs(test.test_images[:2], 28).shape == (2, 1, 28, 28)

    # --register: one version of the registered model, made from the best trial's run.
    (version,) = client.search_model_versions("name = 'tracked-best'")
    assert version.run_id == best.info.run_id
    assert "registered model: tracked-best version 1" in tracked["stdout"]


def test_logged_model_predicts_what_the_trained_one_did(tracked, fashion, monkeypatch):
    """Log a freshly trained network through the tracker and load it back: the same classes on test images."""
    from objectives import TrainConfig, train
    from objectives.predict import predict
    from study.tracking import Tracker

    config = TrainConfig(arch="lenet_bn", lr=0.1, epochs=2, batch_size=32, momentum=0.9, n_train=512, n_val=64, n_test=256)
    result = train(config, fashion)
    before = predict(result.model, fashion.test_images[:256], resize=28)
    tracker = Tracker("roundtrip", tracked["uri"])
    run_id = tracker.start_trial(0, "trial-0", config, {"lr": 0.1}, fashion)
    tracker.finish_trial(run_id, "COMPLETE", result)
    model_uri = tracker.log_model(run_id, 0, result, fashion)
    tracker.close_parent("FINISHED")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["uri"])
    loaded = mlflow.pytorch.load_model(model_uri)
    after = predict(loaded, fashion.test_images[:256], resize=28)
    assert torch.equal(before, after)
    assert len(before.unique()) > 1  # a network that learnt something, so the comparison means something


@pytest.mark.parametrize("tracked", ["sqlite"], indirect=True)
def test_ui_names_the_remote_server(tracked, tmp_path):
    result = run_main("ui", env={"STUDY_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": tracked["uri"]})
    assert result.returncode == 0, result.stderr
    assert f"points to the MLflow server {tracked['uri']}" in result.stdout and "no local UI started" in result.stdout
    experiment_id = tracked["client"].get_experiment_by_name("tracked").experiment_id
    assert f"tracked: {tracked['uri']}/#/experiments/{experiment_id}/runs" in result.stdout
    assert not (tmp_path / "home").exists()


def test_ui_says_when_the_remote_server_does_not_answer(tmp_path):
    down = run_main("ui", env={"STUDY_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "STUDY_MLFLOW_WAIT": "1"})
    assert down.returncode == 1 and down.stderr.startswith("error: MLFLOW_TRACKING_URI=http://127.0.0.1:") and len(down.stderr.splitlines()) == 1
    assert "does not answer within 1 s" in down.stderr and down.stdout == ""


@pytest.mark.parametrize("tracked", ["sqlite"], indirect=True)
def test_run_pages_in_the_browser(tracked):
    """The MLflow UI's pages of the parent run and of the best trial, as a user opens them; screenshots saved."""
    from playwright.sync_api import sync_playwright

    from conftest import CHROMIUM, CHROMIUM_ARGS

    client, study = tracked["client"], tracked["study"]
    experiment_id = client.get_experiment_by_name("tracked").experiment_id
    best = client.get_run(study.best_trial.user_attrs["mlflow_run_id"])
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        # Tall enough for the whole run page, which scrolls inside its own panel rather than the window.
        page = browser.new_context(viewport={"width": 1500, "height": 2300}).new_page()
        page.goto(f"{tracked['uri']}/#/experiments/{experiment_id}/runs/{best.info.run_id}")
        page.get_by_text(f"trial-{study.best_trial.number}").first.wait_for(timeout=60_000)
        page.get_by_text("Optuna state COMPLETE: val_accuracy").first.wait_for(timeout=30_000)  # the run's description
        page.get_by_text("fashion-mnist").first.wait_for(timeout=30_000)  # the dataset input
        page.get_by_text("val_accuracy").first.wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow-child-run.png"), full_page=True)
        # Its artifacts: the layer table and the confusion matrix on the test split.
        page.get_by_role("tab", name="Artifacts").click()
        page.get_by_text("layers.csv").first.wait_for(timeout=30_000)
        page.get_by_text("confusion_matrix.png").first.click()
        # The preview is an <img> of a blob URL; the figure is 750 px wide, wider than any icon.
        page.wait_for_function("[...document.images].some(image => image.complete && image.naturalWidth >= 700)", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow-child-artifacts.png"), full_page=True)
        parent_id = best.data.tags["mlflow.parentRunId"]
        page.goto(f"{tracked['uri']}/#/experiments/{experiment_id}/runs/{parent_id}")
        page.get_by_text("best_val_accuracy").first.wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow-parent-run.png"), full_page=True)
        browser.close()


def test_register_needs_a_logged_model(study_home, tiny_spec):
    result = run_main("launch", str(tiny_spec), "--trials", "1", "--log-model", "none", "--register", "best")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: --register 'best'") and "--log-model best or all" in result.stderr
    assert not study_home.exists()  # nothing written
