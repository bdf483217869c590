"""Interrupting a launch (Ctrl-C, kill -9) loses nothing, and launching again finishes the study."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, journal, run_cli

# Trials long enough (10 epochs) to be caught mid-training.
SLOW = """
[fixed]
arch = "lenet"
batch_size = 256
n_train = 20000
n_val = 500
n_test = 500
[search]
lr = { low = 0.1, high = 1.0, log = true }
epochs = { low = 10, high = 10 }
[pruner]
name = "none"
"""



def _wait_for_running_epoch(home, process, timeout=120):
    """Until the first trial has reported an epoch: the launcher is inside training."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if (home / "optuna.journal").exists():
            try:
                trials = optuna.load_study(study_name="slow", storage=journal(home)).get_trials()
            except KeyError:
                trials = []
            if trials and trials[-1].intermediate_values:
                return trials[-1].number
        time.sleep(0.5)
    pytest.fail("no trial reached its first epoch")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_launch_resumes_without_loss(study_home, tmp_path, sig):
    spec = tmp_path / "slow.toml"
    spec.write_text(SLOW)
    env = {**os.environ, "STUDY_HOME": str(study_home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen([sys.executable, "-m", "study", "launch", str(spec), "--trials", "2", "--preset", "cpu"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    interrupted = _wait_for_running_epoch(study_home, process)
    process.send_signal(sig)
    out, err = process.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert process.returncode == 130, err
        assert "launch the same command to resume" in out
    study = optuna.load_study(study_name="slow", storage=journal(study_home))
    first = study.trials[interrupted]
    assert first.state.name == ("FAIL" if sig == signal.SIGINT else "RUNNING")

    resumed = run_cli("launch", str(spec), "--trials", "2", "--preset", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    trials = optuna.load_study(study_name="slow", storage=journal(study_home)).get_trials()
    first = trials[interrupted]
    assert first.state.name == "FAIL" and first.user_attrs["interrupted"]
    assert first.user_attrs["fail_reason"] == ("interrupted" if sig == signal.SIGINT else "worker process died")
    # Its retry ran with the same params, and the study holds exactly 2 trials that count, none RUNNING.
    retry = [t for t in trials if t.user_attrs.get("retry_of") == interrupted]
    assert len(retry) == 1 and retry[0].params == first.params and retry[0].state.name == "COMPLETE"
    assert sum(t.state.name == "COMPLETE" for t in trials) == 2 and not any(t.state.name == "RUNNING" for t in trials)

    # MLflow: the interrupted run is closed as KILLED, no run is left RUNNING, one parent.
    client = MlflowClient(tracking_uri=f"sqlite:///{study_home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("slow").experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert client.get_run(first.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert sum(r.data.tags.get("study.role") == "parent" for r in runs) == 1
