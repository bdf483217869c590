"""The matrix of study kinds, storages and commands (tests/reliability/matrix.py) on the storages of many machines:
the gRPC storage proxy (`serve-storage` in front of PostgreSQL) and a Ray cluster on loopback (`launch --ray`, the
study home's journal). Both are server processes, so the whole file is in `make test` only."""

from __future__ import annotations

import optuna
import pytest

from conftest import journal, postgres_database, storage_proxy
from reliability.matrix import CELLS, Place, Reader, run_cell

pytestmark = pytest.mark.slow
pytest.importorskip("grpc", reason="the gRPC proxy is in the optional extra: pip install '.[cluster]'")
pytest.importorskip("ray.cluster_utils", reason="Ray is an optional extra: pip install '.[ray]'")

from test_ray import ray_cluster

REMOTE = [cell for cell in CELLS if cell.storage in ("proxy", "ray")]


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    reader = Reader()
    try:
        yield Place(root / "home", {"ray": None}, reader)
    finally:
        reader.close()


@pytest.fixture(scope="module")
def proxied(place, tmp_path_factory):
    """The proxy in front of a fresh PostgreSQL database; the checker reads the database itself."""
    with postgres_database("matrix_proxy") as url, storage_proxy(url, tmp_path_factory.mktemp("proxy") / "serve.log") as grpc_url:
        place.urls["proxy"] = grpc_url
        storage = optuna.storages.RDBStorage(url)
        yield storage
        storage.engine.dispose()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """test_ray's two Ray nodes, their trials held at their start on demand."""
    yield from ray_cluster(tmp_path_factory, "start")


@pytest.fixture(scope="module")
def ray(place, cluster):
    instance, holds, _ = cluster
    holds.auto.set()  # trials run through unless a cell holds one
    place.ray_address, place.ray_holds = instance.address, holds
    return place


@pytest.mark.parametrize("cell", [pytest.param(cell, id=cell.name) for cell in REMOTE])
def test_cell(cell, place, tmp_path, request):
    if cell.storage == "proxy":
        storage = request.getfixturevalue("proxied")
        run_cell(cell, place, tmp_path, lambda: storage)
    else:
        request.getfixturevalue("ray")
        run_cell(cell, place, tmp_path, lambda: journal(place.home))
