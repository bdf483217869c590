"""Studies that scale: parallel worker processes, workers on other machines (PostgreSQL and an MLflow server),
a worker killed mid-trial, the accuracy-against-cost Pareto front, samplers, export, and bad input."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import LENET, free_port, hold_env, journal, make_spec, postgres_database, release, run_cli, run_main, start_hooked, wait_for_holds, wait_until_up
from study.pool import cpu_cores

# One epoch of a tiny VGG: the cheapest trial that still goes through the whole trainer.
FAST = {
    "fixed": {"arch": "vgg11", "batch_size": 32, "momentum": 0.9, "n_train": 256, "n_val": 128, "n_test": 128, "epochs": 1, "resize": 32, "ratio": 16},
    "search": {"lr": {"low": 0.01, "high": 0.1, "log": True}},
    "pruner": {"name": "none"},
}


def _children_by_trial(client: MlflowClient, experiment: str) -> tuple[list, list]:
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("study.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _check_parallel_study(study: optuna.Study, client: MlflowClient, total: int) -> None:
    """Exactly `total` finished trials with unique numbers, and one MLflow child run each under one parent."""
    trials = study.get_trials()
    assert len(trials) == total and all(t.state.is_finished() for t in trials), [t.state.name for t in trials]
    assert sorted(t.number for t in trials) == list(range(total))
    parents, children = _children_by_trial(client, study.study_name)
    assert len(parents) == 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == list(range(total))
    assert {c.info.run_id for c in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert not [c for c in children if c.info.status == "RUNNING"]


@pytest.mark.slow
def test_four_workers_on_the_local_default_storage(study_home, tmp_path):
    spec = make_spec(tmp_path, "fast", FAST)
    result = run_cli("launch", str(spec), "--trials", "8", "--workers", "4")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    workers = min(4, cpu_cores())  # no more worker processes than cores: more would only share them
    assert f"{workers} workers: {', '.join(['cpu'] * workers)}" in output
    assert "database is locked" not in output and "Traceback" not in output
    study = optuna.load_study(study_name="fast", storage=journal(study_home))
    client = MlflowClient(tracking_uri=f"sqlite:///{study_home / 'mlflow.db'}")
    _check_parallel_study(study, client, 8)
    # Four processes trained; the launcher (one pid) recorded every trial.
    assert len({t.user_attrs["pid"] for t in study.trials}) == 1

    # Export: one row per trial, Optuna and MLflow joined.
    for name in ("trials.csv", "trials.parquet"):
        exported = run_main("export", "fast", "-o", str(tmp_path / name))
        assert exported.returncode == 0, exported.stderr
        frame = pd.read_csv(tmp_path / name) if name.endswith(".csv") else pd.read_parquet(tmp_path / name)
        assert sorted(frame["number"]) == list(range(8))
        assert set(frame["state"]) <= {"COMPLETE", "PRUNED", "FAIL"} and set(frame["mlflow.status"]) == {"FINISHED"}
        # MLflow's columns are those the trial does not hold itself (the last epoch's seconds), none twice.
        assert "mlflow.val_accuracy" not in frame and frame["mlflow.epoch_seconds"].notna().any() and frame["params_lr"].notna().all()


@pytest.fixture(scope="module")
def postgres():
    """A fresh PostgreSQL database for Optuna and one for MLflow, dropped afterwards."""
    with postgres_database("scale_optuna") as optuna_url, postgres_database("scale_mlflow") as mlflow_url:
        optuna.storages.RDBStorage(optuna_url).engine.dispose()  # Optuna's tables, before several processes race to create them
        yield {"optuna": optuna_url, "mlflow": mlflow_url}


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """A real `mlflow server` on PostgreSQL, as the README sets it up for several machines."""
    port = free_port()
    artifacts = tmp_path_factory.mktemp("mlartifacts")
    log = open(artifacts / "server.log", "w")  # noqa: SIM115 -- open while the server runs
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres["mlflow"], "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1", "--default-artifact-root", artifacts.as_uri()],
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/health", server, "mlflow server", log=lambda: (artifacts / "server.log").read_text())
    yield url
    server.terminate()
    server.wait(30)
    log.close()


@pytest.mark.slow
def test_four_workers_from_two_machines_on_postgresql(study_home, tmp_path, postgres, mlflow_server):
    """A launch with 2 workers and a `worker` command with 2 more, on one PostgreSQL study and one MLflow server."""
    spec = make_spec(tmp_path, "shared", FAST)
    env = {"STUDY_HOME": str(study_home), "MLFLOW_TRACKING_URI": mlflow_server}
    url = postgres["optuna"]
    launch = start_hooked("launch", str(spec), "--trials", "8", "--workers", "2", "--storage", url, "--heartbeat", "2", env=env)
    deadline = time.monotonic() + 120
    while "shared" not in optuna.get_all_study_names(url) or "trials" not in optuna.load_study(study_name="shared", storage=url).user_attrs:
        assert launch.poll() is None and time.monotonic() < deadline, launch.communicate()
        time.sleep(0.5)
    # The second "machine": a study home of its own, the same storage URL and tracking server.
    worker = run_cli("worker", str(spec), "--storage", url, "--workers", "2", "--heartbeat", "2", "--checkpoint-dir", str(study_home / "checkpoints"),
                     env={**env, "STUDY_HOME": str(tmp_path / "other")}, timeout=300)
    out, err = launch.communicate(timeout=300)
    assert launch.returncode == 0, err
    assert worker.returncode == 0, worker.stderr
    for output in (out + err, worker.stdout + worker.stderr):
        assert "database is locked" not in output and "Traceback" not in output
    study = optuna.load_study(study_name="shared", storage=url)
    _check_parallel_study(study, MlflowClient(tracking_uri=mlflow_server), 8)
    # Both "machines" ran trials.
    assert len({(t.user_attrs["host"], t.user_attrs["pid"]) for t in study.trials}) == 2
    optuna.storages.RDBStorage(url).engine.dispose()


@pytest.mark.slow
def test_killed_worker_is_failed_by_heartbeat_and_retried(study_home, tmp_path, postgres, mlflow_server):
    """kill -9 in the middle of a trial: the heartbeat goes stale, the trial is FAIL, retried once, its MLflow run KILLED."""
    import records

    spec = make_spec(tmp_path, "slow", LENET, fixed={"epochs": 2})
    url = postgres["optuna"]
    process = start_hooked("launch", str(spec), "--trials", "2", "--storage", url, "--heartbeat", "2",
                           env={"STUDY_HOME": str(study_home), "MLFLOW_TRACKING_URI": mlflow_server, **hold_env(tmp_path / "holds", "epoch:1")})
    (hold,) = wait_for_holds(tmp_path / "holds", 1, lambda: process.poll() is None)
    assert hold["pid"] == process.pid
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    (held,) = [t for t in optuna.load_study(study_name="slow", storage=url).get_trials() if t.params.get("lr") == hold["lr"]]
    assert held.state == TrialState.RUNNING and list(held.intermediate_values) == [1]  # killed mid-training
    killed = held.number

    resumed = run_main("worker", str(spec), "--storage", url, "--heartbeat", "2", "--checkpoint-dir", str(study_home / "checkpoints"), env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(rf"trial {killed}: worker stopped sending heartbeats .*; marked FAIL and queued again", resumed.stdout)
    trials = optuna.load_study(study_name="slow", storage=url).get_trials()
    dead = trials[killed]
    assert dead.state == TrialState.FAIL
    retries = [t for t in trials if records.retry_source(t) == killed]
    assert len(retries) == 1 and retries[0].params == dead.params and retries[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2 and not [t for t in trials if not t.state.is_finished()]

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(dead.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna.fail_reason"].startswith("worker stopped sending heartbeats")
    _, children = _children_by_trial(client, "slow")
    assert not [c for c in children if c.info.status == "RUNNING"] and len(children) == len(trials)
    optuna.storages.RDBStorage(url).engine.dispose()


def test_pareto_front_of_accuracy_against_cost(study_home, tmp_path):
    tiny_spec = make_spec(tmp_path, "tiny", FAST, fixed={"epochs": None}, search={"epochs": {"low": 1, "high": 2}})
    result = run_main("launch", str(tiny_spec), "--trials", "5", "--objective", "accuracy,cost", "--cost", "train_flops")
    assert result.returncode == 0, result.stderr
    assert "no pruning" in result.stdout
    study = optuna.load_study(study_name="tiny", storage=journal(study_home))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    shown = run_main("show", "tiny")
    assert shown.returncode == 0, shown.stderr
    assert "Pareto front" in shown.stdout and "train_flops" in shown.stdout
    # The rows of the Pareto table only (the cost-model table above it lists every trial).
    pareto_table = shown.stdout[shown.stdout.index("Pareto front:"):]
    front = {int(match) for match in re.findall(r"^\s+(\d+)\s", pareto_table, flags=re.MULTILINE)}
    assert front == {t.number for t in study.best_trials} and front
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    for number in front:
        mine = study.trials[number].values
        assert not any(o.values[0] >= mine[0] and o.values[1] <= mine[1] and o.values != mine for o in complete)
    for trial in complete:
        assert trial.values[1] == trial.user_attrs["train_flops"]
    # A study keeps its objective.
    changed = run_main("launch", str(tiny_spec), "--trials", "6", "--objective", "accuracy")
    assert changed.returncode == 1 and "optimises accuracy,train_flops" in changed.stderr


def test_grid_sampler_runs_every_combination(study_home, tmp_path):
    spec = make_spec(tmp_path, "grid", FAST, fixed={"batch_size": None}, search={"lr": {"choices": [0.02, 0.05]}, "batch_size": {"choices": [32, 64]}},
                     pruner={"name": "hyperband"}, sampler={"name": "random"})
    result = run_main("launch", str(spec), "--trials", "4", "--sampler", "grid")
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="grid", storage=journal(study_home))
    assert sorted((t.params["lr"], t.params["batch_size"]) for t in study.trials) == [(0.02, 32), (0.02, 64), (0.05, 32), (0.05, 64)]
    assert study.user_attrs["pruner"] == "hyperband" and study.user_attrs["sampler"] == "grid"


def _one_line_error(capsys, argv, *fragments):
    """The command as a user runs it, in this process (each subprocess would import torch again)."""
    from study.cli import main

    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_input_is_a_one_line_error_and_writes_nothing(study_home, tiny_spec, capsys):
    import torch

    spec = str(tiny_spec)
    _one_line_error(capsys, ["launch", spec, "--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open storage")
    _one_line_error(capsys, ["launch", spec, "--storage", "nosuchdb://x/y"], "cannot open storage")
    _one_line_error(capsys, ["worker", spec, "--storage", "postgresql://nobody@127.0.0.1:1/none"], "--checkpoint-dir a folder every machine reaches")
    _one_line_error(capsys, ["worker", spec, "--storage", "postgresql://nobody@127.0.0.1:1/none", "--checkpoint-dir", str(study_home.parent / "shared")],
                    "cannot open storage")
    _one_line_error(capsys, ["launch", spec, "--workers", "0"], "--workers must be >= 1")
    missing = torch.cuda.device_count()  # 0 on a machine without a GPU
    _one_line_error(capsys, ["launch", spec, "--gpus", str(missing)], f"GPU {missing} is not there")
    _one_line_error(capsys, ["launch", spec, "--gpus", "first"], "GPU indices")
    _one_line_error(capsys, ["launch", spec, "--trials-per-gpu", "0"], "--trials-per-gpu must be >= 1")
    _one_line_error(capsys, ["launch", spec, "--objective", "speed"], "--objective speed")
    _one_line_error(capsys, ["launch", spec, "--cost", "train_flops"], "needs --objective accuracy,cost")
    _one_line_error(capsys, ["launch", spec, "--sampler", "cmaes"], "--sampler cmaes")
    _one_line_error(capsys, ["worker", spec], "no study named 'tiny'")
    _one_line_error(capsys, ["export", "tiny", "-o", "trials.xlsx"], ".csv or .parquet")
    assert not study_home.exists()
    # And once through a real process: the one line is all a user sees.
    result = run_cli("launch", spec, "--gpus", str(missing), "--workers", "2")
    assert result.returncode == 1 and result.stderr.strip() == f"error: --gpus {missing}: GPU {missing} is not there; this machine has " + (
        f"GPUs 0..{missing - 1}" if missing else "no CUDA GPU") + f" (torch.cuda.device_count() is {missing})"
    assert not study_home.exists()


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_cleanly(study_home, tmp_path):
    spec = make_spec(tmp_path, "slow", LENET, fixed={"epochs": 2})
    process = start_hooked("launch", str(spec), "--trials", "4", "--workers", "2",
                           env={"STUDY_HOME": str(study_home), **hold_env(tmp_path / "holds", "epoch:1")})
    # Both worker processes hold a trial after its first epoch: Ctrl-C lands while two trials are training.
    holds = wait_for_holds(tmp_path / "holds", 2, lambda: process.poll() is None)
    assert len({hold["pid"] for hold in holds} - {process.pid}) == 2
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 130, err
    assert "will run again" in out
    trials = optuna.load_study(study_name="slow", storage=journal(study_home)).get_trials()
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 2 and all(t.user_attrs["fail_reason"] == "interrupted" for t in interrupted)
    assert sorted(t.params["lr"] for t in interrupted) == sorted(hold["lr"] for hold in holds)
    assert all(list(t.intermediate_values) == [1] for t in interrupted)  # both mid-training
    # Each is queued again with its params; nothing is left RUNNING, in Optuna or in MLflow.
    queued = {t.user_attrs["retry_of"]: t.system_attrs["fixed_params"] for t in trials if t.state == TrialState.WAITING}
    assert queued == {t.number: t.params for t in interrupted}
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    client = MlflowClient(tracking_uri=f"sqlite:///{study_home / 'mlflow.db'}")
    parents, children = _children_by_trial(client, "slow")
    assert sorted(c.info.status for c in children) == ["KILLED", "KILLED"] and parents[0].info.status == "KILLED"


def test_samplers_and_pruners_from_the_spec(tmp_path):
    from study.session import make_pruner, make_sampler
    from study.specs import SpecError, load_spec, resolve

    path = make_spec(tmp_path, "gp", FAST, pruner={"name": "hyperband", "min_resource": 1, "reduction_factor": 2}, sampler={"name": "gp", "seed": 3})
    spec = load_spec(str(path))
    plan = resolve(spec, "cpu")
    assert type(make_sampler(spec.sampler, plan)).__name__ == "GPSampler"
    assert type(make_pruner(spec.pruner)).__name__ == "HyperbandPruner"
    assert type(make_pruner(spec.pruner, multi_objective=True)).__name__ == "NopPruner"
    assert type(make_sampler({"name": "random"}, plan)).__name__ == "RandomSampler"
    assert make_sampler({"name": "tpe"}, plan)._constant_liar  # parallel workers do not pile onto one point
    with pytest.raises(SpecError, match="grid sampler needs choices or an integer range for lr"):
        make_sampler({"name": "grid"}, plan)
    zoo = load_spec("zoo")
    with pytest.raises(SpecError, match="cannot search ranges that depend on the architecture"):
        make_sampler({"name": "grid"}, resolve(zoo, "full"))
    path = make_spec(tmp_path, "gp", FAST, sampler={"name": "cmaes"})
    with pytest.raises(SpecError, match="sampler 'cmaes' is not supported; use tpe, gp, random, grid"):
        load_spec(str(path))


def test_trial_slots_follow_the_machine():
    import torch

    from study.pool import devices

    gpus = torch.cuda.device_count()
    if gpus == 0:
        assert devices(None, None, 1) == ["auto"]  # one worker on a CPU
        assert devices(3, None, 1) == ["auto"] * 3
    else:
        assert devices(None, None, 2) == [f"cuda:{i}" for i in range(gpus) for _ in range(2)]
        assert devices(None, "0", 1) == ["cuda:0"]
        assert devices(2 * gpus + 1, None, 1)[-1] == "cuda:0"  # round robin
    with pytest.raises(ValueError, match=f"GPU {gpus} is not there"):
        devices(None, ",".join(str(i) for i in range(gpus + 1)), 1)


def test_a_launch_holds_one_postgresql_connection_whatever_its_workers(study_home, tmp_path):
    """A launch of 2 workers on PostgreSQL, both trials held mid-training while the heartbeats and the progress run: the
    server counts one connection of the launch (its threads share it), so max_connections holds as many launches."""
    import psycopg

    spec = make_spec(tmp_path, "one", LENET, fixed={"epochs": 2})
    with postgres_database("one_connection") as url:
        launch = start_hooked("launch", str(spec), "--trials", "2", "--workers", "2", "--storage", url, "--heartbeat", "1",
                              env={"STUDY_HOME": str(study_home), **hold_env(tmp_path / "holds", "epoch:1")})
        holds = wait_for_holds(tmp_path / "holds", 2, lambda: launch.poll() is None)
        counts = []
        with psycopg.connect(url, autocommit=True) as observer:
            for _ in range(30):  # over three heartbeat intervals
                counts.append(observer.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                               "AND application_name = 'cnn-study'").fetchone()[0])
                time.sleep(0.1)
        for hold in holds:
            release(hold)
        _, err = launch.communicate(timeout=300)
        assert launch.returncode == 0, err
        assert set(counts) == {1}, counts


CROWD = 8  # workers started at once: as many as fit this 2-core, 24 GiB machine beside the rest of the suite


@pytest.mark.slow
def test_a_crowd_of_workers_started_at_once(study_home, tmp_path, postgres, mlflow_server):
    """CROWD real `worker` processes started together on one PostgreSQL study and an `mlflow server` on PostgreSQL:
    none turned away, the study's total exact, one MLflow run per trial, and at most one PostgreSQL connection per
    worker at any moment (the peak, sampled from pg_stat_activity, is written to test-artifacts/crowd.json)."""
    import json
    import threading

    import psycopg

    from conftest import ARTIFACTS, run_cli_together

    spec = make_spec(tmp_path, "crowd", LENET)
    env = {"STUDY_HOME": str(study_home), "MLFLOW_TRACKING_URI": mlflow_server}
    with postgres_database("crowd") as url:
        created = run_cli("create", str(spec), "--trials", str(2 * CROWD), "--storage", url, env=env)  # a process of its own, whose connection ends with it
        assert created.returncode == 0, created.stderr
        peak, stop = [0], threading.Event()

        def sample():
            with psycopg.connect(url, autocommit=True) as observer:
                while not stop.is_set():
                    peak[0] = max(peak[0], observer.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                                            "AND application_name LIKE 'cnn-study%'").fetchone()[0])
                    time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            shared = ("--checkpoint-dir", str(tmp_path / "checkpoints"))  # a folder every machine reaches
            done = run_cli_together([("worker", str(spec), "--storage", url, *shared)] * CROWD, env=env, timeout=900)
        finally:
            stop.set()
            sampler.join()
        turned_away = [result.stderr for result in done if result.returncode != 0]
        assert not turned_away, turned_away
        storage = optuna.storages.RDBStorage(url)
        try:
            _check_parallel_study(optuna.load_study(study_name="crowd", storage=storage), MlflowClient(tracking_uri=mlflow_server), 2 * CROWD)
        finally:
            storage.engine.dispose()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "crowd.json").write_text(json.dumps({"workers": CROWD, "trials": 2 * CROWD, "peak_connections": peak[0]}) + "\n")
    assert 1 <= peak[0] <= CROWD, peak[0]
