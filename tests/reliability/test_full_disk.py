"""A disk that fills up mid-write: every file the project writes (exports, reports) is whole or absent, the previous
one stays as it was, no temporary is left and the one-line error names the file; two reports to one path at once
never share a temporary. And an MLflow artifact store that fills up mid-launch: once space is back, the next launch
leaves no run RUNNING and no logged model PENDING, and the best trial has its model."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from conftest import LENET, hold_env, journal, make_spec, release, run_cli, run_main, start_hooked, wait_for_holds
from dashboards.files import write_whole
from records import STUDY_UID, live_trial_runs
from reliability.checks import check_consistent, fill, record_fault, sqlite_uri

PREVIOUS = b"the previous file, which a failed write must leave as it was\n"


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """A study home holding `full`, 2 LeNet trials."""
    home = tmp_path_factory.mktemp("full-disk") / "home"
    spec = make_spec(home.parent, "full", LENET)
    result = run_main("launch", str(spec), "--trials", "2", "--log-model", "none", env={"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": None})
    assert result.returncode == 0, result.stderr
    return home


def _previous_on_a_full_disk(mount: Path, name: str) -> Path:
    """`name` on `mount` holding PREVIOUS, the disk then filled to the last byte."""
    path = mount / name
    path.write_bytes(PREVIOUS)
    fill(mount)
    return path


@pytest.mark.parametrize("command, name", [("export", "e.csv"), ("export", "e.parquet"), ("report", "r.html")])
def test_a_write_on_a_full_disk_leaves_the_previous_file(launched, small_tmpfs, command, name):
    path = _previous_on_a_full_disk(small_tmpfs, name)
    result = run_cli(command, "full", "-o", str(path), env={"STUDY_HOME": str(launched)})
    assert result.returncode == 1
    assert result.stderr == f"error: cannot write {path}: No space left on device\n"
    assert path.read_bytes() == PREVIOUS
    assert sorted(p.name for p in small_tmpfs.iterdir()) == sorted(["filler", name])  # no temporary left


def test_two_writers_of_one_path_at_once_share_no_temporary(tmp_path):
    """The second write starts and ends while the first one's temporary is open: both succeed, the last rename wins."""
    path = tmp_path / "same.html"

    def first(out):
        out.write(b"first")
        write_whole(path, lambda inner: inner.write(b"second"))

    write_whole(path, first)
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["same.html"]


def test_two_reports_to_one_path_at_once(launched, tmp_path):
    """Both held until each is about to write, then let go together."""
    holds, path = tmp_path / "holds", tmp_path / "out" / "same.html"
    path.parent.mkdir()
    env = {"STUDY_HOME": str(launched), **hold_env(holds, "report")}
    reports = [start_hooked("report", "full", "-o", str(path), env=env) for _ in range(2)]
    for hold in wait_for_holds(holds, 2, lambda: all(report.alive() for report in reports)):
        release(hold)
    codes = [report.wait() for report in reports]
    assert codes == [0, 0], [report.errors() for report in reports]
    assert path.read_text().rstrip().endswith("</html>")
    assert [p.name for p in path.parent.iterdir()] == ["same.html"]


def test_a_full_artifact_store_then_a_relaunch_leaves_nothing_pending(study_home, lenet_spec, small_tmpfs):
    """The artifact store (mlartifacts) on a tmpfs with a little room: the run's small files fit, the best trial's
    model does not. The launch stops with one line; with the space back, the relaunch logs that model."""
    study_home.mkdir(parents=True)
    (study_home / "mlartifacts").symlink_to(small_tmpfs, target_is_directory=True)
    filler = fill(small_tmpfs, leave=100_000)
    env = {"STUDY_HOME": str(study_home)}
    full = run_cli("launch", str(lenet_spec), "--trials", "2", env=env)
    assert full.returncode == 1
    assert full.stderr.count("\n") == 1 and full.stderr.startswith("error: MLflow") and "No space left on device" in full.stderr, full.stderr
    client = MlflowClient(tracking_uri=sqlite_uri(study_home))
    experiment = client.get_experiment_by_name("kill").experiment_id
    # Closed on the way out, as far as MLflow answered: no parent left RUNNING, no model PENDING.
    assert {run.info.status for run in client.search_runs([experiment])} <= {"FINISHED", "FAILED"}
    assert {model.status for model in client.search_logged_models([experiment])} == {LoggedModelStatus.FAILED}

    filler.unlink()
    again = run_cli("launch", str(lenet_spec), "--trials", "2", env=env)
    assert again.returncode == 0, again.stderr
    assert "MLflow: logged the missing models of trials 0" in again.stdout
    assert not [run.info.run_name for run in client.search_runs([experiment]) if run.info.status == "RUNNING"]
    assert LoggedModelStatus.PENDING not in {model.status for model in client.search_logged_models([experiment])}
    study = optuna.load_study(study_name="kill", storage=journal(study_home))
    runs = live_trial_runs(client, experiment, study.user_attrs[STUDY_UID])
    model_uri = runs[study.best_trial.number].data.tags["model_uri"]
    assert client.get_logged_model(model_uri.removeprefix("models:/")).status == LoggedModelStatus.READY
    record_fault("MLflow artifact store full mid-launch, then relaunch", 1, check_consistent("kill", journal(study_home), sqlite_uri(study_home), total=2))
