"""The storage kinds (study.storage.STORAGE_KINDS): which kind a --storage value names, the file it names, whether
machines may share it, and which one serve-storage refuses."""

from pathlib import Path

import pytest

from conftest import run_main
from study.storage import ANY_DATABASE, STORAGE_KINDS, heartbeat_enabled, opened, shared_by_machines, storage_file, storage_kind

# (a --storage value, its kind, the file it names, whether workers on other machines may share it)
VALUES = [
    ("studies/optuna.journal", "journal", Path("studies/optuna.journal"), False),
    ("/srv/studies/optuna.journal", "journal", Path("/srv/studies/optuna.journal"), False),
    ("sqlite:///studies/optuna.db", "sqlite", Path("studies/optuna.db"), False),
    ("sqlite:////srv/optuna.db?timeout=30", "sqlite", Path("/srv/optuna.db"), False),
    ("sqlite://", "sqlite", None, False),  # in memory
    ("postgresql://user:secret@db-host:5432/studies", "postgresql", None, True),
    ("postgresql+psycopg://user@db-host/studies", "postgresql", None, True),
    ("grpc://proxy-host:13000", "proxy", None, True),
    ("mysql://user@db-host/studies", "database", None, True),
    ("nosuchdb://x/y", "database", None, True),
    ("http://mlflow-host:5000", "database", None, True),  # storage_file also reads tracking URIs (study.names)
]


@pytest.mark.parametrize(("value", "kind", "file", "shared"), VALUES)
def test_a_storage_value_names_its_kind_its_file_and_whether_machines_share_it(value, kind, file, shared):
    assert storage_kind(value).name == kind
    assert storage_file(value) == file
    assert shared_by_machines(value) is shared


def test_each_kind_is_found_by_its_example_and_its_name_is_its_own():
    assert [storage_kind(kind.example) for kind in STORAGE_KINDS] == list(STORAGE_KINDS)
    names = [kind.name for kind in (*STORAGE_KINDS, ANY_DATABASE)]
    assert len(set(names)) == len(names)
    assert {kind.recovery for kind in (*STORAGE_KINDS, ANY_DATABASE)} == {"heartbeat", "lease"}
    assert shared_by_machines(None) is False  # the default: the study home's journal


@pytest.mark.parametrize(("kind", "beats"), [("journal", False), ("sqlite", True)])
def test_a_storage_keeps_heartbeats_where_its_kind_recovers_by_them(kind, beats, tmp_path):
    """study.recovery picks heartbeats or leases by heartbeat_enabled: true only where the kind's recovery says so."""
    url = str(tmp_path / "optuna.journal") if kind == "journal" else f"sqlite:///{tmp_path / 'optuna.db'}"
    assert (storage_kind(url).recovery == "heartbeat") is beats
    with opened(url, heartbeat=5) as storage:
        assert heartbeat_enabled(storage) is beats


def test_serve_storage_refuses_a_proxy_in_front_of_a_proxy():
    result = run_main("serve-storage", "--storage", "grpc://127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: --storage grpc://127.0.0.1:1: give the storage the proxy serves (postgresql://..., a journal file), "
                                     "not another proxy")
