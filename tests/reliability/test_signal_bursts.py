"""Bursts of Ctrl-C and SIGTERM: the first stops the launch, the ones after it land while the interrupted trial is
being recorded and are ignored, so its retry is always queued and its MLflow run closed."""

from __future__ import annotations

import random
import signal
import time

import optuna
import pytest
from optuna.trial import TrialState

from conftest import hold_env, journal, start_hooked, wait_for_holds
from records import retry_source
from reliability.checks import check_consistent, record_fault, sqlite_uri

pytestmark = pytest.mark.slow  # repeated signal bursts: `make test` runs them, `make test-fast` does not

BURSTS = 3  # seeded bursts, each of several signals at random offsets


@pytest.mark.parametrize("seed", range(BURSTS))
def test_signal_burst_loses_nothing(study_home, lenet_spec, tmp_path, seed):
    chance = random.Random(seed)
    spec = lenet_spec.with_name("burst.toml")
    spec.write_text(lenet_spec.read_text().replace("epochs = 1", "epochs = 2"))
    holds = tmp_path / "holds"
    argv = ["launch", str(spec), "--trials", "2", "--log-model", "none"]
    launch = start_hooked(*argv, env={"STUDY_HOME": str(study_home), **hold_env(holds, "epoch:1")})
    (held,) = wait_for_holds(holds, 1, alive=lambda: launch.poll() is None)
    assert held["pid"] == launch.pid and held["epoch"] == 1  # inside the first trial, between its epochs
    signals = [chance.choice([signal.SIGINT, signal.SIGTERM]) for _ in range(chance.randint(3, 6))]
    for sig in signals:
        launch.send_signal(sig)
        time.sleep(chance.uniform(0.0, 0.1))
    out, err = launch.communicate(timeout=600)
    assert launch.returncode == 130, err
    assert "Traceback" not in err + out
    stopped = optuna.load_study(study_name="burst", storage=journal(study_home)).get_trials()
    assert [t.state for t in stopped] == [TrialState.FAIL, TrialState.WAITING]  # interrupted, and its retry queued
    assert stopped[0].user_attrs["fail_reason"] == "interrupted" and retry_source(stopped[1]) == 0

    resumed = start_hooked(*argv, env={"STUDY_HOME": str(study_home)})
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    record_fault("burst of 3-6 SIGINT/SIGTERM 0-100 ms apart", 1, check_consistent("burst", journal(study_home), sqlite_uri(study_home), total=2))
