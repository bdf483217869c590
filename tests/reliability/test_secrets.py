"""Secrets stay in their URL: a password planted in every form a storage URL or tracking URI carries one (user:password@,
?password=, ?sslpassword=, an MLflow server's user:password@) never appears in what the commands a user runs print,
write or record: their stdout and stderr, the study home, the -o outputs, the MLflow stores and the Optuna storage."""

from __future__ import annotations

import secrets
from pathlib import Path

import optuna
import pytest

from conftest import LENET, free_port, make_spec, postgres_database, run_cli
from dashboards.masking import mask
from reliability.checks import MlflowServer, record_hostile


def _leaks(secret: str, outputs: list[str], *directories: Path) -> list[str]:
    """Where `secret` appears: the commands' outputs (by index) and every file under `directories`."""
    found = [f"output {i}: {text.strip()[:300]}" for i, text in enumerate(outputs) if secret in text]
    for directory in directories:
        found += [str(path) for path in directory.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]
    return found


def _run(*args: str, env: dict, expect: int = 0) -> list[str]:
    done = run_cli(*args, env=env, timeout=300)  # a guard against a hang, not a speed limit
    assert done.returncode == expect, f"{args}: {done.stdout[-2000:]}\n{done.stderr}"
    return [done.stdout, done.stderr]


@pytest.mark.slow  # a real `mlflow server` process
def test_a_planted_secret_appears_nowhere(study_home, tmp_path):
    secret = f"pw{secrets.token_hex(8)}"
    spec = make_spec(tmp_path, "hush", LENET)
    out = tmp_path / "out"
    out.mkdir()
    server_dir = tmp_path / "mlflow-server"
    server_dir.mkdir()
    server = MlflowServer(server_dir)
    outputs: list[str] = []
    with postgres_database("secrets") as url:  # trust auth: any password is accepted
        forms = {"userinfo": url.replace("postgres@", f"postgres:{secret}@"), "password": f"{url}?password={secret}",
                 "sslpassword": f"{url}?sslpassword={secret}"}
        local = {"STUDY_HOME": str(study_home), "MLFLOW_TRACKING_URI": None}
        outputs += _run("create", str(spec), "--trials", "2", "--storage", forms["password"], env=local)
        assert f"{url}?password=***" in outputs[0]
        outputs += _run("launch", str(spec), "--trials", "2", "--storage", forms["userinfo"], env=local)
        outputs += _run("show", "hush", "--storage", forms["sslpassword"], env=local)
        outputs += _run("export", "hush", "--storage", forms["userinfo"], "-o", str(out / "hush.csv"), env=local)
        outputs += _run("report", "hush", "--storage", forms["password"], "-o", str(out / "hush.html"), env=local)
        for form in forms.values():  # a database that does not exist: the driver's error, one line
            outputs += _run("show", "hush", "--storage", form.replace(url.rsplit("/", 1)[1], "no_such_database"), env=local, expect=1)
            assert outputs[-1].startswith("error: cannot open storage ") and outputs[-1].count("\n") == 1, outputs[-1]
        storage = optuna.storages.RDBStorage(url)
        try:
            recorded = [(s.user_attrs, s.system_attrs) for s in storage.get_all_studies()]
            recorded += [(t.user_attrs, t.system_attrs) for t in optuna.load_study(study_name="hush", storage=storage).trials]
        finally:
            storage.engine.dispose()
        assert secret not in repr(recorded)

        # An MLflow server behind user:password@ (MLflow's client sends them as basic auth; this server takes any).
        server.start()
        try:
            tracked = {"STUDY_HOME": str(tmp_path / "tracked"), "MLFLOW_TRACKING_URI": server.url.replace("://", f"://user:{secret}@")}
            outputs += _run("launch", str(spec), "--trials", "1", env=tracked)
            outputs += _run("report", "hush", "-o", str(out / "tracked.html"), env=tracked)
            outputs += _run("export", "hush", "-o", str(out / "tracked.csv"), env=tracked)
            outputs += _run("ui", env=tracked)
        finally:
            server.stop()
    closed = {"STUDY_HOME": str(tmp_path / "closed"), "MLFLOW_TRACKING_URI": f"http://user:{secret}@127.0.0.1:{free_port()}"}
    outputs += _run("create", str(spec), env=closed, expect=1)
    assert "user:***@127.0.0.1" in outputs[-1], outputs[-1]
    assert (out / "tracked.html").is_file() and (study_home / "mlflow.db").is_file() and (server_dir / "mlflow.db").is_file()
    leaks = _leaks(secret, outputs, study_home, tmp_path / "tracked", out, server_dir)
    record_hostile("secret planted in each URL form (userinfo, ?password=, ?sslpassword=, tracking server), every output and file grepped",
                   tried=len(outputs) // 2, secrets_shown=len(leaks))  # a stdout and a stderr per command
    assert leaks == []


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
    ("postgresql://:secret@host:5432/db", "postgresql://:***@host:5432/db"),
    ("postgresql://user:se@cr:et@host/db?sslmode=require", "postgresql://user:***@host/db?sslmode=require"),
    ("postgresql://user:se/cret@host/db", "postgresql://user:***@host/db"),
    ("postgresql://user@host/db?sslmode=require&PassWord=secret&sslpassword=secret", "postgresql://user@host/db?sslmode=require&PassWord=***&sslpassword=***"),
    ("sqlite:////tmp/a.db?key=secret", "sqlite:////tmp/a.db?key=***"),
    ("https://user:secret@mlflow.example:443/path?api_key=secret&x=1", "https://user:***@mlflow.example:443/path?api_key=***&x=1"),
    ("grpc://:secret@127.0.0.1:13000?token=secret", "grpc://:***@127.0.0.1:13000?token=***"),
    ("http://127.0.0.1:5000/a?email=x@y", "http://127.0.0.1:5000/a?email=x@y"),
    ("/home/me/studies/optuna.journal", "/home/me/studies/optuna.journal"),
    ("failed: host=h password=secret dbname=d (postgresql://u:secret@h/d)", "failed: host=h password=*** dbname=d (postgresql://u:***@h/d)"),
])
def test_mask(url, shown):
    assert mask(url) == shown
