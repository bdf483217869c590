"""Ctrl-C and SIGTERM inside `confirm` and `finalize`: the interrupted call exits 130 with one line and leaves no trial
or MLflow run RUNNING; the next call finishes the work, and a smaller confirm call trains only what it asks for
(the queued trials of a larger one are closed, not left waiting for good). Real processes held in their training
(tests/hooked_study.py), real journal storage, real MLflow store."""

from __future__ import annotations

import os
import shutil
import signal
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import LENET, hold_env, journal, make_spec, run_cli, start_hooked, wait_for_holds
from reliability.checks import check_consistent, record_fault, sqlite_uri

NAME = "cstop"


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """A home holding study `cstop`: 4 complete LeNet trials of one epoch. Tests that confirm work on a copy of it."""
    home = tmp_path_factory.mktemp("cstop") / "home"
    spec = make_spec(home.parent, NAME, LENET)
    result = run_cli("launch", str(spec), "--trials", "4", "--log-model", "none", env=_env(home))
    assert result.returncode == 0, result.stderr
    return home, spec


def _env(home) -> dict:
    return {"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": None}


def _copy(launched, tmp_path):
    home, spec = launched
    return shutil.copytree(home, tmp_path / "home"), spec


def _pairs(home, states=(TrialState.COMPLETE,)) -> list[tuple[int, int]]:
    """(search trial, seed) of the companion's trials in these states."""
    companion = optuna.load_study(study_name=f"{NAME}.confirm", storage=journal(home))
    return sorted((t.user_attrs["confirm_of"], t.user_attrs["config"]["seed"]) for t in companion.get_trials(states=states))


def _running_runs(client: MlflowClient, experiment: str) -> list[str]:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return [run.info.run_name for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'")]


def _assert_stopped_cleanly(command) -> None:
    """Exit 130 with one line that says so, no traceback."""
    out, err = command.communicate(timeout=600)
    assert command.returncode == 130, out + err
    assert "Traceback" not in out + err and err.count("\n") <= 1
    assert (out + err).strip().splitlines()[-1].startswith("interrupted")


@pytest.mark.slow
def test_confirm_interrupted_then_asked_for_fewer_seeds_then_for_more(launched, tmp_path):
    home, spec = _copy(launched, tmp_path)
    top = [t.number for t in sorted(optuna.load_study(study_name=NAME, storage=journal(home)).get_trials(states=(TrialState.COMPLETE,)),
                                    key=lambda t: (-t.value, t.number))[:2]]
    holds = tmp_path / "holds"
    first = start_hooked("confirm", str(spec), "--top", "2", "--seeds", "2", env={**_env(home), **hold_env(holds, "start")})
    (held,) = wait_for_holds(holds, 1, alive=lambda: first.poll() is None)
    assert held["pid"] == first.pid and held["seed"] == 1  # training the first confirm trial
    first.send_signal(signal.SIGINT)
    _assert_stopped_cleanly(first)
    client = MlflowClient(sqlite_uri(home))
    trials = optuna.load_study(study_name=f"{NAME}.confirm", storage=journal(home)).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.WAITING] * 4  # interrupted, 3 queued, and its retry
    assert trials[0].user_attrs["interrupted"] and trials[4].user_attrs["retry_of"] == 0
    assert _running_runs(client, f"{NAME}.confirm") == []  # the parent and the interrupted trial's run: KILLED

    # Fewer seeds: exactly the pairs asked for train (the interrupted one's retry among them); the queued seed-2 trials close.
    smaller = run_cli("confirm", str(spec), "--top", "2", "--seeds", "1", env=_env(home))
    assert smaller.returncode == 0, smaller.stderr
    assert "2 trainings to run" in smaller.stdout
    assert _pairs(home) == sorted((number, 1) for number in top)
    assert _pairs(home, (TrialState.RUNNING, TrialState.WAITING)) == []
    closed = [t for t in optuna.load_study(study_name=f"{NAME}.confirm", storage=journal(home)).get_trials()
              if t.user_attrs.get("fail_reason", "").startswith("not run:")]
    assert sorted(t.user_attrs["confirm_of"] for t in closed) == sorted(top) and all(t.user_attrs["confirm_seed"] == 2 for t in closed)
    counts = check_consistent(f"{NAME}.confirm", journal(home), sqlite_uri(home))

    # More seeds again: the closed pairs are queued anew and train; the confirmed ranking is whole.
    larger = run_cli("confirm", str(spec), "--top", "2", "--seeds", "2", env=_env(home))
    assert larger.returncode == 0, larger.stderr
    assert "2 trainings to run" in larger.stdout
    assert _pairs(home) == sorted((number, seed) for number in top for seed in (1, 2))
    check_consistent(f"{NAME}.confirm", journal(home), sqlite_uri(home))
    record_fault("SIGINT in confirm's training, then a smaller and a larger confirm", 1, counts)

    from dashboards.confirmed import confirmed, load_companion

    study = optuna.load_study(study_name=NAME, storage=journal(home))
    rows = confirmed(study, load_companion(study))
    assert sorted(row.trial for row in rows) == sorted(top) and all(sorted(row.seeds) == [0, 1, 2] for row in rows)
    assert load_companion(study).metric_names == ["val_accuracy"]
    assert _running_runs(client, f"{NAME}.confirm") == []


@pytest.mark.slow
def test_confirm_trains_a_retry_queued_before_retries_carried_their_seed(launched, tmp_path):
    """A companion as earlier versions left it after an interruption: the retry holds only `retry_of`. Training it
    read `system_attrs` of a live optuna.Trial (AttributeError) and left the trial and the parent run RUNNING."""
    home, spec = _copy(launched, tmp_path)
    storage = journal(home)
    study = optuna.load_study(study_name=NAME, storage=storage)
    best, second = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: (-t.value, t.number))[:2]
    companion = optuna.create_study(study_name=f"{NAME}.confirm", storage=storage, direction="maximize")
    companion.enqueue_trial({}, user_attrs={"confirm_of": best.number, "confirm_seed": 1})
    stopped = companion.ask()
    for key, value in {"config": {**best.user_attrs["config"], "seed": 1}, "fail_reason": "interrupted", "interrupted": True}.items():
        stopped.set_user_attr(key, value)
    companion.tell(stopped, state=TrialState.FAIL)
    companion.enqueue_trial({}, user_attrs={"retry_of": stopped.number})

    # --top 2: the second configuration is missing, so the queue runs, and the retry is the first trial it takes.
    result = run_cli("confirm", str(spec), "--top", "2", "--seeds", "1", env=_env(home))
    assert result.returncode == 0, result.stderr
    assert "2 trainings to run" in result.stdout
    assert _pairs(home) == sorted([(best.number, 1), (second.number, 1)])
    check_consistent(f"{NAME}.confirm", storage, sqlite_uri(home))


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "trial"), [(signal.SIGINT, 0), (signal.SIGTERM, 1)])
def test_finalize_interrupted_then_again_registers_one_version(launched, tmp_path, sig, trial):
    home, _ = launched  # each case finalizes a trial of its own, so the two share the study
    model = f"{NAME}-{sig.name.lower()}"
    argv = ["finalize", NAME, "--trial", str(trial), "--register", model]
    holds = tmp_path / "holds"
    first = start_hooked(*argv, env={**_env(home), **hold_env(holds, "start")})
    (held,) = wait_for_holds(holds, 1, alive=lambda: first.poll() is None)
    assert held["pid"] == first.pid  # training the final model
    first.send_signal(sig)
    _assert_stopped_cleanly(first)
    client = MlflowClient(sqlite_uri(home))
    experiment_id = client.get_experiment_by_name(NAME).experiment_id

    def finals() -> list:
        return client.search_runs([experiment_id], filter_string=f"tags.`study.role` = 'final' and tags.`final.source_trial` = '{trial}'",
                                  order_by=["attributes.start_time ASC"])

    assert [run.info.status for run in finals()] == ["KILLED"]
    assert client.search_model_versions(f"name = '{model}'") == []
    assert _running_runs(client, NAME) == []

    again = run_cli(*argv, env=_env(home))
    assert again.returncode == 0, again.stderr
    assert f"registered {model} version 1" in again.stdout
    assert [run.info.status for run in finals()] == ["KILLED", "FINISHED"]
    # Once more: the finished run is the final model; nothing trains, nothing is registered twice.
    third = run_cli(*argv, env=_env(home))
    assert third.returncode == 0, third.stderr
    assert "not trained again" in third.stdout and f"registered {model} version 1" in third.stdout
    [version] = client.search_model_versions(f"name = '{model}'")
    assert version.run_id == finals()[-1].info.run_id and len(finals()) == 2
    assert _running_runs(client, NAME) == []


def test_a_signal_outside_training_is_held_until_a_safe_point(capsys):
    """study.interrupts with real signals to this process: held outside a training, raised at once inside one, and
    a second signal ignored."""
    from study.interrupts import Interrupts

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        held = Interrupts()
        with held.installed():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs here, in the main thread; it raises nothing outside a training
            assert held.stopping
            os.kill(os.getpid(), signal.SIGINT)  # a second signal: only a line on standard error
            time.sleep(0.01)
            with pytest.raises(KeyboardInterrupt):
                held.check()
        assert "already stopping" in capsys.readouterr().err

        at_once = Interrupts()
        with at_once.installed(), pytest.raises(KeyboardInterrupt), at_once.while_training():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # a training, stopped by the signal at once
                time.sleep(0.01)
            pytest.fail("the signal did not stop the training")
        assert not at_once.training
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
