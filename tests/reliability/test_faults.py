"""Faults other than kill -9: SIGINT and SIGTERM, a diverging trial, the device out of memory, the MLflow
server going away and coming back, PostgreSQL dropping the study's connections. After each, the checker."""

from __future__ import annotations

import signal

import optuna
import pytest
from optuna.trial import TrialState

from conftest import journal
from reliability.checks import LENET_SPEC, MlflowServer, check_consistent, record_fault, sqlite_uri, wait_until

# Three epochs of LeNet on 1,024 images: an epoch is reported well before the trial ends.
EPOCHS_SPEC = LENET_SPEC.replace("n_train = 256", "n_train = 1024").replace("epochs = 1", "epochs = 3")
# MLflow's HTTP client retries for minutes by default; a test of an outage wants the failure now.
FAST_MLFLOW_FAILURE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def _spec(tmp_path, text, name="faults"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def _reported_epoch(storage, name):
    """True once a running trial has reported an epoch: the launcher is in the middle of training."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return False
    return any(t.state == TrialState.RUNNING and t.intermediate_values for t in storage.get_all_trials(study_id, deepcopy=False))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_stop_cleanly_and_resume(forks, study_home, tmp_path, sig):
    spec = _spec(tmp_path, EPOCHS_SPEC)
    argv = ["launch", str(spec), "--trials", "2", "--preset", "cpu"]
    env = {"STUDY_HOME": str(study_home)}
    command = forks.start(argv, tmp_path, env)
    wait_until(lambda: (study_home / "optuna.journal").exists(), what="the journal")
    storage = journal(study_home)
    wait_until(lambda: _reported_epoch(storage, "faults"), what="an epoch", alive=command.alive)
    command.kill(sig)
    assert command.wait() == 130, command.output()
    output = command.output()
    assert "launch the same command to resume" in output and "Traceback" not in output
    trials = optuna.load_study(study_name="faults", storage=storage).get_trials()
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == 1 and stopped[0].user_attrs["fail_reason"] == "interrupted"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sqlite_uri(study_home))
    assert client.get_run(stopped[0].user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert not [r for r in client.search_runs([client.get_experiment_by_name("faults").experiment_id]) if r.info.status == "RUNNING"]

    resumed = forks.start(argv, tmp_path, env)
    assert resumed.wait() == 0, resumed.output()
    record_fault(signal.Signals(sig).name, 1, check_consistent("faults", storage, sqlite_uri(study_home), total=2))


def test_divergence_and_out_of_memory_fail_one_trial_each(forks, study_home, tmp_path):
    """Trial 0 diverges (lr 1e38: LeNet's sigmoids saturate below that), trial 2 runs out of memory (injected); the others complete."""
    spec = _spec(tmp_path, LENET_SPEC.replace('[search]\nlr = { low = 0.01, high = 0.1, log = true }',
                                              '[search]\nlr = { low = 0.01, high = 1e38, log = true }\n\n[[enqueue]]\nlr = 1e38\n'
                                              '\n[[enqueue]]\nlr = 0.05\n\n[[enqueue]]\nlr = 0.05\n\n[[enqueue]]\nlr = 0.02\n'))
    env = {"STUDY_HOME": str(study_home), "STUDY_INJECT_OOM": "2:1"}
    command = forks.start(["launch", str(spec), "--trials", "4", "--preset", "cpu"], tmp_path, env)
    assert command.wait() == 0, command.output()
    assert "Traceback" not in command.output()
    storage = journal(study_home)
    trials = optuna.load_study(study_name="faults", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    assert trials[0].user_attrs["fail_reason"].startswith("diverged")
    assert trials[2].user_attrs["fail_reason"].startswith("out of memory") and "STUDY_INJECT_OOM" in trials[2].user_attrs["fail_reason"]
    counts = check_consistent("faults", storage, sqlite_uri(study_home), total=4)
    record_fault("divergence (loss NaN)", 1, counts)
    record_fault("device out of memory (injected)", 1, counts)


def test_mlflow_server_stopping_and_coming_back(forks, study_home, tmp_path):
    """The server dies mid-trial: that trial still reaches Optuna, the launch stops with a clear message, and
    the relaunch (server back) writes the missing MLflow records before it finishes the study."""
    server = MlflowServer(tmp_path)
    server.start()
    try:
        spec = _spec(tmp_path, EPOCHS_SPEC)
        argv = ["launch", str(spec), "--trials", "3", "--preset", "cpu"]
        env = {"STUDY_HOME": str(study_home), "MLFLOW_TRACKING_URI": server.url, **FAST_MLFLOW_FAILURE}
        command = forks.start(argv, tmp_path, env)
        wait_until(lambda: (study_home / "optuna.journal").exists(), what="the journal", alive=command.alive)
        storage = journal(study_home)
        wait_until(lambda: _reported_epoch(storage, "faults"), what="an epoch", alive=command.alive)
        server.stop()
        assert command.wait() == 1, command.output()
        lines = [line for line in command.output().splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and f"MLflow at {server.url} failed" in lines[0] and "launch again once MLflow is back" in lines[0], command.output()
        assert "Traceback" not in command.output()
        trials = optuna.load_study(study_name="faults", storage=storage).get_trials()
        assert trials[0].state == TrialState.COMPLETE  # the trial that was training when MLflow went away kept its result

        server.start()
        resumed = forks.start(argv, tmp_path, env)
        assert resumed.wait() == 0, resumed.output()
        assert "MLflow: wrote the missing records of trials 0" in resumed.output()
        record_fault("MLflow server stopped mid-trial, then back", 1, check_consistent("faults", storage, server.url, total=3))
    finally:
        server.stop()


def test_postgresql_connections_dropped_mid_study(forks, study_home, tmp_path, postgres_db):
    url, name, admin = postgres_db
    spec = _spec(tmp_path, EPOCHS_SPEC)
    argv = ["launch", str(spec), "--trials", "3", "--preset", "cpu", "--storage", url, "--heartbeat", "1"]
    env = {"STUDY_HOME": str(study_home)}
    command = forks.start(argv, tmp_path, env)
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    dropped = 0
    for _ in range(2):  # twice: during the first trial and during a later one
        seen = wait_until(lambda: _reported_epoch(storage, "faults"), what="an epoch", alive=command.alive)
        if not seen:
            break
        rows = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchall()
        dropped += len(rows)
        wait_until(lambda: not _reported_epoch(storage, "faults"), what="the trial's end", alive=command.alive)
    code = command.wait()
    output = command.output()
    assert "Traceback" not in output
    # Reconnected (exit 0), or stopped with one line (exit 1); either way a relaunch completes the study.
    assert code == 0 or (code == 1 and len([line for line in output.splitlines() if line.startswith("error: ")]) == 1), output
    if code != 0:
        resumed = forks.start(argv, tmp_path, env)
        assert resumed.wait() == 0, resumed.output()
    assert dropped >= 1
    record_fault("PostgreSQL connections terminated mid-study", 1, check_consistent("faults", storage, sqlite_uri(study_home), total=3))
    storage.engine.dispose()
    assert code == 0, f"the launch did not reconnect: {output[-2000:]}"
