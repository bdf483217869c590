"""The reliability suite's shared parts: the consistency checker run after every fault, the figures it
publishes (test-artifacts/reliability.json and .md, the README's "Reliability" table), and the real
processes and servers the faults hit.

`RELIABILITY_REPEATS` (default 20) is the number of seeded kill -9 repetitions; `RELIABILITY_SEED`
(default 9) seeds where they strike. A soak: `RELIABILITY_REPEATS=200 .venv/bin/python -m pytest tests/reliability`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import ARTIFACTS, LENET, ROOT, command_env, free_port, make_spec, postgres_database, wait_until_up

REPEATS = int(os.environ.get("RELIABILITY_REPEATS", "20"))
SEED = int(os.environ.get("RELIABILITY_SEED", "9"))
FIGURES_JSON = ARTIFACTS / "reliability.json"
FIGURES_MD = ARTIFACTS / "reliability.md"

# ---- figures: what the README's table shows, written at the end of the session ----

def _empty_figures() -> dict:
    return {"faults": {}, "hostile": {}, "resumes": {}, "bad_inputs": {"tried": 0, "tracebacks": 0}, "read_only": {"commands": 0, "files_changed": 0}}


FIGURES: dict = _empty_figures()


def record_fault(kind: str, repetitions: int, counts: Counts) -> None:
    _add_row(FIGURES["faults"], kind, {"repetitions": repetitions, "trials_checked": counts.trials, "trials_lost": counts.lost,
                                       "duplicates": counts.duplicates})


def _add_row(table: dict, kind: str, row: dict) -> None:
    total = table.setdefault(kind, dict.fromkeys(row, 0))
    for key, value in row.items():
        total[key] += value


def record_resume(kind: str, interrupted: int, trained_again: int) -> None:
    """Trials interrupted during an epoch and resumed, and the epochs their retries trained that they had trained already."""
    _add_row(FIGURES["resumes"], kind, {"interrupted": interrupted, "trained_again": trained_again})


def epochs_trained(log: Path, lr: float | None = None) -> list[tuple[int, bool]]:
    """The epochs a HOOKED_EPOCH_LOG recorded (tests/hooked_study.py), in order: (epoch, trained by a resumed run);
    with `lr`, those of the trials with that learning rate only (a trial and its retry share it)."""
    rows = map(json.loads, log.read_text().splitlines())
    return [(row["epoch"], row["resumed"]) for row in rows if lr is None or row["lr"] == lr]


def begun_again(log: Path, interrupted_in: int, lr: float | None = None) -> int:
    """Epochs a retry trained that the interrupted trial had begun (it was interrupted in epoch `interrupted_in`)."""
    return sum(resumed and epoch <= interrupted_in for epoch, resumed in epochs_trained(log, lr))


def record_hostile(kind: str, tried: int, files_outside: int = 0, secrets_shown: int = 0, duplicates: int = 0) -> None:
    """Hostile input (odd names, planted secrets, commands raced against each other) and what escaped: files written
    outside the study home and the output path, secrets shown anywhere, things done twice that must happen once."""
    _add_row(FIGURES["hostile"], kind, {"tried": tried, "files_outside": files_outside, "secrets_shown": secrets_shown, "duplicates": duplicates})


def record_bad_inputs(tried: int, tracebacks: int) -> None:
    FIGURES["bad_inputs"]["tried"] += tried
    FIGURES["bad_inputs"]["tracebacks"] += tracebacks


def record_read_only(commands: int, changed: int) -> None:
    """Read-only commands run against a launched study, and the files they created, changed or removed."""
    FIGURES["read_only"]["commands"] += commands
    FIGURES["read_only"]["files_changed"] += changed


def figures_markdown(figures: dict) -> str:
    lines = ["| fault injected | repetitions | trials checked | trials lost | duplicates |", "|---|---:|---:|---:|---:|"]
    for kind, row in sorted(figures["faults"].items()):
        lines.append(f"| {kind} | {row['repetitions']} | {row['trials_checked']} | {row['trials_lost']} | {row['duplicates']} |")
    if figures.get("hostile"):
        lines += ["", "| hostile input | tried | files outside | secrets shown | duplicates |", "|---|---:|---:|---:|---:|"]
        for kind, row in sorted(figures["hostile"].items()):
            lines.append(f"| {kind} | {row['tried']} | {row['files_outside']} | {row['secrets_shown']} | {row['duplicates']} |")
    if figures.get("resumes"):
        lines += ["", "| interruption, then resume | trials interrupted | epochs trained again |", "|---|---:|---:|"]
        for kind, row in sorted(figures["resumes"].items()):
            lines.append(f"| {kind} | {row['interrupted']} | {row['trained_again']} |")
    bad = figures["bad_inputs"]
    lines += ["", "| bad inputs tried | tracebacks shown |", "|---:|---:|", f"| {bad['tried']} | {bad['tracebacks']} |"]
    read_only = figures["read_only"]
    lines += ["", "| read-only commands run | files changed |", "|---:|---:|", f"| {read_only['commands']} | {read_only['files_changed']} |"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session", autouse=True)
def figures():
    yield FIGURES
    if not (FIGURES["faults"] or FIGURES["hostile"] or FIGURES["resumes"] or FIGURES["bad_inputs"]["tried"] or FIGURES["read_only"]["commands"]):
        return
    ARTIFACTS.mkdir(exist_ok=True)
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # under pytest-xdist each worker holds its share of the figures
    with open(ARTIFACTS / ".reliability.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = FIGURES
        if run:
            share = ARTIFACTS / f".reliability-{os.environ['PYTEST_XDIST_WORKER']}.json"
            share.write_text(json.dumps({**FIGURES, "run": run}))
            merged = _empty_figures()
            for path in ARTIFACTS.glob(".reliability-*.json"):
                part = json.loads(path.read_text())
                if part["run"] == run:
                    for table in ("faults", "hostile", "resumes"):
                        for kind, row in part.get(table, {}).items():
                            _add_row(merged[table], kind, row)
                    for table in ("bad_inputs", "read_only"):
                        for key in merged[table]:
                            merged[table][key] += part[table][key]
        FIGURES_JSON.write_text(json.dumps({**merged, "seed": SEED, "repeats": REPEATS}, indent=2) + "\n")
        FIGURES_MD.write_text(figures_markdown(merged))


# ---- the checker ----

@dataclass
class Counts:
    trials: int = 0
    lost: int = 0
    duplicates: int = 0


def check_consistent(study_name: str, storage, tracking_uri: str, total: int | None = None) -> Counts:
    """Optuna and MLflow agree and nothing is lost or doubled.

    Every finished trial has exactly one MLflow child run with the same state (tag and status) and the same
    values; no run is RUNNING; every interrupted trial ran again exactly once with the same params; no trial is
    left RUNNING or WAITING; the study holds exactly `total` trials that count. Returns the counts, and fails
    with the list of problems after recording them.
    """
    from records import CONFIG, MLFLOW_RUN_ID, STUDY_UID, count_done, parent_runs, retry_source, trial_runs

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials()
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(study_name)
    # This study's runs: those under its parent, found by the study's identity (other storages' studies of the
    # same name may share the experiment).
    parents = parent_runs(client, experiment.experiment_id, study.user_attrs.get(STUDY_UID)) if experiment else []
    children = trial_runs(client, experiment.experiment_id, parents[0].info.run_id) if parents else {}
    runs = parents[:1] + [run for found in children.values() for run in found]
    counts, problems = Counts(trials=len(trials)), []

    def lost(why):
        counts.lost += 1
        problems.append(f"lost: {why}")

    def doubled(why, n=1):
        counts.duplicates += n
        problems.append(f"duplicate: {why}")

    numbers = [t.number for t in trials]
    if len(set(numbers)) != len(numbers):
        doubled(f"trial numbers repeat: {numbers}", len(numbers) - len(set(numbers)))
    for trial in trials:
        if not trial.state.is_finished():
            lost(f"trial {trial.number} left {trial.state.name}")
            continue
        found = children.get(trial.number, [])
        if not found:
            lost(f"trial {trial.number} ({trial.state.name}) has no MLflow run")
            continue
        if len(found) > 1:
            doubled(f"trial {trial.number} has {len(found)} MLflow runs", len(found) - 1)
        run = found[0]
        interrupted = bool(trial.user_attrs.get("interrupted")) or run.data.tags.get("optuna.fail_reason", "").startswith("worker stopped sending heartbeats")
        expected = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "KILLED" if interrupted else "FAILED"}[trial.state.name]
        if run.info.status != expected:
            problems.append(f"trial {trial.number} ({trial.state.name}): MLflow status {run.info.status}, expected {expected}")
        if run.data.tags.get("optuna.state") != trial.state.name:
            problems.append(f"trial {trial.number}: MLflow tag optuna.state {run.data.tags.get('optuna.state')}, Optuna {trial.state.name}")
        if "fail_reason" in trial.user_attrs and run.data.tags.get("optuna.fail_reason") != trial.user_attrs["fail_reason"]:
            problems.append(f"trial {trial.number}: fail reason {run.data.tags.get('optuna.fail_reason')!r} in MLflow, {trial.user_attrs['fail_reason']!r} in Optuna")
        if trial.state == TrialState.COMPLETE:
            if run.data.metrics.get("val_accuracy") != trial.values[0]:
                problems.append(f"trial {trial.number}: val_accuracy {run.data.metrics.get('val_accuracy')} in MLflow, {trial.values[0]} in Optuna")
            if run.data.metrics.get("test_accuracy") != trial.user_attrs.get("test_accuracy"):
                problems.append(f"trial {trial.number}: test_accuracy differs between MLflow and Optuna")
        recorded = trial.user_attrs.get(MLFLOW_RUN_ID)
        if recorded and recorded != run.info.run_id and _run_exists(client, recorded):  # a rebuilt store's runs have new ids
            problems.append(f"trial {trial.number}: user attr mlflow_run_id is not its run")
        if run.info.lifecycle_stage != "active":
            problems.append(f"trial {trial.number}: its MLflow run {run.info.run_id} is {run.info.lifecycle_stage}")
        for name, value in trial.params.items():
            if CONFIG in trial.user_attrs and trial.user_attrs[CONFIG][name] != value:
                problems.append(f"trial {trial.number}: Optuna holds {name}={value}, but {trial.user_attrs[CONFIG][name]} trained")
            if name in run.data.params and run.data.params[name] != str(value):
                problems.append(f"trial {trial.number}: param {name} {run.data.params[name]} in MLflow, {value} in Optuna")
        if interrupted:
            retries = [t for t in trials if retry_source(t) == trial.number]
            if not retries:
                lost(f"interrupted trial {trial.number} never ran again")
            elif len(retries) > 1:
                doubled(f"interrupted trial {trial.number} ran again {len(retries)} times", len(retries) - 1)
            elif trial.params and retries[0].params != trial.params:
                problems.append(f"trial {trial.number}: its retry has other params")
    for number in sorted(set(children) - set(numbers)):
        doubled(f"MLflow run for trial {number}, which Optuna does not hold")
    for run in runs:
        if run.info.status == "RUNNING":
            problems.append(f"MLflow run {run.info.run_name} left RUNNING")
    if len(parents) != 1:
        problems.append(f"{len(parents)} parent runs")
    if total is not None:
        done = count_done(trials)
        if done < total:
            lost(f"the study holds {done} finished trials of {total}")
        elif done > total:
            doubled(f"the study holds {done} finished trials, {total} asked", done - total)
    if problems:
        pytest.fail("\n".join(problems))
    return counts


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True


# ---- what a command changed ----

def fingerprint(*roots: Path, database: str | None = None) -> dict[str, str]:
    """What a command could change: every file under `roots` (its sha256, by path; directories and links by path
    too, so one created or removed shows), and every row of every table of the PostgreSQL `database`."""
    seen = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if path.is_symlink():
                seen[str(path)] = f"link to {os.readlink(path)}"
            elif path.is_dir():
                seen[str(path)] = "directory"
            else:
                seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    if database is not None:
        import psycopg

        with psycopg.connect(database) as connection:
            tables = [name for (name,) in connection.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
            for table in tables:
                seen[f"{database} {table}"] = repr(sorted(map(repr, connection.execute(f'SELECT * FROM "{table}"'))))
    return seen


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))



# ---- processes ----

def sqlite_uri(home: Path) -> str:
    return f"sqlite:///{(home / 'mlflow.db').resolve()}"


@pytest.fixture
def lenet_spec(tmp_path):
    return make_spec(tmp_path, "kill", LENET)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs, so that a write can really run out of space (see `fill`)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", f"tmpfs-{uuid.uuid4().hex[:8]}", str(mount)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path, leave: int = 0) -> Path:
    """Fill the file system at `mount` with one file, then give back about `leave` bytes; returns that file, whose
    removal frees the space again."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    os.ftruncate(fd, max(os.fstat(fd).st_size - leave, 0))
    os.close(fd)
    return filler


@pytest.fixture(scope="module")
def postgres_db():
    """A fresh PostgreSQL database (Optuna storage), dropped afterwards; yields (url, name, admin connection)."""
    import psycopg

    with postgres_database("reliability") as url:
        optuna.storages.RDBStorage(url).engine.dispose()  # the tables, before processes race to create them
        admin = psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True)
        try:
            yield url, url.rsplit("/", 1)[1], admin
        finally:
            admin.close()


class MlflowServer:
    """A real `mlflow server` subprocess on a SQLite store, that can be stopped and started again on its port."""

    def __init__(self, directory: Path):
        self.directory, self.port, self.process = directory, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.directory / "server.log", "a")  # noqa: SIM115 -- kept by the server process
        self.process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.directory / 'mlflow.db'}",
                                         "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                                         "--default-artifact-root", (self.directory / "artifacts").as_uri()],
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_up(f"{self.url}/health", self.process, "mlflow server", log=lambda: (self.directory / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server and its uvicorn worker, at once
            self.process.wait(30)
        self.process = None


# ---- another host ----

@dataclass
class OtherHost:
    """Commands run as a host that is not this one: under a host name of their own (a UTS namespace) and, once
    `isolate` was called, in a network namespace of their own, joined to this one only by a veth pair on a private
    /30: this host is `address` there, the other host `peer`. Servers the other host must reach listen on `address`;
    127.0.0.1 there is the other host's own. Everything it made goes in `close`."""

    name: str
    log_dir: Path
    netns: str | None = None
    link: str | None = None  # this host's end of the veth pair; the other host's is this name + "p"
    address: str | None = None
    peer: str | None = None
    processes: list[subprocess.Popen] = field(default_factory=list)

    def isolate(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.netns, self.link = f"cnn-study-{tag}", f"cs{tag}"
        # A /30 drawn in 10.231.0.0/16, so that tests running at once rarely share one; `ip` refuses a clash loudly.
        base = random.randrange(0, 2**16, 4)
        self.address, self.peer = f"10.231.{base >> 8}.{(base & 255) + 1}", f"10.231.{base >> 8}.{(base & 255) + 2}"
        for command in (["netns", "add", self.netns],
                        ["link", "add", self.link, "type", "veth", "peer", "name", f"{self.link}p", "netns", self.netns],
                        ["addr", "add", f"{self.address}/30", "dev", self.link],
                        ["link", "set", self.link, "up"],
                        ["-n", self.netns, "addr", "add", f"{self.peer}/30", "dev", f"{self.link}p"],
                        ["-n", self.netns, "link", "set", f"{self.link}p", "up"],
                        ["-n", self.netns, "link", "set", "lo", "up"]):
            subprocess.run(["ip", *command], check=True, capture_output=True)

    def cut(self, down: bool = True) -> None:
        """Cut the network between the two hosts (down=False: join them again)."""
        subprocess.run(["ip", "link", "set", self.link, "down" if down else "up"], check=True, capture_output=True)

    def start(self, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        """`python -m study ARGV` on this host, with the trainer and report writer of tests/hooked_study.py (hold_env
        holds it at a phase); its output in a log of `log_dir`, the process's `log`."""
        return self.spawn([sys.executable, str(ROOT / "tests" / "hooked_study.py"), *argv], {**(env or {}), "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})

    def spawn(self, command: list[str], env: dict | None = None) -> subprocess.Popen:
        """Any command on this host, in a session of its own; its output in a log of `log_dir`, the process's `log`."""
        inside = ["ip", "netns", "exec", self.netns] if self.netns else []
        log = self.log_dir / f"{self.name}-{len(self.processes)}.log"
        with open(log, "w") as out:
            process = subprocess.Popen([*inside, "unshare", "--uts", "sh", "-c", f'hostname {self.name} && exec "$@"', "sh", *command],
                                       cwd=self.log_dir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=command_env(env))
        process.log = log
        self.processes.append(process)
        return process

    def kill_all(self) -> int:
        """kill -9 of every process on this host, as a machine that loses power: all those in the host-name namespaces of
        its running commands, also the ones that left their command's session (a Ray node's raylet and workers).
        Returns how many were killed."""
        namespaces = {_namespace(process.pid) for process in self.processes if process.poll() is None} - {None, _namespace(os.getpid())}
        killed = 0
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _namespace(int(entry.name)) in namespaces:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed += 1
        for process in self.processes:
            process.poll()  # reaped now, so that they are not counted again
        return killed

    def run(self, *command: str) -> subprocess.CompletedProcess:
        """A plain command on this host (in its network namespace)."""
        inside = ["ip", "netns", "exec", self.netns] if self.netns else []
        return subprocess.run([*inside, *command], capture_output=True, text=True, check=False, timeout=60)

    def close(self) -> None:
        self.kill_all()
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(30)
        if self.netns is not None:
            # Deleting the namespace deletes its end of the pair, and with it this end.
            subprocess.run(["ip", "netns", "del", self.netns], check=False, capture_output=True)
            subprocess.run(["ip", "link", "del", self.link], check=False, capture_output=True)


def _namespace(pid: int) -> str | None:
    """The UTS (host name) namespace of a process, None once it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/uts")
    except OSError:
        return None


@pytest.fixture
def other_host(tmp_path):
    """OtherHost `hosta`; its processes, namespaces and links are gone after the test, whatever its outcome."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("another host needs root, unshare (util-linux) and ip (iproute2)")
    host = OtherHost("hosta", tmp_path)
    try:
        yield host
    finally:
        host.close()
