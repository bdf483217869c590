"""Servers that accept a connection and never answer, under the project's default settings: the launch
ends with one line naming the address, and nothing is written. The same for an MLflow server that answers
/health but not its API, and a Ray address with nothing behind it. And a first launch's MLflow store is
created whole, so an interrupted or concurrent creation cannot leave every later launch failing."""

from __future__ import annotations

import http.server
import importlib.util
import itertools
import socket
import sqlite3
import threading
import time
import urllib.parse

import pytest

from conftest import free_port, hold_env, journal, run_cli, run_cli_together, run_main, wait_for_holds
from reliability.checks import check_consistent, record_fault, sqlite_uri

# The suite's own outage test shortens MLflow's waits by environment; these tests keep the defaults.
MLFLOW_WAITS = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
BOUND = 60  # seconds: far above what the bounded waits need, far below the hangs they replace
MLFLOW_WAIT = 5  # seconds the probes of an MLflow server wait here ($STUDY_MLFLOW_WAIT): the deadline, not its default, is what is tested
# What each fault in front of MLflow is called in the one line that names its address.
MLFLOW_FAULTS = {"silent_server": "does not answer within", "health_only_server": "answers /health but not its API",
                 "dripping_server": "does not answer within", "dripping_api_server": "answers /health but not its API"}
needs_grpc = pytest.mark.skipif(importlib.util.find_spec("grpc") is None, reason="the gRPC proxy is an optional extra: pip install '.[cluster]'")


@pytest.fixture
def silent_server():
    """A TCP port that accepts every connection and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held, stop = [], threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    listener.close()


def _serving(handler, ended: threading.Event):
    """Serve `handler` on a free port of 127.0.0.1 and yield the port; at the end set `ended`, which lets go of the
    requests it holds, and stop."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    ended.set()
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def health_only_server():
    """An HTTP port that answers /health, as an MLflow server whose tracking store hangs still does, and holds
    every other request (the API) unanswered until the test ends."""
    ended = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/health":
                ended.wait()
                return
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        do_POST = do_GET

        def log_message(self, *args):
            pass  # no line per request on the test's output

    yield from _serving(Handler, ended)


def _dripping(answer_health: bool):
    """An HTTP port that answers each request one byte a second for ever (a status line, then a header that never
    ends), so that no socket timeout ever expires; with `answer_health`, /health answers at once, as MLflow's does."""
    ended = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if answer_health and self.path == "/health":
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")
                return
            for byte in itertools.chain(b"HTTP/1.1 200 OK\r\nX-Drip: ", itertools.repeat(ord("a"))):
                if ended.wait(1):
                    return
                try:
                    self.wfile.write(bytes([byte]))
                except OSError:
                    return  # the client gave up

        do_POST = do_GET

        def log_message(self, *args):
            pass

    yield from _serving(Handler, ended)


@pytest.fixture
def dripping_server():
    yield from _dripping(answer_health=False)


@pytest.fixture
def dripping_api_server():
    """/health answers; the API (a tracking store that answers a byte at a time) drips."""
    yield from _dripping(answer_health=True)


def _default_env(**extra) -> dict:
    return {**dict.fromkeys(MLFLOW_WAITS), "STUDY_MLFLOW_WAIT": str(MLFLOW_WAIT), **extra}  # None: unset


def _run(*args, env):
    return run_cli(*args, env=env, timeout=BOUND)


@pytest.mark.slow  # waits out the default timeouts
@pytest.mark.parametrize("fault", MLFLOW_FAULTS)
def test_mlflow_server_that_never_answers(study_home, lenet_spec, fault, request):
    """Silent, or answering a byte at a time (a wait bounded per read would never end): launch and create end within
    the probe's deadline, named in their one line; `ui` too where /health does not answer."""
    address = f"http://127.0.0.1:{request.getfixturevalue(fault)}"
    commands = [("launch", str(lenet_spec), "--trials", "1"), ("create", str(lenet_spec), "--trials", "1")]
    if MLFLOW_FAULTS[fault] == "does not answer within":
        commands.append(("ui",))
    env = _default_env(STUDY_HOME=str(study_home), MLFLOW_TRACKING_URI=address)
    for command, done in zip(commands, run_cli_together(commands, env=env, timeout=BOUND)):
        assert done.returncode == 1, (command, done.stderr)
        assert done.stderr.count("\n") == 1 and address in done.stderr and f"within {MLFLOW_WAIT} s" in done.stderr, done.stderr
        assert command == ("ui",) or MLFLOW_FAULTS[fault] in done.stderr, done.stderr
    assert not study_home.exists()  # no journal, no study: the tracking server is checked first


@pytest.mark.slow  # waits out the default timeouts
@pytest.mark.parametrize("scheme", ["postgresql", pytest.param("grpc", marks=needs_grpc)])
def test_storage_server_that_never_answers(study_home, lenet_spec, silent_server, scheme):
    """PostgreSQL, and the gRPC storage proxy: launch, and show (the read-only way in), each end with one line naming the address."""
    address = f"postgresql://postgres@127.0.0.1:{silent_server}/study" if scheme == "postgresql" else f"grpc://127.0.0.1:{silent_server}"
    commands = [("launch", str(lenet_spec), "--trials", "1", "--storage", address), ("show", "kill", "--storage", address)]
    for done in run_cli_together(commands, env=_default_env(STUDY_HOME=str(study_home)), timeout=BOUND):
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and f"127.0.0.1:{silent_server}" in done.stderr, done.stderr
        if scheme == "grpc":
            assert "no storage proxy answers" in done.stderr, done.stderr
        assert not study_home.exists()


@needs_grpc
def test_ray_address_with_nothing_behind_it(study_home, lenet_spec):
    port = free_port()  # closed again: nothing listens there
    done = _run("launch", str(lenet_spec), "--trials", "1", "--ray", f"127.0.0.1:{port}", "--checkpoint-dir", str(study_home.parent / "checkpoints"), env=_default_env(STUDY_HOME=str(study_home)))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and f"--ray 127.0.0.1:{port}: no Ray cluster at" in done.stderr, done.stderr
    assert not study_home.exists()


@needs_grpc
@pytest.mark.slow  # waits out the default timeouts
def test_ray_address_that_accepts_and_never_answers(study_home, lenet_spec, silent_server):
    # Ray's loopback-only mode, as tests/test_ray.py's cluster runs: Ray dials 127.0.0.1 as given, where the silent
    # port listens, rather than this machine's network address. No wait is shortened.
    env = _default_env(STUDY_HOME=str(study_home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    done = _run("launch", str(lenet_spec), "--trials", "1", "--ray", f"127.0.0.1:{silent_server}", "--checkpoint-dir", str(study_home.parent / "checkpoints"), env=env)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and f"127.0.0.1:{silent_server}" in done.stderr, done.stderr
    assert "accepts connections but does not answer as a Ray cluster" in done.stderr, done.stderr
    assert not study_home.exists()


def test_half_made_mlflow_store_is_named_in_one_line(study_home, lenet_spec):
    """A store left by an older launch killed while MLflow created its tables."""
    study_home.mkdir()
    store = study_home / "mlflow.db"
    with sqlite3.connect(store) as db:  # what an interrupted creation leaves: some tables, no migrations
        db.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name VARCHAR(256))")
    done = run_cli("launch", str(lenet_spec), "--trials", "1", env={"STUDY_HOME": str(study_home)})
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert str(store) in done.stderr and "move it away" in done.stderr
    store.rename(study_home / "mlflow.db.damaged")
    again = run_cli("launch", str(lenet_spec), "--trials", "1", "--log-model", "none", env={"STUDY_HOME": str(study_home)})
    assert again.returncode == 0, again.stderr


def test_first_launch_killed_while_creating_the_store_and_concurrent_first_launches(forks, study_home, lenet_spec, tmp_path):
    """Kill a first launch once its MLflow store is being built, then start two first launches at once."""
    env = {"STUDY_HOME": str(study_home)}
    argv = ["launch", str(lenet_spec), "--trials", "2", "--log-model", "none"]
    first = forks.start(argv, tmp_path, env | hold_env(tmp_path / "holds", "store"))
    wait_for_holds(tmp_path / "holds", 1, first.alive)
    assert list(study_home.glob(".mlflow.db.building-*"))  # the store is being built: strike now
    first.kill()
    assert first.wait() == -9
    racers = [forks.start(argv, tmp_path, env) for _ in range(2)]
    codes = [racer.wait() for racer in racers]
    # A string, which pytest prints whole (a list's repr is cut in the middle, where the failing racer's error was).
    assert codes == [0, 0], "\n".join(f"--- racer {i}, exit {code}:\n{racer.output()[-3000:]}" for i, (racer, code) in enumerate(zip(racers, codes)))
    assert not list(study_home.glob(".mlflow.db.building-*"))
    record_fault("first launch killed while creating the MLflow store, then 2 first launches at once", 1,
                 check_consistent("kill", journal(study_home), sqlite_uri(study_home), total=2))


@pytest.mark.slow  # waits out the default timeouts
@pytest.mark.parametrize("fault", MLFLOW_FAULTS)
def test_report_and_export_with_a_tracking_server_that_never_answers(tiny_study, tmp_path, fault, request):
    """A study read back while its MLflow server is silent: one line at once, not minutes of retries."""
    address = f"http://127.0.0.1:{request.getfixturevalue(fault)}"
    env = _default_env(STUDY_HOME=str(tiny_study), MLFLOW_TRACKING_URI=address)
    for done in run_cli_together([("report", "tiny", "-o", str(tmp_path / "r.html")), ("export", "tiny", "-o", str(tmp_path / "t.csv"))], env=env, timeout=BOUND):
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and address in done.stderr, done.stderr
        assert MLFLOW_FAULTS[fault] in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []  # neither the report nor the export, nor a temporary one


def test_report_asks_a_tracking_server_that_fails_part_way_nothing_more(study_home, lenet_spec, monkeypatch):
    """MLflow failing once the report is under way (here every training-loss history answers 503, under the MLflow
    waits `study` sets): the report asks for one run's history, not each drawn trial's, and says why the losses are
    missing."""
    import optuna

    from dashboards import report
    from study.cli import MLFLOW_HTTP_DEFAULTS

    assert run_main("launch", str(lenet_spec), "--trials", "3", "--log-model", "none").returncode == 0
    asked = []

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query).get("run_id", [""])[0])
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        monkeypatch.setenv(name, value)
    try:
        frame = report.trials_frame([optuna.load_study(study_name="kill", storage=journal(study_home))])
        section = report.curves_section(frame, report.Mlflow(f"http://127.0.0.1:{server.server_address[1]}", "http://127.0.0.1:5000", []))
    finally:
        server.shutdown()
        server.server_close()
    assert len(set(asked)) == 1 and asked[0] in set(frame["mlflow_run_id"]), asked
    (note,) = [part for part in section.parts if isinstance(part, str) and "stopped answering" in part]
    assert "0 of 3 drawn trials have theirs" in note


def test_a_tracking_server_that_comes_up_late_is_waited_for():
    """Refused at first (a server still starting, or restarting under a crowd of workers): the probes try again with
    backoff until it answers, within the bound; never answering, they end at the bound, which the line names."""
    from study.tracking import TrackingUnreachable, check_reachable

    port = free_port()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_POST = do_GET

        def log_message(self, *args):
            pass

    servers = []

    def start_late():
        servers.append(http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler))
        servers[0].serve_forever()

    late = threading.Timer(1.5, start_late)
    late.start()
    try:
        check_reachable(f"http://127.0.0.1:{port}", wait=BOUND)
        assert servers  # answered by the server that came up, not before it
    finally:
        late.cancel()
        while late.is_alive() and not servers:  # a server starting now: stopped below
            time.sleep(0.05)
        if servers:
            servers[0].shutdown()
            servers[0].server_close()
        late.join()
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnreachable, match=f"MLflow server {nobody} does not answer within 1.5 s"):
        check_reachable(nobody, wait=1.5)


def test_the_mlflow_wait_is_checked_where_it_enters(study_home, lenet_spec):
    for env, args, said in (({"STUDY_MLFLOW_WAIT": "soon"}, (), "STUDY_MLFLOW_WAIT='soon': give the seconds"),
                            ({"STUDY_MLFLOW_WAIT": "inf"}, (), "STUDY_MLFLOW_WAIT='inf'"),
                            ({}, ("--mlflow-wait", "0"), "--mlflow-wait")):
        done = run_main("create", str(lenet_spec), "--trials", "1", *args, env={"STUDY_HOME": str(study_home), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", **env})
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and said in done.stderr, done.stderr
    assert not study_home.exists()
