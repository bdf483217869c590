"""Workers on a host that is not this one (tests/reliability/checks.py OtherHost: a host name of its own, and where the
test needs it a network namespace of its own). A worker there killed with kill -9 mid-trial: a worker on this host
fails its trial and runs it again once, whatever storage they share (PostgreSQL with Optuna's heartbeats, the gRPC
proxy with leases), within 3 heartbeat intervals, and finishes the study."""

from __future__ import annotations

import contextlib
import socket
import sys

import optuna
import pytest
from optuna.trial import TrialState

from conftest import hold_env, postgres_database, release, run_main, storage_proxy, wait_for_holds
from reliability.checks import check_consistent, record_fault, sqlite_uri

pytest.importorskip("grpc", reason="the gRPC proxy is in the optional extra: pip install '.[ray]'")


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(url)
    try:
        return optuna.load_study(study_name="kill", storage=storage).get_trials()
    finally:
        storage.engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("through", ["postgresql", "proxy"])
def test_kill_9_of_a_worker_on_another_host(through, other_host, forks, lenet_spec, study_home, tmp_path):
    env = {"STUDY_HOME": str(study_home)}
    with postgres_database("other_host") as url, contextlib.ExitStack() as servers:
        storage = url if through == "postgresql" else servers.enter_context(storage_proxy(url, tmp_path / "serve.log"))
        created = run_main("create", str(lenet_spec), "--trials", "2", "--storage", storage, env=env)
        assert created.returncode == 0, created.stderr
        worker = ["worker", str(lenet_spec), "--storage", storage, "--heartbeat", "1", "--checkpoint-dir", str(tmp_path / "checkpoints")]
        holds = tmp_path / "holds"
        far = other_host.start(worker, {**env, **hold_env(holds, "epoch:1")})
        (hold,) = wait_for_holds(holds, 1, lambda: far.poll() is None)
        (running,) = [t for t in _trials(url) if t.state == TrialState.RUNNING]
        assert hold["pid"] == far.pid and running.user_attrs["host"] == "hosta" != socket.gethostname()
        far.kill()
        assert far.wait(30) == -9
        # The pid it recorded means nothing here; only its silence (heartbeats, lease) says it is dead.
        near = forks.start(worker, tmp_path, env)
        assert near.wait() == 0, near.output()[-3000:]
        counts = check_consistent("kill", url, sqlite_uri(study_home), total=2)
        dead = next(t for t in _trials(url) if t.number == running.number)
    assert dead.state == TrialState.FAIL and "host hosta" in dead.user_attrs["fail_reason"]
    record_fault(f"kill -9 of a worker on another host ({'PostgreSQL, heartbeats' if through == 'postgresql' else 'gRPC proxy, leases'})", 1, counts)


@pytest.mark.slow
def test_a_network_cut_between_a_worker_and_the_proxy(other_host, forks, lenet_spec, study_home, tmp_path):
    """The other host in a network namespace of its own, reaching the proxy only over its veth pair. The link is cut
    while its worker trains: a worker here fails that trial once its lease ran out and runs it again; when the link
    returns, the cut worker finds its trial taken over, drops its result and stops by itself."""
    other_host.isolate()
    env = {"STUDY_HOME": str(study_home)}
    with postgres_database("network_cut") as url, storage_proxy(url, tmp_path / "serve.log", host=other_host.address) as proxy:
        # PostgreSQL listens on this host's loopback, which is not the other host's: the proxy is its only way in.
        assert other_host.run(sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 5432), timeout=2)").returncode != 0
        created = run_main("create", str(lenet_spec), "--trials", "2", "--storage", proxy, env=env)
        assert created.returncode == 0, created.stderr
        worker = ["worker", str(lenet_spec), "--storage", proxy, "--heartbeat", "1", "--checkpoint-dir", str(tmp_path / "checkpoints")]
        holds = tmp_path / "holds"
        far = other_host.start(worker, {**env, **hold_env(holds, "epoch:1")})
        (hold,) = wait_for_holds(holds, 1, lambda: far.poll() is None)
        other_host.cut()
        near = forks.start(worker, tmp_path, env)
        assert near.wait() == 0, near.output()[-3000:]
        other_host.cut(down=False)
        release(hold)
        assert far.wait(300) == 0, far.log.read_text()[-3000:]
        assert "this result is dropped and this worker stops" in far.log.read_text()
        counts = check_consistent("kill", url, sqlite_uri(study_home), total=2)
        cut = next(t for t in _trials(url) if t.user_attrs.get("host") == "hosta")
    assert cut.state == TrialState.FAIL and "lease" in cut.user_attrs["fail_reason"]
    record_fault("network cut between a worker on another host and the gRPC proxy", 1, counts)
