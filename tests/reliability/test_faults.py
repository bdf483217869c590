"""Faults other than kill -9: SIGINT and SIGTERM, a diverging trial, the device out of memory, the MLflow
server going away and coming back, PostgreSQL dropping the study's connections. After each, the checker."""

from __future__ import annotations

import signal

import optuna
import pytest
from optuna.trial import TrialState

from conftest import LENET, hold_env, journal, make_spec, release, wait_for_holds
from reliability.checks import MlflowServer, check_consistent, record_fault, sqlite_uri

# MLflow's HTTP client retries for minutes by default; a test of an outage wants the failure now.
FAST_MLFLOW_FAILURE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def _two_epochs(tmp_path):
    """LeNet trials of two epochs: held after the first, a trial is provably in the middle of its training."""
    return make_spec(tmp_path, "faults", LENET, fixed={"epochs": 2})


def _trial_of(trials, hold):
    """The trial that was held: the one with the held learning rate."""
    (trial,) = [t for t in trials if t.params.get("lr") == hold["lr"]]  # a retry still WAITING has no params yet
    return trial


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_stop_cleanly_and_resume(forks, study_home, tmp_path, sig):
    argv = ["launch", str(_two_epochs(tmp_path)), "--trials", "2"]
    env = {"STUDY_HOME": str(study_home)}
    command = forks.start(argv, tmp_path, {**env, **hold_env(tmp_path / "holds", "epoch:1")})
    (hold,) = wait_for_holds(tmp_path / "holds", 1, command.alive)
    assert hold["pid"] == command.pid and hold["epoch"] == 1  # the launch itself is training, one epoch of two done
    command.kill(sig)
    assert command.wait() == 130, command.output()
    output = command.output()
    assert "launch the same command to resume" in output and "Traceback" not in output
    storage = journal(study_home)
    trials = optuna.load_study(study_name="faults", storage=storage).get_trials()
    stopped = _trial_of(trials, hold)
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [stopped.number]
    assert stopped.user_attrs["fail_reason"] == "interrupted" and list(stopped.intermediate_values) == [1]  # stopped mid-training
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sqlite_uri(study_home))
    assert client.get_run(stopped.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert not [r for r in client.search_runs([client.get_experiment_by_name("faults").experiment_id]) if r.info.status == "RUNNING"]

    resumed = forks.start(argv, tmp_path, env)
    assert resumed.wait() == 0, resumed.output()
    record_fault(signal.Signals(sig).name, 1, check_consistent("faults", storage, sqlite_uri(study_home), total=2))


def test_divergence_and_out_of_memory_fail_one_trial_each(forks, study_home, tmp_path):
    """Trial 0 diverges (lr 1e38: LeNet's sigmoids saturate below that), trial 2 runs out of memory (injected); the others complete."""
    spec = make_spec(tmp_path, "faults", LENET, search={"lr": {"low": 0.01, "high": 1e38, "log": True}},
                     enqueue=[{"lr": 1e38}, {"lr": 0.05}, {"lr": 0.0123}, {"lr": 0.02}])
    env = {"STUDY_HOME": str(study_home), "HOOKED_OOM": "0.0123:1"}
    command = forks.start(["launch", str(spec), "--trials", "4"], tmp_path, env)
    assert command.wait() == 0, command.output()
    assert "Traceback" not in command.output()
    storage = journal(study_home)
    trials = optuna.load_study(study_name="faults", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    assert trials[0].user_attrs["fail_reason"].startswith("diverged")
    assert trials[2].user_attrs["fail_reason"].startswith("out of memory") and "HOOKED_OOM=0.0123:1" in trials[2].user_attrs["fail_reason"]
    counts = check_consistent("faults", storage, sqlite_uri(study_home), total=4)
    record_fault("divergence (loss NaN)", 1, counts)
    record_fault("device out of memory (injected)", 1, counts)


@pytest.mark.slow
def test_mlflow_server_stopping_and_coming_back(forks, study_home, tmp_path):
    """The server dies mid-trial: that trial still reaches Optuna, the launch stops with a clear message, and
    the relaunch (server back) writes the missing MLflow records before it finishes the study."""
    server = MlflowServer(tmp_path)
    server.start()
    try:
        argv = ["launch", str(_two_epochs(tmp_path)), "--trials", "3"]
        env = {"STUDY_HOME": str(study_home), "MLFLOW_TRACKING_URI": server.url, **FAST_MLFLOW_FAILURE}
        command = forks.start(argv, tmp_path, {**env, **hold_env(tmp_path / "holds", "epoch:1")})
        (hold,) = wait_for_holds(tmp_path / "holds", 1, command.alive)
        server.stop()
        release(hold)  # the trial's second epoch and its end are logged to a server that is gone
        assert command.wait() == 1, command.output()
        lines = [line for line in command.output().splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and f"MLflow at {server.url} failed" in lines[0] and "launch again once MLflow is back" in lines[0], command.output()
        assert "Traceback" not in command.output()
        storage = journal(study_home)
        trials = optuna.load_study(study_name="faults", storage=storage).get_trials()
        assert _trial_of(trials, hold).number == 0 and trials[0].state == TrialState.COMPLETE  # the trial training when MLflow went away kept its result

        server.start()
        resumed = forks.start(argv, tmp_path, env)
        assert resumed.wait() == 0, resumed.output()
        assert "MLflow: wrote the missing records of trials 0" in resumed.output()
        record_fault("MLflow server stopped mid-trial, then back", 1, check_consistent("faults", storage, server.url, total=3))
    finally:
        server.stop()


@pytest.mark.slow
def test_postgresql_connections_dropped_mid_study(forks, study_home, tmp_path, postgres_db):
    """The storage's connections are terminated while trial 0 and trial 2 are training (each held after its first epoch)."""
    url, name, admin = postgres_db
    argv = ["launch", str(_two_epochs(tmp_path)), "--trials", "3", "--storage", url, "--heartbeat", "1"]
    env = {"STUDY_HOME": str(study_home)}
    command = forks.start(argv, tmp_path, {**env, **hold_env(tmp_path / "holds", "epoch:1")})
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    dropped = 0
    for held in range(1, 4):
        holds = wait_for_holds(tmp_path / "holds", held, command.alive)
        if held != 2:
            rows = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchall()
            dropped += len(rows)
        release(holds[-1])
    code = command.wait()
    output = command.output()
    assert "Traceback" not in output
    assert dropped >= 2  # the launch held connections both times
    # Reconnected (exit 0), or stopped with one line (exit 1); either way a relaunch completes the study.
    assert code == 0 or (code == 1 and len([line for line in output.splitlines() if line.startswith("error: ")]) == 1), output
    if code != 0:
        resumed = forks.start(argv, tmp_path, env)
        assert resumed.wait() == 0, resumed.output()
    record_fault("PostgreSQL connections terminated mid-study", 1, check_consistent("faults", storage, sqlite_uri(study_home), total=3))
    storage.engine.dispose()
    assert code == 0, f"the launch did not reconnect: {output[-2000:]}"
