"""Trial slots on this machine: a launch starts no more worker processes than its study can use, and stopping them is
quiet whatever state they are in."""

import signal

import pytest

from objectives import DivergedError, TrainConfig
from study.pool import Worker, cap_workers, cpu_cores
from tests.conftest import LENET, hold_env, journal, make_spec, release, run_cli, run_main, start_hooked, wait_for_holds


def test_workers_are_capped_at_the_trials_to_run_and_the_cores():
    cores = cpu_cores()
    assert cap_workers(["auto"] * 1000, 2) == (["auto"] * min(2, cores), f"2 trials still to run and {cores} CPU core{'s' if cores > 1 else ''} here")
    assert cap_workers(["auto"] * 1000, 5000)[0] == ["auto"] * cores
    assert cap_workers(["cuda:0", "cuda:1", "cuda:0", "cuda:1"], 3) == (["cuda:0", "cuda:1", "cuda:0"], "3 trials still to run")  # GPUs: no core limit
    assert cap_workers(["cuda:0", "cuda:1"], 5) == (["cuda:0", "cuda:1"], "")
    assert cap_workers(["auto"] * 3, 0)[0] == ["auto"]  # a study already full still gets its one slot, which finds nothing to run


def test_a_thousand_workers_for_one_trial_start_one_and_say_why(study_home, tmp_path):
    spec = make_spec(tmp_path, "one", LENET)
    result = run_main("launch", str(spec), "--trials", "1", "--workers", "1000", "--log-model", "none")
    assert result.returncode == 0, result.stderr
    assert "1 worker: cpu (not 1000: 1 trial still to run" in result.stdout, result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.skipif(cpu_cores() < 2, reason="two worker processes need two cores")
def test_a_thousand_workers_for_two_trials_start_two_and_stop_quietly(study_home, tmp_path):
    from reliability.checks import check_consistent, sqlite_uri

    spec = make_spec(tmp_path, "two", LENET)
    argv = ["launch", str(spec), "--trials", "2", "--workers", "1000", "--log-model", "none"]
    launch = start_hooked(*argv, env={"STUDY_HOME": str(study_home), **hold_env(tmp_path / "holds", "start")})
    holds = wait_for_holds(tmp_path / "holds", 2, lambda: launch.poll() is None)
    assert len({hold["pid"] for hold in holds} - {launch.pid}) == 2  # each trial in a worker process of its own
    launch.send_signal(signal.SIGINT)  # both workers hold a trial: the stop meets them training
    out, err = launch.communicate(timeout=600)
    assert launch.returncode == 130, err
    assert "2 workers: cpu, cpu (not 1000: 2 trials still to run" in out, out
    assert "Traceback" not in out + err and "ProcessLookupError" not in out + err, out + err
    for hold in holds:
        release(hold)
    finished = run_cli(*argv, env={"STUDY_HOME": str(study_home)})
    assert finished.returncode == 0 and "Traceback" not in finished.stdout + finished.stderr, finished.stderr
    check_consistent("two", journal(study_home), sqlite_uri(study_home), total=2)


@pytest.mark.slow
def test_stopping_a_worker_is_quiet_in_every_state():
    never_started = Worker("auto", None, 1)
    never_started.stop()
    assert not never_started.ready(1.0) and never_started.process is None  # stopped first: it starts nothing
    worker = Worker("auto", None, 1)
    worker.start()
    assert worker.process.is_alive()
    worker.stop()
    worker.stop()  # twice, as a launch's threads may
    worker.process.join(30)
    worker.stop()  # its process gone and reaped
    gone = Worker("auto", None, 1)
    gone.start()
    gone.process.kill()
    gone.process.join(30)
    gone.stop()  # a process that ended on its own
    assert not gone.process.is_alive()


@pytest.mark.slow
def test_a_worker_process_gives_each_trial_the_outcome_it_has_in_this_process(tmp_path):
    # Its epochs, the launcher's answer to stop, its result, and its errors cross the pipe as study.messages carries them.
    worker = Worker("auto", None, 1)
    try:
        config = TrainConfig(arch="lenet", lr=0.1, epochs=5, n_train=256, n_val=64, n_test=64)
        epochs = []
        result = worker.train(config, lambda metrics: epochs.append(metrics.epoch) or metrics.epoch == 2)
        assert epochs == [1, 2] and result.epochs_run == 2 and result.stopped_early and [metrics.epoch for metrics in result.history] == [1, 2]
        process = worker.process

        diverging = TrainConfig(arch="vgg11", resize=32, ratio=16, lr=1e12, momentum=0.9, epochs=2, batch_size=32, n_train=256, n_val=64, n_test=64)
        with pytest.raises(DivergedError, match=r"^training loss became (nan|inf) in epoch 1"):  # its own text, as in tests/test_train.py
            worker.train(diverging, lambda metrics: False)

        missing = tmp_path / "0.pt"
        with pytest.raises(RuntimeError, match=r"^CheckpointError: .*0\.pt") as other:
            worker.train(config, lambda metrics: False, missing, resume=True)  # any other error: its class named in the text
        assert type(other.value) is RuntimeError
        assert worker.process is process and process.is_alive()  # a trial's error ends the trial, not the process
    finally:
        worker.stop()
