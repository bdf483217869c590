"""An interrupted trial's retry resumes from the checkpoint of its last whole epoch: Ctrl-C, SIGTERM and kill -9 of a
launch held inside an epoch, then launched again. The retry trains only the remaining epochs (the hooked trainer
logs every epoch it trains), says so, and ends with exactly the accuracies of the same trial run without the
interruption (CPU, fp32). A kill during a checkpoint's write leaves the previous checkpoint; a corrupt one is set
aside and its retry starts from epoch 1."""

from __future__ import annotations

import signal

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import LENET, hold_env, journal, make_spec, start_hooked, wait_for_holds
from objectives import TrainConfig, read_checkpoint, train
from records import CONFIG, MLFLOW_RUN_ID, RESUMED_FROM_EPOCH
from reliability.checks import begun_again, check_consistent, epochs_trained, record_fault, record_resume, sqlite_uri

EPOCHS = 3


def _launch_held(study_home, tmp_path, at: str, sig: int, name: str = "resume"):
    """A one-trial launch of EPOCHS epochs held at `at`, stopped with `sig`; returns its argv, env and epoch log."""
    spec = make_spec(tmp_path, name, LENET, fixed={"epochs": EPOCHS})
    holds, log = tmp_path / "holds", tmp_path / "epochs.jsonl"
    argv = ["launch", str(spec), "--trials", "1", "--log-model", "none"]
    env = {"STUDY_HOME": str(study_home), "HOOKED_EPOCH_LOG": str(log)}
    launch = start_hooked(*argv, env={**env, **hold_env(holds, at)})
    (held,) = wait_for_holds(holds, 1, alive=lambda: launch.poll() is None)
    assert held["pid"] == launch.pid and held["phase"] == at
    launch.send_signal(sig)
    code = launch.wait(600)
    assert code == (-9 if sig == signal.SIGKILL else 130), launch.errors()[-3000:]
    assert "Traceback" not in launch.output() + launch.errors()
    return argv, env, log


def _relaunch(argv, env) -> str:
    again = start_hooked(*argv, env=env)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "Traceback" not in out + err
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "kill-9"])
def test_an_interrupted_trial_resumes_from_its_last_whole_epoch(study_home, tmp_path, fashion, sig):
    argv, env, log = _launch_held(study_home, tmp_path, "inside:3", sig)
    folder = study_home / "checkpoints" / "resume"
    assert read_checkpoint(folder / "0.pt", TrainConfig.from_dict(optuna.load_study(study_name="resume", storage=journal(study_home))
                                                                  .trials[0].user_attrs[CONFIG])).epoch == 2
    out = _relaunch(argv, env)
    assert "trial 1 (retry of trial 0): resumed from epoch 2" in out
    assert "resumed from epoch 2" in next(line for line in out.splitlines() if line.startswith("trial 1 (retry of trial 0): lr="))
    # Epochs 1 and 2 before the interruption (epoch 3 was cut short before it was reported), then epoch 3 alone.
    assert epochs_trained(log) == [(1, False), (2, False), (3, True)]
    record_resume(f"{signal.Signals(sig).name} of a launch inside epoch 3 of {EPOCHS}", 1, begun_again(log, 3))

    first, retry = optuna.load_study(study_name="resume", storage=journal(study_home)).trials
    assert retry.user_attrs[RESUMED_FROM_EPOCH] == 2 and RESUMED_FROM_EPOCH not in first.user_attrs
    assert sorted(retry.intermediate_values) == [1, 2, 3]  # the pruner sees the whole curve
    assert [retry.intermediate_values[e] for e in (1, 2)] == [first.intermediate_values[e] for e in (1, 2)]
    whole = train(TrainConfig.from_dict(retry.user_attrs[CONFIG]), fashion)  # the same trial, never interrupted
    assert retry.value == whole.val_accuracy and retry.user_attrs["test_accuracy"] == whole.test_accuracy
    assert retry.user_attrs["epochs_run"] == EPOCHS

    client = MlflowClient(tracking_uri=sqlite_uri(study_home))
    run = client.get_run(retry.user_attrs[MLFLOW_RUN_ID])
    assert run.data.tags[RESUMED_FROM_EPOCH] == "2"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(e, retry.intermediate_values[e]) for e in (1, 2, 3)]
    assert not list(folder.iterdir())  # the finished retry removed the checkpoint it resumed from
    record_fault(f"{signal.Signals(sig).name} inside an epoch, then resumed", 1, check_consistent("resume", journal(study_home), sqlite_uri(study_home), total=1))


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(study_home, tmp_path):
    argv, env, log = _launch_held(study_home, tmp_path, "checkpoint:2", signal.SIGKILL)
    folder = study_home / "checkpoints" / "resume"
    config = TrainConfig.from_dict(optuna.load_study(study_name="resume", storage=journal(study_home)).trials[0].user_attrs[CONFIG])
    assert read_checkpoint(folder / "0.pt", config).epoch == 1  # epoch 2's is whole in its temporary file, which never took the name
    assert [path.name for path in folder.iterdir() if path.name.endswith(".tmp")]
    out = _relaunch(argv, env)
    assert "trial 1 (retry of trial 0): resumed from epoch 1" in out
    assert epochs_trained(log) == [(1, False), (2, True), (3, True)]  # epoch 2 trained once before the kill, once after
    record_resume("kill -9 of a launch writing the checkpoint of epoch 2", 1, begun_again(log, 2))
    assert not list(folder.iterdir())  # the checkpoint and the dead writer's temporary are gone


def test_a_corrupt_checkpoint_is_set_aside_and_the_retry_starts_from_epoch_1(study_home, tmp_path):
    argv, env, log = _launch_held(study_home, tmp_path, "inside:3", signal.SIGINT)
    folder = study_home / "checkpoints" / "resume"
    checkpoint = folder / "0.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # torn, as a disk that lost its tail leaves it
    out = _relaunch(argv, env)
    line = next(line for line in out.splitlines() if line.startswith("trial 1 (retry of trial 0): "))
    assert "is torn or unreadable" in line and "set aside as" in line and line.endswith("training from epoch 1")
    assert epochs_trained(log) == [(1, False), (2, False), (1, False), (2, False), (3, False)]
    retry = optuna.load_study(study_name="resume", storage=journal(study_home)).trials[1]
    assert RESUMED_FROM_EPOCH not in retry.user_attrs and retry.user_attrs["epochs_run"] == EPOCHS
    (aside,) = folder.iterdir()
    assert aside.name.startswith("1.pt.set-aside-") and aside.stat().st_size == 1000  # kept for whoever wants to look


def test_a_killed_workers_trial_resumes_in_another_worker_through_the_shared_checkpoint_dir(study_home, tmp_path, postgres_db):
    url, _, _ = postgres_db
    spec = make_spec(tmp_path, "shared", LENET, fixed={"epochs": EPOCHS})
    created = start_hooked("create", str(spec), "--trials", "1", "--preset", "cpu", "--storage", url, env={"STUDY_HOME": str(study_home)})
    assert created.wait(600) == 0, created.errors()
    shared, log, holds = tmp_path / "shared-checkpoints", tmp_path / "epochs.jsonl", tmp_path / "holds"
    argv = ["worker", str(spec), "--storage", url, "--heartbeat", "1", "--checkpoint-dir", str(shared)]
    # Each worker with a study home of its own, as on machines of their own; the MLflow store is the one both reach.
    env = {"MLFLOW_TRACKING_URI": sqlite_uri(study_home), "HOOKED_EPOCH_LOG": str(log)}
    first = start_hooked(*argv, env={**env, "STUDY_HOME": str(tmp_path / "first"), **hold_env(holds, "inside:3")})
    wait_for_holds(holds, 1, alive=lambda: first.poll() is None)
    first.kill()
    assert first.wait(600) == -9
    assert [path.name for path in (shared / "shared").iterdir()] == ["0.pt"]
    second = start_hooked(*argv, env={**env, "STUDY_HOME": str(tmp_path / "second")})
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    assert "trial 1 (retry of trial 0): resumed from epoch 2" in out
    assert epochs_trained(log) == [(1, False), (2, False), (3, True)]
    record_resume("kill -9 of a worker on PostgreSQL inside epoch 3, resumed by another", 1, begun_again(log, 3))
    assert optuna.load_study(study_name="shared", storage=url).trials[1].user_attrs[RESUMED_FROM_EPOCH] == 2
    assert not list((shared / "shared").iterdir()) and not (tmp_path / "second" / "checkpoints").exists()
    record_fault("kill -9 of a worker on PostgreSQL inside an epoch, then resumed", 1, check_consistent("shared", url, sqlite_uri(study_home), total=1))
