"""How many `study worker` processes one storage holds: a load test on loopback PostgreSQL, direct and through
Optuna's gRPC storage proxy (`python -m study serve-storage`).

    python -m benchmarks.load --workers 8 32 64 --trials-per-worker 2

Claim: the table in benchmarks/RESULTS.md ("Workers per storage"), with 0 trials lost, 0 duplicated and the
study's total never exceeded where the storage held the workers. Evidence: for each storage and worker count,
a fresh PostgreSQL database and study of N x trials-per-worker trials, N worker processes running the real
`study worker` code path (session, claim lock, ask, per-epoch report, tell, MLflow mirror on an `mlflow server`)
with the trainer replaced by one that returns at once, so only the storage and MLflow are measured. Models are
not logged (as `--log-model none`) and no data is loaded. Workers are forked from one process that has imported
everything, so that 64 of them fit in memory and start together (a barrier before the first trial).

Reported per run: trials per second (finished trials over the time from the first trial's start to the last
one's end, as the storage records them), p50/p99 of `Study.ask`, of the whole claim (advisory lock, count, ask) and of `Study.tell`, in ms;
workers that failed and why; trials finished of the total; trials lost (left RUNNING or WAITING), duplicated (a trial number or
an MLflow run twice) and over the total.

Every wait follows --timeout: each server's start, the workers' start (the barrier), and each run, whose workers stop
starting trials after --timeout and are killed at twice --timeout (counted failed). Each row is written to --output as
soon as it is measured; a run that fails (a server that does not start, workers not at the barrier in time) is a row
with the reason, and the next runs go on. Every process the benchmark starts or forks is gone when it ends, also on
Ctrl-C or SIGTERM. Exit 1 when a row failed.

PostgreSQL: --admin-url names a server where this may create and drop databases (default: the local one).
A server's max_connections bounds the direct storage: each worker holds one connection, and each MLflow server process
at most --mlflow-pool.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SPEC = """
description = "load test: a LeNet spec whose trainer returns at once"

[fixed]
arch = "lenet"
epochs = 1
n_train = 256
n_val = 128
n_test = 128

[search]
lr = { low = 0.001, high = 0.1, log = true }

[pruner]
name = "none"
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not up after {timeout:g} s (--timeout)")
        time.sleep(0.05)


@contextlib.contextmanager
def database(admin_url: str):
    """A fresh PostgreSQL database, dropped afterwards; yields its URL."""
    import psycopg

    name = f"load_{secrets.token_hex(4)}"
    base = admin_url.rsplit("/", 1)[0]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def process(command: list[str], log: Path, ready, what: str, timeout: float, env: dict | None = None):
    """A server subprocess in its own process group, up once `ready(log text)` holds within `timeout`; the whole group
    (a server's own workers too) stopped afterwards: SIGTERM, then SIGKILL after `timeout`."""
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})
    try:
        wait_for(lambda: ready(log.read_text()) or child.poll() is not None, timeout, what)
        if child.poll() is not None:
            raise RuntimeError(f"{what} ended: {log.read_text().strip().splitlines()[-1:]}")
        yield child
    finally:
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # what is left of the group: a server's workers outlive their parent
        child.wait()


# ---- inside each forked worker ----

def instant_train(config, data, on_epoch=None, checkpoint=None, resume=None):
    """A trainer that trains nothing: one reported epoch, then a result, as a real trainer returns them."""
    from objectives import EpochMetrics, TrainResult

    accuracy = 0.1 + 0.8 * config.lr  # a value that depends on the params, so the sampler has something to follow
    metrics = EpochMetrics(epoch=1, train_loss=1.0, train_accuracy=accuracy, val_accuracy=accuracy, epoch_seconds=0.0, examples_per_second=0.0)
    stopped = bool(on_epoch(metrics)) if on_epoch is not None else False
    return TrainResult(val_accuracy=accuracy, test_accuracy=accuracy, train_loss=1.0, train_accuracy=accuracy, history=[metrics], epochs_run=1,
                       stopped_early=stopped, train_seconds=0.0, wall_seconds=0.0, examples_per_second=0.0, flops_per_example=0, train_flops=0,
                       param_count=0, peak_memory_bytes=0, peak_memory_source="none", device_name="none", precision="fp32", channels_last=False, cuda_graph=False,
                       config=config)


def timed(target, name: str, samples: dict[str, list[float]]):
    """Study.ask or Study.tell, its durations on the storage added to samples[name]; not those on an in-memory study
    (the launch validation's dry run, the budget's forecast draws), which say nothing about the storage."""
    import optuna

    def wrapper(study, *args, **kwargs):
        start = time.perf_counter()
        try:
            return target(study, *args, **kwargs)
        finally:
            if not isinstance(study._storage, optuna.storages.InMemoryStorage):
                samples[name].append(time.perf_counter() - start)
    return wrapper


def worker_main(argv: list[str], go: Path, out: Path) -> None:
    """One forked worker: the real `study worker` command with the trainer replaced; its latencies to `out`."""
    import optuna

    import objectives
    import study.cli
    import study.launch

    samples: dict[str, list[float]] = {"ask": [], "tell": [], "claim": []}
    optuna.Study.ask = timed(optuna.Study.ask, "ask", samples)
    optuna.Study.tell = timed(optuna.Study.tell, "tell", samples)
    claim_lock = study.launch.claim_lock

    @contextlib.contextmanager
    def timed_claim(*args):
        start = time.perf_counter()
        with claim_lock(*args):
            yield
        samples["claim"].append(time.perf_counter() - start)

    def barrier(data_dir=None):
        (go.parent / f"ready-{os.getpid()}").touch()  # this worker has its session and MLflow client
        while not go.exists():  # start the trials together
            time.sleep(0.01)

    study.launch.claim_lock = timed_claim
    study.launch.load_fashion_mnist = barrier
    study.launch.TrialRunner._keeps_model = lambda self, frozen: False  # no model logging: storage and MLflow runs only
    objectives.train = instant_train
    code, error = 1, ""
    try:
        code = study.cli.main(argv)
    except BaseException as failure:  # noqa: BLE001 -- recorded, the parent reports it
        error = f"{type(failure).__name__}: {failure}".splitlines()[0]
    out.write_text(json.dumps({"code": code, "error": error, **samples}))


def fork_workers(count: int, argv: list[str], go: Path, directory: Path) -> list[tuple[int, Path]]:
    workers = []
    sys.stdout.flush()  # or the children print the parent's buffered lines again
    for index in range(count):
        out = directory / f"worker-{index}.json"
        log = directory / f"worker-{index}.log"
        pid = os.fork()
        if pid == 0:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 -- the process's own stdout
            try:
                worker_main(argv, go, out)
            finally:
                os._exit(0)
        workers.append((pid, out))
    return workers


# ---- one run ----

@dataclass
class Row:
    storage: str
    workers: int
    total: int
    seconds: float
    finished: int
    trials_per_second: float
    ask_p50: float
    ask_p99: float
    claim_p50: float
    claim_p99: float
    tell_p50: float
    tell_p99: float
    workers_failed: int
    failure: str
    lost: int
    duplicated: int
    over_total: int
    connections_peak: int  # PostgreSQL's client connections at most during the run, this benchmark's sampler included

    @classmethod
    def failed(cls, storage: str, workers: int, total: int, reason: str) -> Row:
        """A run that measured nothing: every worker counted failed, with the reason."""
        nan = float("nan")
        return cls(storage, workers, total, nan, 0, nan, nan, nan, nan, nan, nan, nan, workers, reason, 0, 0, 0, 0)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def count(study_name: str, storage_url: str, tracking_uri: str, total: int) -> tuple[int, int, int, int, float]:
    """(finished trials that count, lost, duplicated, over the total, seconds from the first trial's start to the
    last one's end) from the storage and MLflow."""
    import optuna
    from mlflow.tracking import MlflowClient

    from records import count_done

    trials = optuna.load_study(study_name=study_name, storage=storage_url).get_trials(deepcopy=False)
    done = count_done(trials)
    lost = sum(not t.state.is_finished() for t in trials)  # left RUNNING or WAITING; a run cut by --timeout shows fewer trials instead
    numbers = [t.number for t in trials]
    duplicated = len(numbers) - len(set(numbers))
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(study_name)
    runs = client.search_runs([experiment.experiment_id], max_results=50000) if experiment else []
    run_numbers = [r.data.tags["optuna.trial_number"] for r in runs if "optuna.trial_number" in r.data.tags]
    duplicated += len(run_numbers) - len(set(run_numbers))
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    span = (max(ends) - min(starts)).total_seconds() if starts and ends else float("nan")
    return done, lost, duplicated, max(0, done - total), span


def measure(kind: str, workers: int, per_worker: int, admin_url: str, tracking_uri: str, directory: Path, timeout: float) -> Row:
    """One run's row; a run that fails is a row with the reason."""
    try:
        return run(kind, workers, per_worker, admin_url, tracking_uri, directory, timeout)
    except Exception as error:  # noqa: BLE001 -- any failure of one run is its row's reason; the next runs go on
        return Row.failed(kind, workers, workers * per_worker, reason(error))


def reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}".rstrip(": ")


def run(kind: str, workers: int, per_worker: int, admin_url: str, tracking_uri: str, directory: Path, timeout: float) -> Row:
    from study.session import Request, open_session
    from study.specs import load_spec
    from study.tracking import Tracker

    total = workers * per_worker
    name = f"load_{kind}_{workers}"
    run_dir = directory / name
    run_dir.mkdir()
    spec = run_dir / f"{name}.toml"
    spec.write_text(SPEC)
    with database(admin_url) as url, contextlib.ExitStack() as stack:
        storage_url = url
        if kind == "proxy":
            port = free_port()
            stack.enter_context(process([sys.executable, "-m", "study", "serve-storage", "--storage", url, "--port", str(port)],
                                        run_dir / "serve.log", lambda text: "serving" in text, "serve-storage", timeout))
            storage_url = f"grpc://127.0.0.1:{port}"
        # The study, created as `launch` creates it (its total recorded), directly in PostgreSQL: no gRPC channel in this
        # process, which forks the workers. The workers join it.
        session = open_session(Request(name=str(spec), trials=total, preset="cpu", storage=url), load_spec(str(spec)))
        session.storage.engine.dispose()  # no connection of this process is inherited by the workers
        del session
        Tracker(name, tracking_uri)  # the study's MLflow experiment and parent run, as `launch` makes them before any worker
        go = run_dir / "go"
        argv = ["worker", str(spec), "--storage", storage_url, "--timeout", str(timeout), "--checkpoint-dir", str(run_dir / "checkpoints")]
        children = fork_workers(workers, argv, go, run_dir)
        pending = {pid for pid, _ in children}
        stack.callback(kill, pending)  # whatever ends the run, no worker outlives it
        wait_for(lambda: sum(1 for _ in run_dir.glob("ready-*")) + sum(out.exists() for _, out in children) >= workers, timeout,
                 f"{workers} workers at the barrier")
        start = time.monotonic()
        go.touch()
        deadline = start + 2 * timeout  # the workers stop starting trials at --timeout; one still busy at twice that is killed
        peak = [0]
        with peak_connections(admin_url, peak):  # started after the forks: no thread of this process is forked
            while pending and time.monotonic() < deadline:
                for pid in list(pending):
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        pending.discard(pid)
                time.sleep(0.05)
        kill(pending)  # past the bound: stopped, and counted as failed
        results = [json.loads(out.read_text()) if out.exists() else {"code": -9, "error": "killed at the time bound", "ask": [], "tell": [], "claim": []}
                   for _, out in children]
        failed = [r for r in results if r["code"] != 0]
        failure = failed[0]["error"] or _last_error(run_dir) if failed else ""
        done, lost, duplicated, over, seconds = count(name, url, tracking_uri, total)
    samples = {key: [v for r in results for v in r[key]] for key in ("ask", "tell", "claim")}
    return Row(kind, workers, total, seconds, done, done / seconds, percentile(samples["ask"], 0.5), percentile(samples["ask"], 0.99),
               percentile(samples["claim"], 0.5), percentile(samples["claim"], 0.99), percentile(samples["tell"], 0.5),
               percentile(samples["tell"], 0.99), len(failed), failure, lost, duplicated, over, peak[0])


def kill(pids: set[int]) -> None:
    """SIGKILL the forked workers still running, and reap them."""
    for pid in list(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        pids.discard(pid)


@contextlib.contextmanager
def peak_connections(admin_url: str, peak: list[int]):
    """The most client connections the PostgreSQL server held (every database: workers, MLflow server, proxy), sampled
    every 0.2 s while the block runs, into peak[0]."""
    import threading

    import psycopg

    stop = threading.Event()

    def sample():
        with psycopg.connect(admin_url, autocommit=True) as admin:
            while not stop.is_set():
                count = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'").fetchone()[0]
                peak[0] = max(peak[0], count)
                stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()


def _last_error(run_dir: Path) -> str:
    for log in sorted(run_dir.glob("worker-*.log")):
        lines = [line for line in log.read_text().splitlines() if line.startswith("error:")]
        if lines:
            return lines[-1]
    return ""


def table(rows: list[Row]) -> str:
    lines = ["| storage | workers | trials | trials/s | ask p50 / p99 ms | claim p50 / p99 ms | tell p50 / p99 ms | workers failed | lost | duplicated | over total | PostgreSQL connections, peak |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        failed = f"{r.workers_failed} ({r.failure})" if r.workers_failed or r.failure else "0"
        lines.append(f"| {r.storage} | {r.workers} | {r.finished}/{r.total} | {r.trials_per_second:.1f} | {r.ask_p50:.0f} / {r.ask_p99:.0f} | "
                     f"{r.claim_p50:.0f} / {r.claim_p99:.0f} | {r.tell_p50:.0f} / {r.tell_p99:.0f} | {failed} | {r.lost} | {r.duplicated} | {r.over_total} | {r.connections_peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 32, 64], help="worker counts to run (default: 8 32 64)")
    parser.add_argument("--trials-per-worker", type=int, default=2, help="the study's total is workers x this (default: 2)")
    parser.add_argument("--storages", nargs="+", choices=["direct", "proxy"], default=["direct", "proxy"])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="a PostgreSQL server where databases may be created")
    parser.add_argument("--timeout", type=float, default=300, help="the bound of every wait in seconds: a server's start, the workers' start, "
                                                                   "each run's trials (its workers are killed at twice this) (default: 300)")
    parser.add_argument("--mlflow-workers", type=int, default=4, help="the MLflow server's worker processes (default: 4)")
    parser.add_argument("--mlflow-pool", type=int, default=6, help="PostgreSQL connections of each MLflow server process (default: 6)")
    parser.add_argument("-o", "--output", default="benchmarks/load.json", help="the rows with their settings (default: benchmarks/load.json)")
    args = parser.parse_args(argv)

    # Everything a worker imports, imported once here, before the forks share it.
    import mlflow  # noqa: F401
    import optuna  # noqa: F401

    import study.cli
    import study.launch
    import study.session
    import study.tracking  # noqa: F401

    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0 seconds; got {args.timeout}")
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    settings = {"date": started, "machine": f"{platform.node()}, {os.cpu_count()} cores, {platform.platform()}",
                "load_average_before": os.getloadavg(), "command": "python -m benchmarks.load " + " ".join(argv or sys.argv[1:])}
    runs = [(kind, workers) for kind in args.storages for workers in args.workers]
    rows: list[Row] = []

    def record(row: Row) -> None:
        """The row, on --output with those before it at once, so that a run cut short keeps what it measured."""
        rows.append(row)
        Path(args.output).write_text(json.dumps({**settings, "load_average_after": os.getloadavg(), "rows": [r.__dict__ for r in rows]}, indent=2) + "\n")
        print(f"{row.storage} {row.workers}: {row.finished}/{row.total} trials, {row.trials_per_second:.1f}/s, failed workers {row.workers_failed}"
              f"{f' ({row.failure})' if row.failure else ''}, lost {row.lost}, duplicated {row.duplicated}, over {row.over_total}", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt  # so that every `finally` below stops what it started

    signal.signal(signal.SIGTERM, stop)
    try:
        with tempfile.TemporaryDirectory(prefix="load-") as tmp, database(args.admin_url) as mlflow_store:
            directory = Path(tmp)
            port = free_port()
            # The tracking server of docs/several-machines.md: its store on PostgreSQL, several server processes, and the
            # artifacts (the runs' spec.toml and layers.csv) uploaded through it.
            mlflow_server = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", mlflow_store, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", str(args.mlflow_workers), "--artifacts-destination", str(directory / "artifacts")]
            tracking_uri = f"http://127.0.0.1:{port}"
            # Each server process keeps at most --mlflow-pool connections to PostgreSQL (MLflow's default is up to 15), so that
            # the direct workers (one connection each) and the server fit under the server's max_connections together.
            pool = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": str(args.mlflow_pool), "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "0"}
            with process(mlflow_server, directory / "mlflow.log", lambda text: "Uvicorn running" in text or "Listening at" in text or "Application startup complete" in text,
                         "mlflow server", args.timeout, env=pool):
                os.environ.update({"MLFLOW_TRACKING_URI": tracking_uri, "STUDY_HOME": str(directory / "home")})
                for kind, workers in runs:
                    record(measure(kind, workers, args.trials_per_worker, args.admin_url, tracking_uri, directory, args.timeout))
    except Exception as error:  # noqa: BLE001 -- the tracking server or its database: the runs not measured are rows with the reason
        for kind, workers in runs[len(rows):]:
            record(Row.failed(kind, workers, workers * args.trials_per_worker, reason(error)))
    print(json.dumps(settings))
    print(table(rows))
    return 1 if any(row.failure or row.workers_failed for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
