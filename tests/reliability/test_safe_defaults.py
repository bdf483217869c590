"""Safe defaults: specs are data, and no password reaches logs, MLflow or reports. (That the MLflow UI listens on
127.0.0.1 alone is checked on the running UI in tests/test_browser.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

from mlflow.tracking import MlflowClient

from conftest import LENET, ROOT, make_spec
from reliability.checks import check_consistent, record_fault, sqlite_uri

SECRET = "s3cr3t-pw"


def test_specs_are_parsed_as_data(tmp_path, capsys):
    """No eval, exec or pickle anywhere in the package; a spec that would be code if evaluated is only a bad value."""
    for path in [*(ROOT / "study").glob("*.py"), *(ROOT / "objectives").glob("*.py"), *(ROOT / "dashboards").glob("*.py")]:
        tree = ast.parse(path.read_text())
        calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        imports = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom) for alias in node.names}
        imports |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not calls & {"eval", "exec", "compile", "__import__"}, path
        assert not imports & {"pickle", "marshal", "shelve", "dill", "cloudpickle"}, path
    marker = tmp_path / "evaluated"
    spec = make_spec(tmp_path, "evil", LENET, fixed={"arch": f"__import__('pathlib').Path('{marker}').touch()"}, search={"lr": {"low": "1/0", "high": "exit()"}})
    from study.cli import main

    assert main(["launch", str(spec), "--storage", "nosuchdb://x/y"]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert not marker.exists()


def test_storage_password_never_shown(forks, study_home, tmp_path, postgres_db):
    """A PostgreSQL URL with a password (trust auth accepts it) through a whole launch, `show` and the report."""
    url, _, _ = postgres_db
    secret_url = url.replace("postgres@", f"postgres:{SECRET}@")
    spec = make_spec(tmp_path, "secret", LENET)
    env = {"STUDY_HOME": str(study_home)}
    launch = forks.start(["launch", str(spec), "--trials", "1", "--storage", secret_url], tmp_path, env)
    assert launch.wait() == 0, launch.output()
    shown = forks.start(["show", "secret", "--storage", secret_url], tmp_path, env)
    assert shown.wait() == 0
    failed = forks.start(["show", "secret", "--storage", secret_url.replace("127.0.0.1:5432", "127.0.0.1:1")], tmp_path, env)
    assert failed.wait() == 1
    for command in (launch, shown, failed):
        assert SECRET not in command.output()
    assert "postgres:***@" in launch.output() and "postgres:***@" in failed.output()
    report = (study_home / "reports" / "secret.html").read_text()
    assert SECRET not in report
    client = MlflowClient(tracking_uri=sqlite_uri(study_home))
    experiment = client.get_experiment_by_name("secret")
    for run in client.search_runs([experiment.experiment_id]):
        assert SECRET not in repr(run.data.params) + repr(run.data.tags), run.info.run_name
        for artifact in client.list_artifacts(run.info.run_id):
            local = Path(client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path)))
            assert not local.is_file() or SECRET not in local.read_text(errors="replace")
    assert SECRET not in repr(experiment.tags)
    record_fault("storage URL with a password (masked everywhere)", 1, check_consistent("secret", url, sqlite_uri(study_home), total=1))
