"""Where studies live: the study home directory and the Optuna storage.

Default: $STUDY_HOME (or ./studies) holding `optuna.journal` (Optuna's journal file,
safe for several processes and safe to reopen), `mlflow.db`, `mlartifacts/` and `reports/`.
`--storage` takes any Optuna storage URL (sqlite:///..., postgresql://...), a journal file path, or
grpc://host:port for Optuna's storage proxy (`python -m study serve-storage`, study/storage_proxy.py).
What the code does differently for each kind of storage is one entry of STORAGE_KINDS, at the end of this file.
"""

from __future__ import annotations

import fcntl
import os
import random
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import optuna

import records
from dashboards.masking import mask

CONNECT_TIMEOUT = 10  # seconds to connect to a database server
APPLICATION_NAME = "cnn-study"  # how our connections show in PostgreSQL's pg_stat_activity
WAITING = ": waiting for a lock"  # added to APPLICATION_NAME while a process waits for an advisory lock
SETUP_LOCK_SPACE = 0x5354  # PostgreSQL advisory locks taken by setup_lock: (this, the study name's CRC)
TABLES_LOCK_SPACE = 0x5441  # the advisory lock (this, 0) held while a fresh database gets Optuna's tables (_create_tables)
TABLES_TIMEOUT = 60  # seconds to wait for another process creating them


class StorageError(RuntimeError):
    """The storage URL is malformed or the storage cannot be reached."""


def home() -> Path:
    return Path(os.environ.get("STUDY_HOME", "studies"))


def home_holds_tracking() -> bool:
    """Whether the MLflow store is the study home's own SQLite file (study.tracking.tracking_uri): MLFLOW_TRACKING_URI unset."""
    return not os.environ.get("MLFLOW_TRACKING_URI")


def make_home() -> None:
    """Create the study home; only a launch does, once its arguments and storage have been checked."""
    try:
        home().mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StorageError(f"cannot create the study home {home()} ({error.strerror}); set STUDY_HOME to a writable directory") from None


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with this pid exists (a dead launcher or worker leaves its trials behind)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def default_storage_url() -> str:
    return str(home() / "optuna.journal")


class RetryStaleTrial:
    """Optuna's heartbeat callback: a trial whose worker stopped sending heartbeats runs once more with the
    same params (records.retry). It also keeps the trials it failed, for the launcher to close their MLflow
    runs (this process failed them, so no other process does)."""

    def __init__(self):
        self.failed: list[optuna.trial.FrozenTrial] = []

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.failed.append(trial)
        records.retry(study, trial)


@dataclass(frozen=True)
class StorageKind:
    """One kind of Optuna storage: how a --storage value names it, and each thing the code does differently for it.
    The kinds are STORAGE_KINDS; docs/layout.md says how to add one."""

    name: str                  # as the tests name it
    prefixes: tuple[str, ...]  # a URL of this kind starts with one of these; (): a path, with no "://" (the journal)
    example: str               # how the --storage line of docs/commands.md shows one (tests/test_cli.py checks it)
    open: Callable[..., optuna.storages.BaseStorage]  # (url, heartbeat, read_only, server), as open_storage takes them
    file: Callable[[str], Path | None] | None  # the file a URL of this kind names; None: it lives on a server
    lock: Callable[..., AbstractContextManager] | None  # setup_lock's lock, given (url, storage, study name); None: none
    recovery: str              # how a dead worker's trial is found (study.recovery): "heartbeat" (Optuna's) or "lease"
    shared_by_machines: bool   # workers on other machines may share it (shared_by_machines)
    servable: bool = True      # `serve-storage` may put the proxy in front of it


def storage_kind(url: str) -> StorageKind:
    """The kind of storage a --storage value names: a path is a journal file; a URL, the kind whose prefix it starts with,
    or else any other database SQLAlchemy may open (ANY_DATABASE)."""
    if "://" not in url:
        return next(kind for kind in STORAGE_KINDS if not kind.prefixes)
    return next((kind for kind in STORAGE_KINDS if kind.prefixes and url.startswith(kind.prefixes)), ANY_DATABASE)


def storage_file(url: str) -> Path | None:
    """The file a storage URL names (a journal file, an SQLite database); None for a database server or the proxy."""
    kind = storage_kind(url)
    return kind.file(url) if kind.file is not None else None


def open_storage(url: str | None, heartbeat: int | None = None, read_only: bool = False, server: bool = False) -> optuna.storages.BaseStorage:
    """The storage at `url` (default: the study home's journal file).

    `heartbeat` (seconds, relational storage only): trials record a heartbeat this often, and a trial
    silent for three intervals belongs to a dead worker; it is failed and queued again once.

    `server`: for `serve-storage`, whose threads answer many workers at once: PostgreSQL through a pool of connections
    (sqlalchemy's default, up to 15) rather than the one connection of every other process (_one_connection).

    `read_only`: for the commands that only read a study. Nothing is created, locked, repaired or written:
    a journal file must exist and is only read, SQLite and PostgreSQL are opened so that they refuse every
    write themselves, and a database without Optuna's tables reads as one without studies.
    """
    if url is None and not read_only:
        make_home()
    url = url or default_storage_url()
    kind = storage_kind(url)
    return kind.open(url, heartbeat if kind.recovery == "heartbeat" else None, read_only, server)


def _database(url: str, heartbeat: int | None, read_only: bool, server: bool, *, connect_args: dict | None = None,
              read_only_by: Callable | None = None, one_connection: bool = False) -> optuna.storages.BaseStorage:
    """An SQLAlchemy URL, as open_storage takes it. Its kind's entry in STORAGE_KINDS adds `connect_args` (the driver's),
    `read_only_by` (how the database itself refuses writes, _read_only_database) and `one_connection` (_one_connection)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # pool_pre_ping: a connection the server dropped (restart, pg_terminate_backend) is replaced, not used.
            engine = {"pool_pre_ping": True}
            if connect_args is not None:
                engine["connect_args"] = dict(connect_args)  # a copy: a read-only opening adds to it
            if read_only:
                return _read_only_database(url, engine, read_only_by)
            beats = {"engine_kwargs": engine}
            if heartbeat is not None:
                beats |= {"heartbeat_interval": heartbeat, "grace_period": 3 * heartbeat, "heartbeat_stale_trial_callback": RetryStaleTrial()}
            if one_connection and not server:
                return _one_connection(url, beats)
            return optuna.storages.RDBStorage(url, **beats)
    except ImportError as error:
        raise StorageError(f"storage {mask(url)} needs a database driver that is not installed ({mask(str(error))})") from None
    except Exception as error:  # noqa: BLE001 -- sqlalchemy raises several types for bad URLs and unreachable servers
        # Optuna wraps the database's own error in one that says only "An exception is raised during the commit".
        cause = error.__cause__ if isinstance(error, optuna.exceptions.StorageInternalError) and error.__cause__ else error
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise StorageError(f"cannot open storage {mask(url)}: {mask(first_line)}") from None  # the driver's error may echo the URL


@contextmanager
def opened(url: str | None, **options):
    """open_storage for one look (`options` as open_storage takes them): a database connection is closed at the end
    of the block, not when the garbage collector finds the storage, so that a worker starting holds one at a time."""
    storage = open_storage(url, **options)
    try:
        yield storage
    finally:
        if isinstance(storage, optuna.storages.RDBStorage):
            storage.engine.dispose()


def _one_connection(url: str, settings: dict) -> optuna.storages.RDBStorage:
    """A PostgreSQL storage on one connection per process, shared by its threads' queries, heartbeats and advisory locks
    (_advisory_lock), so that a server's max_connections holds as many workers. A thread waits at most sqlalchemy's
    pool_timeout (30 s) for it; no query holds it for long. Optuna's schema check opens a second connection inside its
    first, so the tables are created and checked first (_create_tables), on one connection at a time, save in the one
    process that creates a fresh database's tables (two: the lock's and Optuna's)."""
    engine = settings["engine_kwargs"]
    _create_tables(url, engine)
    return optuna.storages.RDBStorage(url, skip_table_creation=True, skip_compatibility_check=True,
                                      **{**settings, "engine_kwargs": {**engine, "pool_size": 1, "max_overflow": 0}})


def _create_tables(url: str, engine: dict) -> None:
    """Optuna's tables in a PostgreSQL database, created and checked on a connection closed at once. On a fresh database,
    one process at a time creates them (an advisory lock, waited for at most TABLES_TIMEOUT): processes that create
    them at once collide in the server's catalog (UniqueViolation on pg_type) or in Optuna's version row. Once
    alembic_version exists (Optuna stamps it last, in one transaction), every table does, and nobody waits."""
    import sqlalchemy
    import sqlalchemy.pool

    probe = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **engine)
    try:
        with probe.connect() as connection:
            fresh = not connection.execute(sqlalchemy.text("SELECT to_regclass('alembic_version') IS NOT NULL")).scalar()
            if fresh:
                connection.execute(sqlalchemy.text(f"SET lock_timeout = '{TABLES_TIMEOUT}s'"))
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:space, 0)"), {"space": TABLES_LOCK_SPACE})
                try:
                    _check_tables(url, engine, fresh)
                finally:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:space, 0)"), {"space": TABLES_LOCK_SPACE})
        if not fresh:
            # After the probe's connection closed: a worker joining a study holds one connection at a time.
            _check_tables(url, engine, fresh)
    finally:
        probe.dispose()


def _check_tables(url: str, engine: dict, fresh: bool) -> None:
    """Optuna's tables made (`fresh`) and their version checked, on connections closed at once. Optuna's own check
    holds a connection while it opens a second, so where the tables exist the versions are compared one connection
    at a time, and Optuna's check runs only to word its error."""
    import sqlalchemy.pool

    kwargs = {"engine_kwargs": {**engine, "poolclass": sqlalchemy.pool.NullPool}}
    if fresh:
        optuna.storages.RDBStorage(url, **kwargs).engine.dispose()
        return
    storage = optuna.storages.RDBStorage(url, skip_table_creation=True, skip_compatibility_check=True, **kwargs)
    try:
        current = storage.get_current_version() == storage.get_head_version()
    finally:
        storage.engine.dispose()
    if not current:
        optuna.storages.RDBStorage(url, **kwargs).engine.dispose()  # creates what is missing, or raises Optuna's upgrade message


def _journal(url: str, heartbeat: None, read_only: bool, server: bool) -> optuna.storages.BaseStorage:
    """A plain path: Optuna's journal file, which several processes may append to safely (study/journal.py). `heartbeat`
    is None (it keeps no heartbeats: its trials hold a lease) and `server` changes nothing."""
    from optuna.storages.journal import JournalFileBackend

    from study.journal import JournalCorrupt, ReadOnlyJournal, repair, verify

    path = Path(url)
    if path.is_dir():
        raise StorageError(f"journal storage {path} is a directory; give the path of a journal file")
    if not path.parent.is_dir():
        raise StorageError(f"journal storage {path}: directory {path.parent} does not exist")
    if read_only and not path.is_file():
        raise StorageError(f"journal storage {path} does not exist")
    try:
        if read_only:
            verify(path)
            return optuna.storages.JournalStorage(ReadOnlyJournal(path))
        aside = repair(path)
    except JournalCorrupt as error:
        raise StorageError(str(error)) from None
    if aside is not None:
        print(f"journal {path}: its last record was torn (a crash or a full disk mid-write); moved it to {aside} "
              "and went on from the last whole record", file=sys.stderr)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _read_only_database(url: str, engine: dict, read_only_by: Callable | None) -> optuna.storages.BaseStorage:
    """An SQLite file or a PostgreSQL database opened so that SQLite or the server refuses every write (`read_only_by`,
    from its kind's entry in STORAGE_KINDS; a database of no kind is only opened without writing to it); Optuna's
    tables are not created, so a database without them holds no study. alembic_version is the table Optuna makes
    last (_create_tables): a database whose tables another process is making now holds no study yet either."""
    import sqlalchemy

    parsed = sqlalchemy.engine.make_url(url)
    if read_only_by is not None:
        parsed = read_only_by(parsed, engine)
    url = parsed.render_as_string(hide_password=False)
    probe = sqlalchemy.create_engine(url, **engine)
    try:
        has_tables = sqlalchemy.inspect(probe).has_table("alembic_version")
    finally:
        probe.dispose()
    if not has_tables:
        return optuna.storages.InMemoryStorage()
    return optuna.storages.RDBStorage(url, engine_kwargs=engine, skip_table_creation=True)


def _sqlite_read_only(parsed, engine: dict):
    """SQLite's own read-only mode, which also never creates the file."""
    import urllib.parse

    return parsed.set(database=f"file:{urllib.parse.quote(parsed.database or '')}", query={**parsed.query, "mode": "ro", "uri": "true"})


def _postgresql_read_only(parsed, engine: dict):
    """Sessions in which the server refuses every write."""
    engine["connect_args"]["options"] = "-c default_transaction_read_only=on"
    return parsed


def _sqlite_file(url: str) -> Path | None:
    """sqlite:///PATH: the database file PATH; None for one in memory (sqlite://)."""
    if not url.startswith("sqlite:///"):
        return None
    return Path(url.removeprefix("sqlite:///").partition("?")[0])


def _proxy(url: str, heartbeat: None, read_only: bool, server: bool) -> optuna.storages.BaseStorage:
    """grpc://host:port: a client of the storage proxy that `python -m study serve-storage` runs. `heartbeat` is None
    (Optuna keeps heartbeats on its relational storage only: its trials hold a lease), and a read-only command only reads
    through it."""
    host, _, port = url.removeprefix("grpc://").rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise StorageError(f"storage {mask(url)}: give grpc://HOST:PORT, e.g. grpc://127.0.0.1:13000")
    try:
        from study.storage_proxy import connect
    except ImportError:
        raise StorageError(f"storage {mask(url)}: the gRPC client is not installed; install it with pip install '.[cluster]'") from None
    try:
        return connect(host, int(port))
    except ConnectionError:
        raise StorageError(f"storage {mask(url)}: no storage proxy answers there; start one with `python -m study serve-storage --storage URL --port {port}`") from None


def shared_by_machines(url: str | None) -> bool:
    """Whether `url` names a storage that workers on other machines may share: a database server or the gRPC proxy,
    not a journal file or SQLite (whose file, on a network file system, Optuna and SQLite do not support sharing)."""
    return url is not None and storage_kind(url).shared_by_machines


def heartbeat_enabled(storage: optuna.storages.BaseStorage) -> bool:
    return isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None


def on_postgresql(storage: optuna.storages.BaseStorage) -> bool:
    return isinstance(storage, optuna.storages.RDBStorage) and storage.engine.dialect.name == "postgresql"


@contextmanager
def _advisory_lock(storage: optuna.storages.RDBStorage, *keys: int):
    """A PostgreSQL advisory lock on one bigint key or two int keys (a separate key space), held by the storage's one
    connection (open_storage): a session lock outlives the checkout and the transaction, so the queries made under it
    use that same connection. It is polled rather than waited for, so that waiting holds no connection from this
    process's other threads (heartbeats, progress); while it waits, the connection's application_name says so in
    pg_stat_activity. The server drops the lock with the connection, so a killed process never leaves it held. Not
    reentrant across threads: callers in one process serialise on a lock of their own first (study.launch)."""
    import sqlalchemy

    assert storage.engine.pool.size() == 1, "an advisory lock needs the storage's one connection (open_storage without server=True)"
    names, values = ", ".join(f":k{i}" for i in range(len(keys))), {f"k{i}": key for i, key in enumerate(keys)}
    pause, waiting = 0.01, False
    while True:
        with storage.engine.connect() as connection:
            taken = connection.execute(sqlalchemy.text(f"SELECT pg_try_advisory_lock({names})"), values).scalar()
            if taken == waiting:  # the first miss, or the lock after misses
                connection.execute(sqlalchemy.text("SELECT set_config('application_name', :name, false)"),
                                   {"name": APPLICATION_NAME + ("" if taken else WAITING)})
                connection.commit()
                waiting = not taken
            if taken:
                break
        time.sleep(pause * random.uniform(1, 2))  # spread, so that many waiting workers do not poll in step
        pause = min(2 * pause, 0.5)
    try:
        yield
    finally:
        with storage.engine.connect() as connection:
            connection.execute(sqlalchemy.text(f"SELECT pg_advisory_unlock({names})"), values)


@contextmanager
def claim_lock(storage: optuna.storages.BaseStorage, study_name: str):
    """Held while a worker counts a study's trials and asks for a new one, so that workers on several
    machines never start more trials than the study's total. PostgreSQL only (an advisory lock);
    elsewhere the one launcher process already does this under its own lock."""
    if not on_postgresql(storage):
        yield
        return
    with _advisory_lock(storage, storage.get_study_id_from_name(study_name)):
        yield


@contextmanager
def setup_lock(url: str | None, storage: optuna.storages.BaseStorage, study_name: str):
    """Held while a launch creates or reopens a study's record (the study and its identity in Optuna, its parent
    run in MLflow), so that first launches started at the same moment agree on one of each.

    The lock is the storage kind's (STORAGE_KINDS): a journal or SQLite file, _directory_lock; PostgreSQL, an
    advisory lock keyed by the study's name. The kernel or the server drops either with the process, so a killed
    launch never leaves it held. The gRPC proxy: none; start a proxied study's first launch alone.
    """
    url = url or default_storage_url()
    lock = storage_kind(url).lock
    if lock is None:
        yield
        return
    with lock(url, storage, study_name):
        yield


@contextmanager
def _study_advisory_lock(url: str, storage: optuna.storages.RDBStorage, study_name: str):
    """PostgreSQL's setup_lock: an advisory lock keyed by the study's name."""
    with _advisory_lock(storage, SETUP_LOCK_SPACE, zlib.crc32(study_name.encode()) - 2**31):
        yield


@contextmanager
def _directory_lock(url: str, storage: optuna.storages.BaseStorage, study_name: str):
    """A journal or SQLite file's setup_lock: an exclusive flock on the directory that holds it (not on the file:
    closing another descriptor of an SQLite file would drop SQLite's own POSIX locks)."""
    path = storage_file(url)
    if path is None:  # an SQLite database in memory: one process only
        yield
        return
    try:
        descriptor = os.open(path.resolve().parent, os.O_RDONLY)
    except OSError:  # a directory we may write in but not open: nothing to lock with
        yield
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


# ---- The storage kinds: each entry says everything the code does differently for its kind ----

STORAGE_KINDS = (
    StorageKind("journal", (), "a journal file path", _journal, file=Path, lock=_directory_lock, recovery="lease",
                shared_by_machines=False),
    StorageKind("sqlite", ("sqlite",), "sqlite:///file.db", partial(_database, read_only_by=_sqlite_read_only), file=_sqlite_file,
                lock=_directory_lock, recovery="heartbeat", shared_by_machines=False),
    # connect_timeout: libpq waits for ever on a server that accepts the connection and never answers.
    StorageKind("postgresql", ("postgresql",), "postgresql://user@host/db",
                partial(_database, connect_args={"connect_timeout": CONNECT_TIMEOUT, "application_name": APPLICATION_NAME},
                        read_only_by=_postgresql_read_only, one_connection=True),
                file=None, lock=_study_advisory_lock, recovery="heartbeat", shared_by_machines=True),
    StorageKind("proxy", ("grpc://",), "grpc://host:port", _proxy, file=None, lock=None, recovery="lease", shared_by_machines=True,
                servable=False),
)
# Any other URL: a database SQLAlchemy may open (its driver installed), as Optuna opens it; tested by no kind's entry.
ANY_DATABASE = StorageKind("database", (), "an SQLAlchemy URL", _database, file=None, lock=None, recovery="heartbeat", shared_by_machines=True)
