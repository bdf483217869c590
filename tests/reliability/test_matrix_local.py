"""The matrix of study kinds, storages and commands (tests/reliability/matrix.py) on the storages of one machine:
a journal file given with --storage, SQLite and PostgreSQL; and the test that the matrix
covers every pair. `make test-fast` runs the slice in matrix.FAST."""

from __future__ import annotations

import optuna
import pytest

from conftest import postgres_database
from reliability.matrix import CELLS, FAST, STEPS, STORAGES, Place, Reader, missing_pairs, run_cell

LOCAL = [cell for cell in CELLS if cell.storage in ("journal", "sqlite", "postgresql")]


def test_the_matrix_covers_every_pair():
    assert missing_pairs(CELLS) == []
    assert "several architectures × ray" in missing_pairs(CELLS[:-1])  # the check sees a missing cell
    names = [cell.name for cell in CELLS]
    assert len(set(names)) == len(names) and FAST <= set(names)
    assert {cell.storage for cell in CELLS} == set(STORAGES) and set().union(*(cell.all_steps for cell in CELLS)) == set(STEPS)
    # Ctrl-C lands in each command that trains, and a worker finishes a stopped launch at least once.
    assert {cell.stop for cell in CELLS} == {"", "launch", "confirm", "finalize"}
    assert any(cell.stop == "launch" and "worker" in cell.steps for cell in CELLS)
    # Each command that takes a study names it by its name in some cell and by its spec's path in another.
    for command in ("worker", "confirm", "finalize", "report"):
        assert {cell.by for cell in CELLS if command in cell.steps} == {"name", "path"}, command


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    reader = Reader()
    try:
        yield Place(root / "home", {"journal": str(root / "studies.journal"), "sqlite": f"sqlite:///{root / 'optuna.db'}"}, reader)
    finally:
        reader.close()


@pytest.fixture(scope="module")
def postgresql(place):
    with postgres_database("matrix") as url:
        place.urls["postgresql"] = url
        storage = optuna.storages.RDBStorage(url)  # its tables, before the first launch
        yield storage
        storage.engine.dispose()


def _checker_storage(cell, place, request):
    """The Optuna storage the consistency checker reads for the cell."""
    if cell.storage == "journal":
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(place.urls["journal"]))
    if cell.storage == "sqlite":
        return optuna.storages.RDBStorage(place.urls["sqlite"])
    return request.getfixturevalue("postgresql")


@pytest.mark.parametrize("cell", [pytest.param(cell, id=cell.name, marks=[] if cell.name in FAST else [pytest.mark.slow]) for cell in LOCAL])
def test_cell(cell, place, tmp_path, request):
    if cell.storage == "postgresql":
        request.getfixturevalue("postgresql")  # its database, before the cell's commands name it
    run_cell(cell, place, tmp_path, lambda: _checker_storage(cell, place, request))
