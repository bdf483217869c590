"""Read-only commands never create, lock, repair or change a file.

On each kind of storage (the study home's journal file, SQLite, PostgreSQL, the gRPC proxy in front of a journal)
a tiny study is launched; then the study home, the storage (its directory, or every row of the database) and the
working directory are fingerprinted before and after list, show (by name and by the spec's path, as launch took
it), export to CSV and Parquet, report and inspect, and must be the same (ui: in test_mlflow_ui.py, after a browser
has used it). A --storage that is not a journal, or does not exist, is refused in one line and left as it was (not
emptied, not created)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest

from conftest import LENET, make_spec, postgres_database, run_cli, run_main, storage_params, storage_proxy
from reliability.checks import changed, fingerprint, record_read_only


def read_only_commands(spec: Path, storage: list[str], out: Path) -> list[list[str]]:
    """Every read-only command but ui on the study launched from `spec`, named by its name and by the spec's path."""
    name = spec.stem
    return [["list"], ["show", name, *storage], ["show", str(spec), *storage],
            ["export", name, "-o", str(out / "trials.csv"), *storage], ["export", str(spec), "-o", str(out / "trials.parquet"), *storage],
            ["report", str(spec), "-o", str(out / "report.html"), *storage], ["inspect", "lenet"]]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """A study home holding the study `readonly_journal` in its journal, launched with its model logged; the other
    storages' studies launch into the same home, so that one MLflow store serves them all."""
    root = tmp_path_factory.mktemp("readonly")
    home, specs = root / "home", root / "specs"
    specs.mkdir()
    spec = make_spec(specs, "readonly_journal", LENET)
    result = run_cli("launch", str(spec), "--trials", "1", env={"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": None})
    assert result.returncode == 0, result.stderr
    return home, spec


@pytest.mark.parametrize("kind", storage_params())
def test_read_only_commands_change_no_file(kind, launched, tmp_path, monkeypatch):
    home, journal_spec = launched
    specs = journal_spec.parent
    store, workdir, out = tmp_path / "store", tmp_path / "workdir", tmp_path / "out"
    for directory in (store, workdir, out):
        directory.mkdir()
    env = {"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": None}
    with ExitStack() as stack:
        database = None
        if kind == "journal":
            spec, storage = journal_spec, []  # launched by the fixture, into the study home's journal
        else:
            spec = make_spec(specs, f"readonly_{kind}", LENET)
            if kind == "sqlite":
                storage = ["--storage", f"sqlite:///{store / 'optuna.db'}"]
            elif kind == "postgresql":
                database = stack.enter_context(postgres_database("readonly"))
                storage = ["--storage", database]
            else:
                assert kind == "proxy", f"storage kind {kind}: give it a study here"
                storage = ["--storage", stack.enter_context(storage_proxy(str(store / "optuna.journal"), tmp_path / "proxy.log"))]
            result = run_cli("launch", str(spec), "--trials", "1", "--log-model", "none", *storage, env=env)
            assert result.returncode == 0, result.stderr

        before = fingerprint(home, store, workdir, specs, database=database)
        monkeypatch.chdir(workdir)  # what a command might create in the directory it runs in
        commands = read_only_commands(spec, storage, out)
        for command in commands:
            result = run_main(*command, env=env)
            assert result.returncode == 0, (command, result.stderr)
        after = fingerprint(home, store, workdir, specs, database=database)
    record_read_only(len(commands), len(changed(before, after)))
    assert changed(before, after) == []
    assert sorted(path.name for path in out.iterdir()) == ["report.html", "trials.csv", "trials.parquet"]


def test_a_torn_journal_is_read_as_it_is_and_no_mlflow_store_is_made(launched, tmp_path, monkeypatch):
    """A journal whose last record is torn is read around, not repaired, by a read-only command; a study home
    without an MLflow store gets none: export and report show the Optuna side alone."""
    home, spec = tmp_path / "home", launched[1]
    home.mkdir()
    journal = home / "optuna.journal"
    journal.write_bytes((launched[0] / "optuna.journal").read_bytes() + b'{"op_code": 5, "worker_id": "x", "tri')
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    before = fingerprint(home, workdir)
    commands = (["show", spec.stem], ["export", spec.stem, "-o", str(tmp_path / "out.csv")], ["report", str(spec), "-o", str(tmp_path / "out.html")])
    for command in commands:
        result = run_main(*command, env={"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": None})
        assert result.returncode == 0, (command, result.stderr)
    after = fingerprint(home, workdir)
    record_read_only(len(commands), len(changed(before, after)))
    assert changed(before, after) == []


NOT_JOURNALS = {"notes": b"my notes\nline two\n", "binary": bytes(range(256)) * 8, "JSON that is no record": b'{"a": 1}\n[1, 2]\n'}


@pytest.mark.parametrize("content", list(NOT_JOURNALS.values()), ids=list(NOT_JOURNALS))
def test_a_file_that_is_not_a_journal_is_refused_and_left_as_it_is(content, study_home, tmp_path, lenet_spec):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(content)
    before = fingerprint(tmp_path)
    for command in (["show", "kill"], ["export", "kill", "-o", str(tmp_path / "out.csv")], ["report", "kill", "-o", str(tmp_path / "out.html")],
                    ["launch", str(lenet_spec), "--trials", "1"], ["worker", str(lenet_spec)], ["confirm", str(lenet_spec)], ["finalize", "kill"]):
        result = run_main(*command, "--storage", str(notes))
        assert result.returncode == 1, (command, result.stdout)
        assert result.stderr.startswith(f"error: {notes} is not an Optuna journal file") and result.stderr.count("\n") == 1, (command, result.stderr)
    assert changed(before, fingerprint(tmp_path)) == []  # not emptied, nothing set aside, no lock left, no study home


@pytest.mark.parametrize("storage", ["default", "journal", "sqlite"])
def test_a_storage_that_does_not_exist_is_not_created(storage, study_home, tmp_path):
    missing = {"default": study_home / "optuna.journal", "journal": tmp_path / "typo.journal", "sqlite": tmp_path / "typo.db"}[storage]
    flag = {"default": [], "journal": ["--storage", str(missing)], "sqlite": ["--storage", f"sqlite:///{missing}"]}[storage]
    before = fingerprint(tmp_path)
    for command in (["show", "tiny"], ["export", "tiny", "-o", str(tmp_path / "out.csv")], ["report", "tiny", "-o", str(tmp_path / "out.html")]):
        result = run_main(*command, *flag)
        assert result.returncode == 1
        assert result.stderr == f"error: no study named 'tiny': {missing} does not exist yet; run `python -m study launch tiny` first\n"
    assert changed(before, fingerprint(tmp_path)) == []
