"""`launch --ray` on a real Ray cluster on loopback: a head and one more node, one CPU each, tiny LeNet trials.

The trials' actors import tests/hooked_trainer.py (tests/ray_hook/sitecustomize.py on the nodes' PYTHONPATH), so a
test holds trials inside their actors, in their second and last epoch, and acts while they are provably mid-trial: a
node stopped, Ctrl-C. The actors log every epoch they train, so a test counts the epochs a retry trains again.
Every process started here is stopped by the fixtures (the cluster's shutdown, the launch's kill).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from reliability.checks import begun_again, check_consistent, epochs_trained, figures, other_host, record_fault, record_resume, sqlite_uri  # noqa: F401 -- fixtures

from conftest import LENET, ROOT, journal, make_spec, run_cli

ray_cluster_utils = pytest.importorskip("ray.cluster_utils", reason="Ray is an optional extra: pip install '.[ray]'")

LAUNCH_TIMEOUT = 300
EPOCHS = 2


class Holds:
    """The hold files of tests/hooked_study.py: trials waiting in their actors until released."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.auto = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._release_while_auto, daemon=True)
        self.thread.start()

    def held(self) -> list[Path]:
        return [p for p in self.directory.glob("*.json") if not Path(f"{p}.release").exists()]

    def wait(self, count: int, process: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> None:
        """Until `count` trials are held; fails if the launch ends first. `timeout` only guards against a hang."""
        deadline = time.monotonic() + timeout
        while len(self.held()) < count:
            assert process.poll() is None, f"the launch ended before {count} trials were held: {process.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {count} trials held after {timeout:g} s"
            time.sleep(0.05)

    def release_all(self) -> None:
        for path in self.held():
            Path(f"{path}.release").touch()

    def _release_while_auto(self) -> None:
        while not self.done.wait(0.05):
            if self.auto.is_set():
                self.release_all()

    def close(self) -> None:
        self.auto.set()
        self.release_all()
        self.done.set()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray nodes on 127.0.0.1 with one CPU each; their workers hold trials once their last epoch is under way (after
    the checkpoint of the one before it)."""
    yield from ray_cluster(tmp_path_factory, f"inside:{EPOCHS}")


def ray_cluster(tmp_path_factory, hold_at: str):
    """Two Ray nodes on 127.0.0.1 with one CPU each, whose workers hold trials at `hold_at` (hooked_trainer's phases);
    yields the cluster, its Holds and the file of the epochs trained."""
    hold_dir = tmp_path_factory.mktemp("holds")
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "ray_hook")]),
           "HOOKED_HOLD_DIR": str(hold_dir), "HOOKED_HOLD_AT": hold_at, "HOOKED_EPOCH_LOG": str(hold_dir / "epochs.jsonl"),
           "RAY_USAGE_STATS_ENABLED": "0",
           # Ray's loopback-only mode (named for Windows and macOS): every node and driver address stays 127.0.0.1.
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the nodes' processes, and so Ray's worker processes, inherit these
    holds = Holds(hold_dir)
    instance = None
    try:
        instance = ray_cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
        instance.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        instance.wait_for_nodes()
        yield instance, holds, hold_dir / "epochs.jsonl"
    finally:
        holds.close()
        if instance is not None:
            instance.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def launch(study_home, tmp_path):
    """Start `python tests/hooked_study.py launch ... --ray ADDRESS` (the CLI with the trainer wrapped); killed at the end."""
    started: list[subprocess.Popen] = []
    spec = make_spec(tmp_path, "raystudy", LENET, fixed={"epochs": EPOCHS})

    def start(address: str, trials: int, *extra: str) -> subprocess.Popen:
        log = open(tmp_path / f"launch-{len(started)}.log", "w")  # noqa: SIM115 -- kept by the process
        process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hooked_study.py"), "launch", str(spec), "--trials", str(trials),
                                    "--preset", "cpu", "--log-model", "none", "--ray", address,
                                    "--checkpoint-dir", str(tmp_path / "checkpoints"), *extra],
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "STUDY_HOME": str(study_home), "COLUMNS": "200"})
        process.log = tmp_path / f"launch-{len(started)}.log"
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    code = process.wait(LAUNCH_TIMEOUT)
    return code, process.log.read_text()


def _study(home: Path) -> optuna.Study:
    return optuna.load_study(study_name="raystudy", storage=journal(home))


@pytest.mark.slow
def test_a_study_spreads_over_both_nodes(cluster, launch, study_home):
    instance, holds, _ = cluster
    holds.auto.set()
    code, output = _finish(launch(instance.address, 4, "--workers", "9"))
    assert code == 0, output
    # No more actors than trials to run: 4 slots, not 9 (two of them wait for a CPU of the two nodes).
    assert "trials run as Ray actors, 4 (not 9: 4 trials still to run) at once" in output and "4 at a time" in output, output
    # Predicted from the launcher's timings, with an actor's one thread, and said so: the nodes are not timed.
    assert "from training steps timed on" in output and ", the launcher, not on the Ray nodes that train" in output, output
    trials = _study(study_home).get_trials()
    nodes = {t.user_attrs["node"] for t in trials}
    assert len(nodes) == 2, nodes  # hostname/Ray node id: the two nodes share this host's name
    assert {t.user_attrs["cpu_threads"] for t in trials} == {1}
    client = MlflowClient(tracking_uri=sqlite_uri(study_home))
    for trial in trials:
        assert client.get_run(trial.user_attrs["mlflow_run_id"]).data.tags["node"] == trial.user_attrs["node"]
    check_consistent("raystudy", journal(study_home), sqlite_uri(study_home), total=4)


@pytest.mark.slow
def test_ctrl_c_stops_the_actors_and_records_running_trials_interrupted(cluster, launch, study_home):
    instance, holds, _ = cluster
    holds.auto.clear()
    process = launch(instance.address, 3)
    holds.wait(2, process)
    process.send_signal(signal.SIGINT)
    code, output = _finish(process)
    assert code == 130, output
    assert "Traceback" not in output
    stopped = [t for t in _study(study_home).get_trials() if t.state == TrialState.FAIL]
    assert [t.user_attrs["fail_reason"] for t in stopped] == ["interrupted", "interrupted"]
    client = MlflowClient(tracking_uri=sqlite_uri(study_home))
    assert {client.get_run(t.user_attrs["mlflow_run_id"]).info.status for t in stopped} == {"KILLED"}
    holds.auto.set()  # the held actors are gone; release the files so the relaunch's trials run through
    code, output = _finish(launch(instance.address, 3))
    assert code == 0, output
    check_consistent("raystudy", journal(study_home), sqlite_uri(study_home), total=3)


@pytest.mark.slow
@pytest.mark.usefixtures("figures")  # its row joins the reliability table
def test_a_node_stopped_mid_trial_loses_nothing_and_its_retry_resumes_on_the_other_node(cluster, launch, study_home):
    instance, holds, epoch_log = cluster
    holds.auto.clear()
    process = launch(instance.address, 4)
    # Both slots hold a trial, one on each node (one CPU each): the worker node's trial is provably mid-trial.
    holds.wait(2, process)
    worker_node = instance.list_all_nodes()[1]
    lost_node = f"/{worker_node.node_id}"
    instance.remove_node(worker_node, allow_graceful=True)  # as `ray stop` on that machine
    holds.auto.set()
    try:
        code, output = _finish(process)
    finally:
        instance.add_node(num_cpus=1, node_ip_address="127.0.0.1")  # the cluster again as the other tests expect it
    assert code == 0, output
    trials = _study(study_home).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["node"].endswith(lost_node), [(t.number, t.state, t.user_attrs.get("node")) for t in trials]
    assert failed[0].user_attrs["fail_reason"].startswith("Ray actor on node"), failed[0].user_attrs["fail_reason"]
    retry = [t for t in trials if t.user_attrs.get("retry_of") == failed[0].number]
    assert len(retry) == 1 and retry[0].params == failed[0].params and retry[0].state == TrialState.COMPLETE
    # The retry, on the node that is left, resumed from the checkpoint the lost node's actor wrote to --checkpoint-dir.
    assert retry[0].user_attrs["resumed_from_epoch"] == EPOCHS - 1 and retry[0].user_attrs["node"] != failed[0].user_attrs["node"]
    lr = failed[0].params["lr"]
    assert epochs_trained(epoch_log, lr) == [(1, False), (2, True)]  # epoch 2 was cut short on the lost node
    record_resume(f"Ray node lost inside epoch {EPOCHS} of {EPOCHS}, retried on the other node", 1, begun_again(epoch_log, EPOCHS, lr))
    counts = check_consistent("raystudy", journal(study_home), sqlite_uri(study_home), total=4)
    assert counts.lost == 0 and counts.duplicates == 0


# A Ray node that joins the cluster at argv[1], started as ray.cluster_utils.Cluster.add_node starts one: `ray start`
# refuses to join a cluster in Ray's loopback-only mode, which keeps every address on 127.0.0.1.
JOIN_NODE = """
import sys, time
from ray._private.node import Node
from ray._private.parameter import RayParams

params = RayParams(gcs_address=sys.argv[1], node_ip_address="127.0.0.1", num_cpus=1, num_gpus=0, object_store_memory=150 * 2**20,
                   min_worker_port=0, max_worker_port=0, include_log_monitor=False, node_manager_port=0)
params.dashboard_agent_listen_port = None
Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
time.sleep(10**6)
"""


@pytest.mark.slow
@pytest.mark.usefixtures("figures")  # its row joins the reliability table
def test_a_node_on_another_host_killed_mid_trial_loses_nothing_and_its_retry_resumes_on_the_head(cluster, launch, study_home, other_host):  # noqa: F811 -- the fixture imported above
    instance, holds, epoch_log = cluster
    holds.auto.clear()
    # The cluster's second node makes way for one on host `hosta` (its own host name; Ray's loopback-only mode keeps
    # it on this host's network: a node in a network namespace of its own would need the head on a routable address).
    instance.remove_node(instance.list_all_nodes()[1], allow_graceful=True)
    try:
        node = other_host.spawn([sys.executable, "-c", JOIN_NODE, instance.address])
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while len(instance.global_state._live_node_ids()) < 2:  # the head and hosta's node
            assert node.poll() is None and time.monotonic() < deadline, f"the node on hosta did not join: {node.log.read_text()[-3000:]}"
            time.sleep(0.2)
        process = launch(instance.address, 3)
        holds.wait(2, process)  # one trial in its last epoch on each node (one CPU each)
        assert other_host.kill_all() > 0  # the raylet, its agents and the actor's worker, at once
        holds.auto.set()
        code, output = _finish(process)
    finally:
        instance.add_node(num_cpus=1, node_ip_address="127.0.0.1")  # the cluster again as the other tests expect it
    assert code == 0, output
    trials = _study(study_home).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["node"].startswith("hosta/"), [(t.number, t.state, t.user_attrs.get("node")) for t in trials]
    assert failed[0].user_attrs["fail_reason"].startswith("Ray actor on node hosta/"), failed[0].user_attrs["fail_reason"]
    retry = [t for t in trials if t.user_attrs.get("retry_of") == failed[0].number]
    assert len(retry) == 1 and retry[0].params == failed[0].params and retry[0].state == TrialState.COMPLETE
    # The retry, on the head's node, resumed from the checkpoint hosta's actor wrote to --checkpoint-dir.
    assert retry[0].user_attrs["resumed_from_epoch"] == EPOCHS - 1 and not retry[0].user_attrs["node"].startswith("hosta/")
    lr = failed[0].params["lr"]
    assert epochs_trained(epoch_log, lr) == [(1, False), (2, True)]  # epoch 2 was cut short on hosta
    counts = check_consistent("raystudy", journal(study_home), sqlite_uri(study_home), total=3)
    assert counts.lost == 0 and counts.duplicates == 0
    record_fault("kill -9 of a Ray node on another host, mid-trial", 1, counts)
    record_resume(f"Ray node on another host killed inside epoch {EPOCHS} of {EPOCHS}, retried on the head", 1, begun_again(epoch_log, EPOCHS, lr))


@pytest.mark.slow
def test_an_actor_killed_for_memory_is_retried_and_the_launch_goes_on_with_the_others(cluster, launch, study_home, tmp_path, monkeypatch):
    instance, holds, _ = cluster
    holds.auto.set()
    # The first trial's actor fails as one Ray's memory monitor killed (tests/hooked_study.py HOOKED_RAY_OOM).
    monkeypatch.setenv("HOOKED_RAY_OOM", str(tmp_path / "memory-killed"))
    code, output = _finish(launch(instance.address, 3, "--workers", "2"))
    assert code == 0, output
    assert "Ray's memory monitor killed an actor (its trial runs again); the launch goes on with the 1 actor that remain" in output, output
    trials = _study(study_home).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"].startswith("Ray's memory monitor killed the actor on node"), \
        [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials]
    assert "Traceback" not in output
    retry = [t for t in trials if t.user_attrs.get("retry_of") == failed[0].number]
    assert len(retry) == 1 and retry[0].params == failed[0].params and retry[0].state == TrialState.COMPLETE
    counts = check_consistent("raystudy", journal(study_home), sqlite_uri(study_home), total=3)
    assert counts.lost == 0 and counts.duplicates == 0


BLOCK_RAY = """
import sys

class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")

sys.meta_path.insert(0, NoRay())
import study.cli
sys.exit(study.cli.main(sys.argv[1:]))
"""


def test_ray_flag_without_ray_installed_is_one_line(study_home, tiny_spec):
    result = subprocess.run([sys.executable, "-c", BLOCK_RAY, "launch", str(tiny_spec), "--trials", "1", "--ray", "auto", "--checkpoint-dir", str(study_home.parent / "checkpoints")],
                            check=False, cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "STUDY_HOME": str(study_home), "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "pip install '.[ray]'" in result.stderr, result.stderr
    assert not study_home.exists()  # checked before anything is written


def test_ray_flag_with_gpus_is_one_line(study_home, tiny_spec):
    result = run_cli("launch", str(tiny_spec), "--trials", "1", "--ray", "auto", "--gpus", "0", "--checkpoint-dir", str(study_home.parent / "checkpoints"))
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --gpus 0 picks GPUs of this machine; with --ray, Ray places the trials (use --trials-per-gpu and --workers)"
    assert not study_home.exists()
