"""Shared fixtures and helpers: the real Fashion-MNIST files, a study home per test, tiny study specs (make_spec), one
shared launched study, the CLI in-process (run_main) or as a process (run_cli, forked from a server that imported
everything once; fresh=True for a whole new interpreter), and launches held at a phase (hold_env)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

# Under pytest-xdist each test process gets its share of the cores for torch's threads (read when torch starts, here
# and in every process the tests start): threads of parallel tests that outnumber the cores wait on each other.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"  # screenshots and other things worth looking at after a run
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling out, which a closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

# A study small enough for tests: VGG-11 at its minimum input and ratio 16 on a few hundred images, in fp32 (as LENET).
# The second enqueued trial diverges on purpose (the loss overflows), so every run also exercises FAIL. Its lr lies in
# the search space, as every first trial's must: a trial drawn from that space may diverge too.
TINY_SPEC = """
description = "tiny VGG study for tests"

[fixed]
arch = "vgg11"
batch_size = 32
momentum = 0.9
precision = "fp32"
n_train = 256
n_val = 128
n_test = 128

[search]
lr = { low = 0.01, high = 1e12, log = true }
epochs = { low = 1, high = 2 }
resize = { choices = [32] }
ratio = { choices = [16] }

[[enqueue]]
lr = 0.05
epochs = 2
resize = 32
ratio = 16

[[enqueue]]
lr = 1e12
epochs = 1
resize = 32
ratio = 16

[pruner]
name = "median"
n_startup_trials = 2
"""


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """A study home holding `tiny` (TINY_SPEC, 3 trials: COMPLETE, FAIL, one sampled), launched once for every test
    that only reads a launched study (show, report, export, the MLflow layout, the browser). Read it, never launch
    into it; a test that changes the study copies the home first."""
    home = tmp_path_factory.mktemp("shared") / "home"
    spec = home.parent / "tiny.toml"
    spec.write_text(TINY_SPEC)
    result = run_main("launch", str(spec), "--trials", "3", env={"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": None})
    assert result.returncode == 0, result.stderr
    return home


@pytest.fixture(scope="session")
def fashion():
    from objectives import load_fashion_mnist

    return load_fashion_mnist()


@pytest.fixture
def study_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("STUDY_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture
def tiny_spec(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_SPEC)
    return path


# The files that take longest go first: with one test file per test process at a time (`make test`), the processes
# then finish together instead of one waiting on another's last long file.
LONGEST_FIRST = ("test_ray.py", "test_scale.py", "test_mlflow_server.py", "test_progress.py", "reliability/test_secrets.py", "test_report.py",
                 "test_records.py", "reliability/test_unresponsive.py", "reliability/test_matrix_remote.py", "test_mlflow_ui.py",
                 "test_slurm.py", "reliability/test_matrix_local.py", "reliability/test_names.py", "reliability/test_kill.py",
                 "test_tools.py", "reliability/test_faults.py", "test_decide.py", "reliability/test_once.py", "reliability/test_other_host.py")


def pytest_collection_modifyitems(items):
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.relative_to(ROOT / "tests").as_posix(), len(rank)))  # stable: the rest in file order


# ---- test specs ----

# The cheapest trial that still runs the whole trainer: LeNet for one epoch on a few hundred images. Test specs train
# in fp32: "auto" times both precisions of each shape in every process on a CPU with bf16 arithmetic (tests/test_benchmarks.py
# tests that choice).
LENET = {
    "fixed": {"arch": "lenet", "batch_size": 64, "momentum": 0.9, "n_train": 256, "n_val": 128, "n_test": 128, "epochs": 1, "precision": "fp32"},
    "search": {"lr": {"low": 0.01, "high": 0.1, "log": True}},
    "pruner": {"name": "none"},
}


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return repr(value)


def make_spec(directory: Path, name: str, base: dict, **tables) -> Path:
    """Write `<directory>/<name>.toml` (the study is named `name`): the tables of `base`, each updated with the
    keyword of the same name (`fixed={"epochs": 2}`; a value None drops that key); `enqueue` is a list of rows."""
    path = directory / f"{name}.toml"
    path.write_text(spec_text(name, base, **tables))
    return path


def spec_text(name: str, base: dict, **tables) -> str:
    """The TOML text make_spec writes."""
    spec = {table: dict(values) for table, values in base.items() if table != "enqueue"}
    for table, values in tables.items():
        if table != "enqueue":
            spec[table] = {k: v for k, v in {**spec.get(table, {}), **values}.items() if v is not None}
    lines = [f"description = {_toml(spec.pop('description', f'{name}, a test study'))}"]
    for table, values in spec.items():
        lines += ["", f"[{table}]", *(f"{k} = {_toml(v)}" for k, v in values.items())]
    for row in tables.get("enqueue", base.get("enqueue", [])):
        lines += ["", "[[enqueue]]", *(f"{k} = {_toml(v)}" for k, v in row.items())]
    return "\n".join(lines) + "\n"


# ---- commands ----

def run_cli(*args: str, env: dict | None = None, timeout: float = 600, fresh: bool = False) -> subprocess.CompletedProcess:
    """`python -m study ARGS` as a user runs it, in a process of its own: for what only a real process shows (its exit
    status, signals, output streams). Forked from the fork server, which has already imported everything;
    `fresh=True` starts a whole new interpreter, for what the command imports and prints while importing.
    Everything else goes through run_main, in this process."""
    if fresh:
        return subprocess.run([sys.executable, "-m", "study", *args], capture_output=True, text=True, cwd=ROOT,
                              env=command_env(env), timeout=timeout, check=False)
    return run_cli_together([args], env=env, timeout=timeout)[0]


def run_cli_together(commands: list, env: dict | None = None, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Independent commands (argument lists) forked at once, so that their waits overlap; each as run_cli returns it."""
    with tempfile.TemporaryDirectory() as directory:
        started = [fork_server().start(list(args), Path(directory), env, stderr_apart=True) for args in commands]
        codes = [command.wait(timeout) for command in started]
        return [subprocess.CompletedProcess(list(args), code, command.output(), command.errors())
                for args, code, command in zip(commands, codes, started)]


def command_env(env: dict | None) -> dict:
    """A command's environment: this process's, COLUMNS=200 (wide tables), and `env` (a value None unsets)."""
    merged = {**os.environ, "COLUMNS": "200", **(env or {})}
    return {name: value for name, value in merged.items() if value is not None}


class ForkServer:
    """`python -m study` commands as forked processes (see tests/forkserver.py)."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkserver.py")], cwd=ROOT, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
        assert self.process.stdout.readline().strip() == "ready"
        self.count = 0

    def start(self, argv: list[str], log_dir: Path, env: dict | None = None, stderr_apart: bool = False) -> Command:
        """Fork `python -m study ARGV` in command_env(env); its output goes to a log in `log_dir` (standard error
        too, unless `stderr_apart`)."""
        self.count += 1
        log = log_dir / f"command-{self.count}.log"
        errors = log.with_suffix(".err") if stderr_apart else log
        request = {"argv": argv, "stdout": str(log), "stderr": str(errors), "env": command_env(env)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return Command(int(self.process.stdout.readline()), log, errors)

    def close(self):
        self.process.stdin.close()
        self.process.wait(30)


@dataclass
class Command:
    """A forked command: its pid, its logs, and the part of subprocess.Popen's interface the tests use."""
    pid: int
    log: Path
    error_log: Path
    returncode: int | None = None

    def alive(self) -> bool:
        return not Path(f"{self.log}.rc").exists()

    def poll(self) -> int | None:
        return None if self.alive() else self.wait()

    def kill(self, sig=signal.SIGKILL) -> None:
        os.kill(self.pid, sig)

    def send_signal(self, sig) -> None:
        """As Popen's: nothing once the process has ended (a burst of signals outlives it)."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:  # a guard against a hang, not a speed limit
        deadline = time.monotonic() + (timeout or 900)
        while self.alive():
            if time.monotonic() > deadline:
                self.kill()
                raise subprocess.TimeoutExpired(f"study {self.pid}", timeout, self.output())
            time.sleep(0.02)
        self.returncode = int(Path(f"{self.log}.rc").read_text())
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.output(), self.errors()

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def errors(self) -> str:
        return self.error_log.read_text() if self.error_log.exists() else ""


_servers: list[ForkServer] = []  # at most one per test process, started on first use


def fork_server() -> ForkServer:
    if not _servers:
        _servers.append(ForkServer())
    return _servers[0]


def pytest_sessionfinish(session, exitstatus):
    for server in _servers:
        server.close()


@pytest.fixture(scope="session")
def forks():
    return fork_server()


def run_main(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m study ARGS` in this process (the CLI's own `main`), with `env` set for the call (None unsets a
    variable); its exit code and output as run_cli returns them."""
    from study.cli import main

    out, err = io.StringIO(), io.StringIO()
    sigterm = signal.getsignal(signal.SIGTERM)  # a launch turns SIGTERM into Ctrl-C for its duration
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for name, value in {"COLUMNS": "200", **(env or {})}.items():
            if value is None:
                patch.delenv(name, raising=False)
            else:
                patch.setenv(name, value)
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse: usage errors and --help
            code = exit.code if isinstance(exit.code, int) else 1
        finally:
            signal.signal(signal.SIGTERM, sigterm)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


# ---- a launch held at a phase (tests/hooked_study.py) ----

def hold_env(directory: Path, at: str, lr: float | None = None) -> dict:
    """Orders for tests/hooked_study.py: hold every trial (or the one with learning rate `lr`) at phase `at`."""
    directory.mkdir(parents=True, exist_ok=True)
    return {"HOOKED_HOLD_DIR": str(directory), "HOOKED_HOLD_AT": at, **({"HOOKED_HOLD_LR": repr(lr)} if lr is not None else {})}


def start_hooked(*args: str, env: dict) -> Command:
    """`python -m study ARGS` as a process of its own, with the trainer and report writer of tests/hooked_study.py
    (which the fork server imports), so that it stops where `env` says (see hold_env)."""
    return fork_server().start(list(args), Path(tempfile.mkdtemp(prefix="study-command-")), env, stderr_apart=True)


def wait_for_holds(directory: Path, count: int, alive, timeout: float = 600) -> list[dict]:
    """Until `count` processes are held in `directory`: their readiness records (with `path`). Fails if `alive()` turns
    false first (the launch ended without reaching the phase); `timeout` only guards against a hang."""
    deadline = time.monotonic() + timeout
    while True:
        holds = [{**json.loads(path.read_text()), "path": path} for path in sorted(directory.glob("*.json"))]
        if len(holds) >= count:
            return holds
        assert alive(), f"the process ended before {count} trials reached the phase held ({len(holds)} did)"
        assert time.monotonic() < deadline, f"no {count} holds after {timeout:g} s"
        time.sleep(0.05)


def release(hold: dict) -> None:
    Path(f"{hold['path']}.release").touch()


@pytest.fixture(scope="module")
def browser():
    """A real headless Chromium (Debian's), driven by Playwright."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Chromium not found: `make test` installs Debian's chromium (apt-get install chromium)"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A page at laptop width."""
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    yield context.new_page()
    context.close()


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on TCP `port`, read from the kernel's tables (IPv4 and IPv6)."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    # The kernel prints each 32-bit word in host (little-endian) order.
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    addresses.add(socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words))
    return addresses


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, what: str, log=lambda: "", timeout: float = 180) -> None:
    """Poll `url` until it answers; fail with `log()` if `process` ends first, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert process.poll() is None, log()
            assert time.monotonic() < deadline, f"{what} did not come up in {timeout:g} s"
            time.sleep(0.5)


@contextlib.contextmanager
def postgres_database(prefix: str):
    """A fresh database on the local PostgreSQL server, dropped afterwards; yields its URL."""
    import psycopg

    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@contextlib.contextmanager
def storage_proxy(storage_url: str, log: Path, host: str = "127.0.0.1"):
    """`python -m study serve-storage --storage STORAGE_URL` on a free port of `host`, logging to `log`; yields its grpc://
    URL, then stops it with Ctrl-C, which it must answer with exit 0."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "study", "serve-storage", "--storage", storage_url, "--host", host, "--port", str(port)],
                                   cwd=ROOT,
                                   stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a speed limit
        while "serving" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "serve-storage did not start"
            time.sleep(0.1)
        yield f"grpc://{host}:{port}"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()  # never leave a server behind, whatever the assertion below says
                process.wait(30)
    assert code == 0, log.read_text()


def storage_params() -> list:
    """Every kind of storage the project names (study.storage.STORAGE_KINDS), by name, for pytest.mark.parametrize: a kind
    that lives on a server is marked slow, since the test starts one (a PostgreSQL database, a storage proxy)."""
    from study.storage import STORAGE_KINDS

    return [kind.name if kind.file is not None else pytest.param(kind.name, marks=pytest.mark.slow) for kind in STORAGE_KINDS]


def journal(home: Path):
    """The Optuna journal storage a launch keeps in the study home `home`."""
    import optuna

    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(home / "optuna.journal")))
