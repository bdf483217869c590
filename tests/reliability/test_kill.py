"""kill -9 at seeded random points of a launch (journal file) and of a worker (PostgreSQL, heartbeats):
during a trial, right after its MLflow run appears (MLflow logging), and once the trials are done
(the report). Each kill is followed by a relaunch that completes the study, then the checker."""

from __future__ import annotations

import random
import time
from functools import partial

from optuna.trial import TrialState

from conftest import journal
from reliability.checks import REPEATS, SEED, Counts, check_consistent, record_fault, sqlite_uri, wait_until

PHASES = ("trial", "mlflow", "report")
WORKER_REPEATS = max(1, REPEATS * 3 // 10)
LAUNCH_REPEATS = max(1, REPEATS - WORKER_REPEATS)


def _trials(storage, name):
    study_id = storage.get_study_id_from_name(name)
    return storage.get_all_trials(study_id, deepcopy=False)


def _child_runs(uri, name) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    return len(client.search_runs([experiment.experiment_id], filter_string="tags.`optuna.state` != ''", max_results=50000))


def _strike(rng, phase, start, storage, uri, name, total, trial_seconds) -> bool:
    """Start the command, wait for the phase's marker, kill -9; True when the process was still there to be killed."""
    from dashboards.record import count_done

    before = _child_runs(uri, name)
    command = start()
    if phase == "trial":
        wait_until(lambda: any(t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs for t in _trials(storage, name)),
                   what="a trial in training", alive=command.alive)
        time.sleep(rng.uniform(0, 1) * trial_seconds)
    elif phase == "mlflow":
        wait_until(lambda: _child_runs(uri, name) > before, what="a new MLflow run", alive=command.alive)
    else:
        wait_until(lambda: count_done(_trials(storage, name)) >= total, what="the trials done", alive=command.alive)
    hit = command.alive()
    try:
        command.kill()
    except ProcessLookupError:
        hit = False
    command.wait()
    return hit


def _add(into: Counts, counts: Counts) -> None:
    """Trials checked: the study's size at its last check; lost and duplicates: summed over every check."""
    into.trials, into.lost, into.duplicates = counts.trials, into.lost + counts.lost, into.duplicates + counts.duplicates


def _relaunch(forks, argv, tmp_path, env) -> None:
    relaunch = forks.start(argv, tmp_path, env)
    code = relaunch.wait()
    assert code == 0, relaunch.output()[-3000:]
    assert "Traceback" not in relaunch.output()


def test_kill_9_of_a_launch_at_seeded_points(forks, lenet_spec, study_home, tmp_path):
    rng = random.Random(SEED)
    env = {"STUDY_HOME": str(study_home)}

    def argv(total):
        return ["launch", str(lenet_spec), "--trials", str(total), "--preset", "cpu"]

    first = forks.start(argv(1), tmp_path, env)
    assert first.wait() == 0, first.output()
    storage, uri = journal(study_home), sqlite_uri(study_home)
    trial_seconds = _trials(storage, "kill")[0].user_attrs["wall_seconds"]
    total, hits, checked = 1, dict.fromkeys(PHASES, 0), {phase: Counts() for phase in PHASES}
    for _ in range(LAUNCH_REPEATS):
        phase = rng.choice(PHASES)
        total += 1
        hits[phase] += _strike(rng, phase, partial(forks.start, argv(total), tmp_path, env), storage, uri, "kill", total, trial_seconds)
        _relaunch(forks, argv(total), tmp_path, env)
        _add(checked[phase], check_consistent("kill", storage, uri, total))
    for phase, label in zip(PHASES, ("during a trial", "during MLflow logging", "during the report")):
        record_fault(f"kill -9 of a launch {label}", hits[phase], checked[phase])
    assert sum(hits.values()) >= LAUNCH_REPEATS * 2 // 3, hits  # most kills hit a live process


def test_kill_9_of_a_worker_on_postgresql(forks, lenet_spec, study_home, tmp_path, postgres_db):
    url, _, _ = postgres_db
    rng = random.Random(SEED + 1)
    env = {"STUDY_HOME": str(study_home)}
    uri = sqlite_uri(study_home)
    import optuna

    first = forks.start(["launch", str(lenet_spec), "--trials", "1", "--preset", "cpu", "--storage", url, "--heartbeat", "1"], tmp_path, env)
    assert first.wait() == 0, first.output()
    storage = optuna.storages.RDBStorage(url)
    trial_seconds = _trials(storage, "kill")[0].user_attrs["wall_seconds"]
    total, hits, checked = 1, 0, Counts()
    for _ in range(WORKER_REPEATS):
        phase = rng.choice(("trial", "mlflow"))
        total += 1
        # The study's total grows by one; then a worker takes that trial and is killed at the drawn point.
        optuna.load_study(study_name="kill", storage=storage).set_user_attr("trials", total)
        argv = ["worker", str(lenet_spec), "--storage", url, "--heartbeat", "1"]
        hits += _strike(rng, phase, partial(forks.start, argv, tmp_path, env), storage, uri, "kill", total, trial_seconds)
        _relaunch(forks, argv, tmp_path, env)  # waits out the dead worker's heartbeat, fails and retries its trial
        _add(checked, check_consistent("kill", storage, uri, total))
    record_fault("kill -9 of a worker (PostgreSQL, heartbeats)", hits, checked)
    storage.engine.dispose()
    assert hits >= WORKER_REPEATS * 2 // 3
