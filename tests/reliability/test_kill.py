"""kill -9 at seeded random phases of a launch (journal file) and of a worker (PostgreSQL, heartbeats): in the
middle of a trial (after its epoch), right after its MLflow run opened (before its first epoch), and once the
trials are done (writing the report). The process is held at the phase (tests/hooked_study.py) and killed
there. Each kill is followed by a relaunch that completes the study, then the checker."""

from __future__ import annotations

import random

import pytest
from optuna.trial import TrialState

from conftest import hold_env, journal, wait_for_holds
from reliability.checks import REPEATS, SEED, Counts, check_consistent, record_fault, sqlite_uri

PHASES = ("trial", "mlflow", "report")
HOLD_AT = {"trial": "epoch:1", "mlflow": "start", "report": "report"}
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


def _strike(forks, argv, env, phase, holds, storage, uri, name, total) -> None:
    """Start the command held at the phase, check that it is there, kill -9 it, check that it stopped there."""
    from records import count_done

    before = _child_runs(uri, name)
    command = forks.start(argv, holds.parent, {**env, **hold_env(holds, HOLD_AT[phase])})
    (hold,) = wait_for_holds(holds, 1, command.alive)
    assert hold["pid"] == command.pid and command.alive()
    running = [t for t in _trials(storage, name) if t.state == TrialState.RUNNING]
    if phase == "report":
        assert count_done(_trials(storage, name)) >= total and not running
    else:
        (trial,) = running
        assert trial.params["lr"] == hold["lr"] and _child_runs(uri, name) == before + 1
        assert len(trial.intermediate_values) == (1 if phase == "trial" else 0)
    command.kill()
    assert command.wait() == -9
    if phase != "report":  # killed inside the trial, which is left RUNNING for the relaunch to find
        assert [t.state for t in _trials(storage, name) if t.number == trial.number] == [TrialState.RUNNING]


def _add(into: Counts, counts: Counts) -> None:
    """Trials checked: the study's size at its last check; lost and duplicates: summed over every check."""
    into.trials, into.lost, into.duplicates = counts.trials, into.lost + counts.lost, into.duplicates + counts.duplicates


def _relaunch(forks, argv, tmp_path, env) -> None:
    relaunch = forks.start(argv, tmp_path, env)
    code = relaunch.wait()
    assert code == 0, relaunch.output()[-3000:]
    assert "Traceback" not in relaunch.output()


@pytest.mark.slow
def test_kill_9_of_a_launch_at_seeded_points(forks, lenet_spec, study_home, tmp_path):
    rng = random.Random(SEED)
    env = {"STUDY_HOME": str(study_home)}

    def argv(total):
        return ["launch", str(lenet_spec), "--trials", str(total)]

    first = forks.start(argv(1), tmp_path, env)
    assert first.wait() == 0, first.output()
    storage, uri = journal(study_home), sqlite_uri(study_home)
    total, hits, checked = 1, dict.fromkeys(PHASES, 0), {phase: Counts() for phase in PHASES}
    for repeat in range(LAUNCH_REPEATS):
        phase = rng.choice(PHASES)
        total += 1
        _strike(forks, argv(total), env, phase, tmp_path / f"holds-{repeat}", storage, uri, "kill", total)
        hits[phase] += 1
        _relaunch(forks, argv(total), tmp_path, env)
        _add(checked[phase], check_consistent("kill", storage, uri, total))
    for phase, label in zip(PHASES, ("during a trial", "during MLflow logging", "during the report")):
        record_fault(f"kill -9 of a launch {label}", hits[phase], checked[phase])


@pytest.mark.slow
def test_kill_9_of_a_worker_on_postgresql(forks, lenet_spec, study_home, tmp_path, postgres_db):
    url, _, _ = postgres_db
    rng = random.Random(SEED + 1)
    env = {"STUDY_HOME": str(study_home)}
    uri = sqlite_uri(study_home)
    import optuna

    first = forks.start(["launch", str(lenet_spec), "--trials", "1", "--storage", url, "--heartbeat", "1"], tmp_path, env)
    assert first.wait() == 0, first.output()
    storage = optuna.storages.RDBStorage(url)
    total, hits, checked = 1, 0, Counts()
    for repeat in range(WORKER_REPEATS):
        phase = rng.choice(("trial", "mlflow"))
        total += 1
        # The study's total grows by one; then a worker takes that trial and is killed at the drawn point.
        optuna.load_study(study_name="kill", storage=storage).set_user_attr("trials", total)
        argv = ["worker", str(lenet_spec), "--storage", url, "--heartbeat", "1", "--checkpoint-dir", str(tmp_path / "checkpoints")]
        _strike(forks, argv, env, phase, tmp_path / f"holds-{repeat}", storage, uri, "kill", total)
        hits += 1
        _relaunch(forks, argv, tmp_path, env)  # waits out the dead worker's heartbeat, fails and retries its trial
        _add(checked, check_consistent("kill", storage, uri, total))
    record_fault("kill -9 of a worker (PostgreSQL, heartbeats)", hits, checked)
    storage.engine.dispose()
