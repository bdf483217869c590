"""deploy/slurm/study-worker.sbatch run as written on a real one-node Slurm: munge, slurmctld and slurmd of Debian's
slurm-wlm, started on this machine for the test with a slurm.conf of their own (`make test` installs them as root).
An array of 2 workers joins a PostgreSQL study made with `study create`, and the consistency checker counts the
trials; a worker job requeued while its trial is inside an epoch resumes the trial when it runs again. The node
declares the template's resources (GPUs, CPUs, memory) whatever this machine has: the test is about the template
and the workers, not about placement."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from reliability.checks import begun_again, check_consistent, epochs_trained, figures, record_resume, sqlite_uri  # noqa: F401 -- figures: a fixture

from conftest import LENET, ROOT, free_port, hold_env, make_spec, postgres_database, release, run_main, wait_for_holds

pytestmark = pytest.mark.slow

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "scancel")
NODE = socket.gethostname().split(".")[0]


def _config(directory: Path, munge_socket: Path) -> str:
    """A one-node cluster: no cgroups, accounting or MPI (nothing here provides them); the node's resources are
    those it is configured with (config_overrides), two GPUs that are device files of no consequence."""
    (directory / "gres.conf").write_text(f"AutoDetect=off\nNodeName={NODE} Name=gpu File=/dev/null\nNodeName={NODE} Name=gpu File=/dev/zero\n")
    for folder in ("state", "spool"):
        (directory / folder).mkdir()
    settings = {
        "ClusterName": "local", "SlurmctldHost": f"{NODE}(127.0.0.1)", "SlurmctldPort": free_port(), "SlurmdPort": free_port(),
        "AuthType": "auth/munge", "AuthInfo": f"socket={munge_socket}", "CredType": "cred/munge", "SlurmUser": "root", "SlurmdUser": "root",
        "StateSaveLocation": directory / "state", "SlurmdSpoolDir": directory / "spool",
        "SlurmctldPidFile": directory / "slurmctld.pid", "SlurmdPidFile": directory / "slurmd.pid",
        "SlurmctldLogFile": directory / "slurmctld.log", "SlurmdLogFile": directory / "slurmd.log",
        "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none", "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none", "MpiDefault": "none", "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core_Memory", "SlurmdParameters": "config_overrides", "GresTypes": "gpu", "ReturnToService": 2,
    }
    lines = [f"{key}={value}" for key, value in settings.items()]
    lines += [f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs=16 RealMemory=65536 Gres=gpu:2 State=UNKNOWN",
              f"PartitionName=local Nodes={NODE} Default=YES MaxTime=INFINITE State=UP"]
    return "\n".join(lines) + "\n"


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


@pytest.fixture
def slurm(tmp_path_factory):
    """A running one-node Slurm; yields the environment its commands need (SLURM_CONF)."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: apt-get install slurm-wlm munge (make test does so as root)")
    if os.geteuid() != 0:
        pytest.skip("a local slurmd starts jobs as their user only when it runs as root")
    directory = tmp_path_factory.mktemp("slurm")
    directory.chmod(0o700)  # munged refuses a key in a directory others may write
    key = directory / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge_socket = directory / "munge.sock"
    conf = directory / "slurm.conf"
    conf.write_text(_config(directory, munge_socket))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    commands = [["munged", "-F", "--force", f"--socket={munge_socket}", f"--key-file={key}", f"--log-file={directory / 'munged.log'}",
                 f"--pid-file={directory / 'munged.pid'}", f"--seed-file={directory / 'munged.seed'}"],
                ["slurmctld", "-D", "-f", str(conf)],
                ["slurmd", "-D", "-N", NODE, "-f", str(conf)]]
    started = []
    try:
        for command in commands:
            with open(directory / f"{command[0]}.out", "w") as out:
                started.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env))
            if command[0] == "munged":
                _wait_for(lambda: munge_socket.exists(), started, directory, "munged's socket")
        _wait_for(lambda: _node_state(env) == "idle", started, directory, f"node {NODE} idle in sinfo")
        yield env
    finally:
        for process in reversed(started):
            _stop(process)


def _node_state(env: dict) -> str:
    return subprocess.run(["sinfo", "-h", "-n", NODE, "-o", "%T"], capture_output=True, text=True, env=env, check=False).stdout.strip()


def _wait_for(ready, started: list[subprocess.Popen], directory: Path, what: str) -> None:
    deadline = time.monotonic() + 120  # a guard against a daemon that hangs, not a speed limit
    while not ready():
        logs = "\n".join(f"{path.name}: {path.read_text()[-2000:]}" for path in sorted(directory.glob("*.out")))
        assert all(process.poll() is None for process in started), f"a Slurm daemon exited before {what}:\n{logs}"
        assert time.monotonic() < deadline, f"no {what} after 120 s:\n{logs}"
        time.sleep(0.5)


@pytest.fixture
def pg_url():
    with postgres_database("slurm") as url:
        yield url


def test_sbatch_template_runs_an_array_of_workers_on_a_created_study(slurm, tmp_path, pg_url):
    home, submit = tmp_path / "home", tmp_path / "submit"
    submit.mkdir()
    spec = make_spec(tmp_path, "on_slurm", LENET)
    tracking = sqlite_uri(home)
    env = {"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": tracking}
    created = run_main("create", str(spec), "--trials", "4", "--preset", "cpu", "--storage", pg_url, env=env)
    assert created.returncode == 0, created.stderr

    # As the README submits it; sbatch passes this environment on to the tasks. The job's `python` is this one.
    job_env = {**slurm, **env, "STUDY": str(spec), "STUDY_STORAGE": pg_url, "STUDY_CHECKPOINTS": str(tmp_path / "checkpoints"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               "PYTHONPATH": str(ROOT)}
    submitted = subprocess.run(["sbatch", "--wait", "--array=0-1", "--parsable", str(ROOT / "deploy" / "slurm" / "study-worker.sbatch")],
                               cwd=submit, env=job_env, capture_output=True, text=True, timeout=600, check=False)
    logs = {path.name: path.read_text() for path in sorted(submit.glob("study-worker-*.log"))}
    assert submitted.returncode == 0, (submitted.stdout, submitted.stderr, logs)
    job = submitted.stdout.strip().splitlines()[0].split(";")[0]
    assert sorted(logs) == [f"study-worker-{job}_0.log", f"study-worker-{job}_1.log"], logs
    assert not any("error:" in text for text in logs.values()), logs

    counts = check_consistent("on_slurm", pg_url, tracking, total=4)
    assert counts.trials == 4 and counts.lost == 0 and counts.duplicates == 0


def _job_states(env: dict, job: str) -> list[str]:
    """The states of a job's array tasks ([] once Slurm has forgotten the job)."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=env, check=False).stdout
    return re.findall(r"JobState=(\w+)", shown)


# Preemption with PreemptMode=REQUEUE, and an administrator, requeue a job as `scontrol requeue` does; the time limit's
# warning (--signal=B:USR1@120, which `scancel --batch --signal=USR1` sends now) makes the template requeue itself.
@pytest.mark.parametrize("requeue", [["scontrol", "requeue"], ["scancel", "--batch", "--signal=USR1"]], ids=["scontrol-requeue", "time-limit"])
@pytest.mark.usefixtures("figures")  # its row joins the reliability table
def test_a_requeued_worker_job_resumes_its_trial_from_its_checkpoint(slurm, tmp_path, pg_url, requeue):
    home, submit, holds, log = tmp_path / "home", tmp_path / "submit", tmp_path / "holds", tmp_path / "epochs.jsonl"
    submit.mkdir()
    spec = make_spec(tmp_path, "requeued", LENET, fixed={"epochs": 3})
    tracking = sqlite_uri(home)
    env = {"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": tracking}
    created = run_main("create", str(spec), "--trials", "1", "--preset", "cpu", "--storage", pg_url, env=env)
    assert created.returncode == 0, created.stderr
    # The job's `python -m study` imports the hooked trainer (tests/ray_hook/sitecustomize.py): it holds the trial
    # once epoch 3 is under way, and logs every epoch trained.
    job_env = {**slurm, **env, "STUDY": str(spec), "STUDY_STORAGE": pg_url, "STUDY_CHECKPOINTS": str(tmp_path / "checkpoints"),
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOOKED_EPOCH_LOG": str(log),
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "ray_hook")]), **hold_env(holds, "inside:3")}
    submitted = subprocess.run(["sbatch", "--array=0-0", "--parsable", str(ROOT / "deploy" / "slurm" / "study-worker.sbatch")],
                               cwd=submit, env=job_env, capture_output=True, text=True, timeout=120, check=False)
    assert submitted.returncode == 0, (submitted.stdout, submitted.stderr)
    job = submitted.stdout.strip().splitlines()[0].split(";")[0]
    (held,) = wait_for_holds(holds, 1, alive=lambda: bool({"PENDING", "RUNNING", "CONFIGURING"} & set(_job_states(slurm, job))))
    subprocess.run([*requeue, job], env=slurm, capture_output=True, text=True, timeout=60, check=True)

    # The job runs again; its retry passes the start of epoch 3 as well: every hold but the interrupted one is let go.
    deadline = time.monotonic() + 600  # a guard against a hang, not a speed limit
    while _job_states(slurm, job) != ["COMPLETED"]:
        logs = {path.name: path.read_text()[-3000:] for path in submit.glob("*.log")}
        assert time.monotonic() < deadline, (_job_states(slurm, job), logs)
        assert not {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"} & set(_job_states(slurm, job)), logs
        if _job_states(slurm, job) == ["PENDING"]:  # requeued: Slurm would wait about two minutes before starting it again
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, capture_output=True, timeout=60, check=False)
        for hold in wait_for_holds(holds, 0, alive=lambda: True):
            if hold["pid"] != held["pid"] and not Path(f"{hold['path']}.release").exists():
                release(hold)
        time.sleep(0.5)

    (output,) = [path.read_text() for path in submit.glob("study-worker-*.log")]  # both runs of the job, appended
    assert "trial 1 (retry of trial 0): resumed from epoch 2" in output, output
    assert "Traceback" not in output
    assert epochs_trained(log) == [(1, False), (2, False), (3, True)]
    record_resume(f"Slurm worker job requeued ({' '.join(requeue)}) inside epoch 3 of 3", 1, begun_again(log, 3))
    first, retry = optuna.load_study(study_name="requeued", storage=pg_url).trials
    assert first.user_attrs["fail_reason"] == "interrupted"  # recorded by the worker on SIGTERM, not found dead later
    assert retry.user_attrs["resumed_from_epoch"] == 2
    counts = check_consistent("requeued", pg_url, tracking, total=1)
    assert counts.trials == 2 and counts.lost == 0 and counts.duplicates == 0
