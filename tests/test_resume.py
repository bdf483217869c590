"""Interrupting a launch (Ctrl-C, kill -9) in the middle of a trial loses nothing, and launching again finishes the study."""

import signal

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import LENET, hold_env, journal, make_spec, run_main, start_hooked, wait_for_holds


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGKILL, marks=pytest.mark.slow)])
def test_interrupted_launch_resumes_without_loss(study_home, tmp_path, sig):
    # Two epochs; the launch is held after the first one of its first trial, so the signal lands mid-training.
    spec = make_spec(tmp_path, "slow", LENET, fixed={"epochs": 2})
    argv = ("launch", str(spec), "--trials", "2")
    process = start_hooked(*argv, env={"STUDY_HOME": str(study_home), **hold_env(tmp_path / "holds", "epoch:1")})
    (hold,) = wait_for_holds(tmp_path / "holds", 1, lambda: process.poll() is None)
    assert hold["pid"] == process.pid and hold["epoch"] == 1
    process.send_signal(sig)
    out, err = process.communicate(timeout=600)
    if sig == signal.SIGINT:
        assert process.returncode == 130, err
        assert "launch the same command to resume" in out
    else:
        assert process.returncode == -signal.SIGKILL
    study = optuna.load_study(study_name="slow", storage=journal(study_home))
    (first,) = [t for t in study.trials if t.params.get("lr") == hold["lr"]]
    assert list(first.intermediate_values) == [1]  # one epoch of two: it was interrupted, not finished
    assert first.state.name == ("FAIL" if sig == signal.SIGINT else "RUNNING")
    interrupted = first.number

    resumed = run_main(*argv)
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
