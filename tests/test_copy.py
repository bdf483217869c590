"""`python -m study copy`: a study moved from a journal to PostgreSQL and back goes on in its new storage by its name
alone (the spec file is gone), with its trials, record and MLflow links; a copy onto a study of the same name, or
of a study that is not there, writes nothing."""

from __future__ import annotations

import optuna
import pytest
from reliability.checks import changed, check_consistent, fingerprint, sqlite_uri

from conftest import LENET, make_spec, postgres_database, run_main


@pytest.fixture
def pg_url():
    with postgres_database("copy") as url:
        yield url


def _load(url: str) -> optuna.Study:
    from study.storage import open_storage

    return optuna.load_study(study_name="moved", storage=open_storage(url, read_only=True))


def _same_trials(source: optuna.Study, copy: optuna.Study) -> None:
    def row(t):
        return t.number, t.state, t.values, t.params, t.user_attrs, t.system_attrs

    assert [row(t) for t in copy.get_trials()] == [row(t) for t in source.get_trials()]
    assert copy.user_attrs == source.user_attrs and copy.directions == source.directions


def _goes_on(name: str, storage: str, total: int, home, tmp_path) -> None:
    """The read-only commands, a worker and a launch that raises the total, each by the study's name only."""
    from study.storage import open_storage

    for argv in (["show", name], ["export", name, "-o", str(tmp_path / f"{total}.csv")],
                 ["report", name, "-o", str(tmp_path / f"{total}.html")], ["worker", name, "--checkpoint-dir", str(tmp_path / "checkpoints")]):
        result = run_main(*argv, "--storage", storage)
        assert result.returncode == 0, (argv, result.stderr)
    rows = (tmp_path / f"{total}.csv").read_text().splitlines()[1:]
    assert len(rows) == total and all(",FINISHED," in row for row in rows)  # each trial's MLflow run found, by its run id
    # The worker found the study's total reached; a launch raises it and trains one more trial.
    result = run_main("launch", name, "--trials", str(total + 1), "--storage", storage)
    assert result.returncode == 0, result.stderr
    check_consistent(name, open_storage(storage, read_only=True), sqlite_uri(home), total=total + 1)


def test_copy_journal_to_postgresql_and_back(study_home, tmp_path, pg_url):
    specs = tmp_path / "specs"
    specs.mkdir()
    spec = make_spec(specs, "moved", LENET)
    assert run_main("launch", str(spec), "--trials", "1", "--preset", "cpu").returncode == 0
    spec.unlink()  # the copies run from the spec the study recorded
    first = str(study_home / "optuna.journal")

    result = run_main("copy", "moved", "--from", first, "--to", pg_url)
    assert result.returncode == 0, result.stderr
    assert "copied study moved" in result.stdout and "1 trials" in result.stdout
    _same_trials(_load(first), _load(pg_url))
    _goes_on("moved", pg_url, 1, study_home, tmp_path)

    back = str(tmp_path / "back.journal")
    assert run_main("copy", "moved", "--from", pg_url, "--to", back).returncode == 0
    _same_trials(_load(pg_url), _load(back))
    _goes_on("moved", back, 2, study_home, tmp_path)

    # The source of each copy is as it was.
    assert len(_load(first).get_trials()) == 1
    assert len(_load(pg_url).get_trials()) == 2


def test_copy_refusals_write_nothing(study_home, tmp_path):
    spec = make_spec(tmp_path, "moved", LENET)
    assert run_main("create", str(spec), "--trials", "2", "--preset", "cpu").returncode == 0
    first = str(study_home / "optuna.journal")
    sqlite = f"sqlite:///{tmp_path / 'copy.db'}"
    assert run_main("copy", "moved", "--from", first, "--to", sqlite).returncode == 0
    before = fingerprint(tmp_path)
    for argv, says in ((["moved", "--from", first, "--to", sqlite], "already has a study named moved"),
                       (["moved", "--from", first, "--to", first], "already has a study named moved"),
                       (["other", "--from", first, "--to", str(tmp_path / "new.journal")], "no study named 'other'"),
                       (["moved", "--from", first, "--to", str(tmp_path / "missing" / "new.journal")], "does not exist"),
                       (["moved", "--from", first, "--to", "postgresql://user:secret@127.0.0.1:1/none"], "cannot open storage")):
        result = run_main("copy", *argv)
        assert result.returncode == 1 and result.stderr.startswith("error: ") and says in result.stderr, (argv, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "secret" not in result.stderr
    assert changed(before, fingerprint(tmp_path)) == []
