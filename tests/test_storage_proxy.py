"""`serve-storage` and `--storage grpc://`: Optuna's gRPC storage proxy in front of a real PostgreSQL database."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from reliability.checks import check_consistent, sqlite_uri

from conftest import LENET, free_port, make_spec, postgres_database, run_cli, storage_proxy

pytestmark = pytest.mark.slow  # gRPC proxy server processes: `make test` runs them, `make test-fast` does not

pytest.importorskip("grpc", reason="the gRPC proxy is in the optional extra: pip install '.[cluster]'")


@pytest.fixture
def proxy(tmp_path):
    """`python -m study serve-storage` on a fresh PostgreSQL database; yields (grpc URL, PostgreSQL URL)."""
    with postgres_database("proxy") as url, storage_proxy(url, tmp_path / "serve.log") as grpc_url:
        yield grpc_url, url


def test_the_proxy_refuses_trials_beyond_the_total(proxy):
    from study.errors import StudyFull
    from study.storage import open_storage

    grpc_url, _ = proxy
    study = optuna.create_study(study_name="full", storage=open_storage(grpc_url))
    study.set_user_attr("trials", 2)
    first, second = study.ask(), study.ask()
    with pytest.raises(StudyFull):
        study.ask()
    study.tell(first, 0.5)
    study.tell(second, state=TrialState.FAIL)
    study.enqueue_trial({"x": 1.0})  # a queued trial (a retry) is not a claim: the proxy takes it
    assert len(study.get_trials()) == 3


def test_a_study_runs_through_the_proxy(proxy, study_home, tmp_path):
    grpc_url, postgres_url = proxy
    spec = make_spec(tmp_path, "proxied", LENET)
    result = run_cli("launch", str(spec), "--trials", "3", "--preset", "cpu", "--log-model", "none", "--storage", grpc_url)
    assert result.returncode == 0, result.stderr
    check_consistent("proxied", optuna.storages.RDBStorage(postgres_url), sqlite_uri(study_home), total=3)


def test_no_proxy_is_one_line(study_home, tiny_spec):
    port = free_port()
    result = run_cli("launch", str(tiny_spec), "--trials", "1", "--storage", f"grpc://127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: storage grpc://127.0.0.1:{port}: no storage proxy answers there; "
                                     f"start one with `python -m study serve-storage --storage URL --port {port}`")
