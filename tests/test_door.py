"""Check at the door: every value that enters is checked where it enters. Flags by their argparse types, argparse's own
errors as one `error:` line and exit 1, a study that plain Optuna wrote read as far as it goes, and a journal line that
is JSON but no record refused with the file and the line, by the commands that read and the ones that write."""

from __future__ import annotations

import csv
import json

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from reliability.checks import changed, fingerprint

from conftest import LENET, make_spec, run_cli, run_main


def _one_line_error(result, *fragments: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---- flags ----

@pytest.fixture
def spec(tmp_path):
    return str(make_spec(tmp_path, "door", LENET))


BAD_FLAGS = [
    (["launch", "SPEC", "--trials", "1", "--timeout", "nan"], ["--timeout must be a finite number of seconds > 0", "'nan'", "python -m study launch --help"]),
    (["launch", "SPEC", "--trials", "1", "--timeout", "inf"], ["--timeout", "'inf'"]),
    (["launch", "SPEC", "--timeout", "0"], ["--timeout", "'0'"]),
    (["launch", "SPEC", "--timeout", "-5"], ["--timeout", "'-5'"]),
    (["worker", "SPEC", "--timeout", "nan"], ["--timeout", "'nan'", "python -m study worker --help"]),
    (["launch", "SPEC", "--trials", "abc"], ["--trials must be an integer >= 1", "'abc'"]),
    (["launch", "SPEC", "--trials", "2.5"], ["--trials must be an integer >= 1", "'2.5'"]),
    (["launch", "SPEC", "--trials", "0"], ["--trials must be >= 1; got 0"]),
    (["create", "SPEC", "--trials", "-1"], ["--trials must be >= 1; got -1"]),
    (["launch", "SPEC", "--heartbeat", "0"], ["--heartbeat must be >= 1; got 0"]),
    (["worker", "SPEC", "--workers", "0"], ["--workers must be >= 1; got 0"]),
    (["launch", "SPEC", "--trials-per-gpu", "nan"], ["--trials-per-gpu must be an integer >= 1", "'nan'"]),
    (["confirm", "SPEC", "--top", "0"], ["--top must be >= 1; got 0"]),
    (["confirm", "SPEC", "--seeds", "0"], ["--seeds must be >= 1; got 0"]),
    (["show", "door", "--top", "0"], ["--top must be >= 1; got 0", "python -m study show --help"]),
    (["finalize", "door", "--trial", "-1"], ["--trial must be >= 0; got -1"]),
    (["inspect", "lenet", "--resize", "0"], ["--resize must be >= 1; got 0"]),
    (["inspect", "lenet", "--ratio", "0"], ["--ratio must be >= 1; got 0"]),
    (["serve-storage", "--storage", "grpc://127.0.0.1:1", "--port", "65536"], ["--port must be a port from 1 to 65535", "'65536'"]),
    (["ui", "--port", "0"], ["--port must be a port from 1 to 65535", "'0'"]),
    (["ui", "--port", "http"], ["--port", "'http'"]),
    # argparse's own errors
    (["launch", "SPEC", "--preset", "gpu"], ["--preset: invalid choice: 'gpu'", "python -m study launch --help"]),
    (["report", "door", "--cost", "joules"], ["--cost: invalid choice: 'joules'"]),
    (["inspect", "lenet", "--format", "xml"], ["--format: invalid choice: 'xml'"]),
    (["launch", "SPEC", "--trials"], ["--trials: expected one argument"]),
    (["launch", "SPEC", "--no-such-flag"], ["unrecognized arguments: --no-such-flag", "python -m study launch --help"]),
    (["launch"], ["the following arguments are required: name", "python -m study launch --help"]),
    (["lunch", "SPEC"], ["invalid choice: 'lunch'", "python -m study --help"]),
    ([], ["the following arguments are required: COMMAND"]),
]


@pytest.mark.parametrize("argv, fragments", BAD_FLAGS, ids=[" ".join(argv) or "nothing" for argv, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_naming_it_and_writes_nothing(argv, fragments, spec, study_home):
    _one_line_error(run_main(*[spec if arg == "SPEC" else arg for arg in argv]), *fragments)
    assert not study_home.exists()


def test_a_usage_error_is_one_line_and_exit_1_in_a_real_process_and_help_still_exits_0(spec, capsys):
    from study.cli import main

    result = run_cli("launch", spec, "--trials", "abc", fresh=True)
    _one_line_error(result, "--trials must be an integer >= 1; got 'abc'")
    assert main(["launch", spec, "--no-such-flag"]) == 1  # main returns it, as every user error, rather than exit
    assert capsys.readouterr().err == "error: unrecognized arguments: --no-such-flag; see python -m study launch --help\n"
    shown = run_main("launch", "--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: python -m study launch") and shown.stderr == ""


# ---- a study that plain Optuna wrote ----

def _plain_study(storage, multi: bool) -> list[tuple[float, ...]]:
    """A study as plain Optuna writes it: no user attributes, params of its own, a failed trial; returns the values."""
    study = optuna.create_study(study_name="plain", storage=storage, directions=["maximize", "minimize"] if multi else ["maximize"])
    distributions = {"x": FloatDistribution(0.0, 1.0), "kind": CategoricalDistribution(["a", "b"])}
    values = [(0.125, 3.5), (0.625, 1.25), (0.375, 2.75)] if multi else [(0.125,), (0.625,), (0.375,)]
    for number, value in enumerate(values):
        study.add_trial(create_trial(params={"x": value[0], "kind": "ab"[number % 2]}, distributions=distributions, values=list(value)))
    study.add_trial(create_trial(params={"x": 0.5, "kind": "a"}, distributions=distributions, state=TrialState.FAIL))
    return values


@pytest.fixture(scope="module", params=["journal", "sqlite"])
def plain_storage(request, tmp_path_factory):
    """Storages holding `plain`, single-objective and multi-objective, keyed by `multi`; each URL with its values."""
    directory = tmp_path_factory.mktemp(f"plain-{request.param}")
    storages = {}
    for multi in (False, True):
        path = directory / f"plain-{multi}.{'journal' if request.param == 'journal' else 'db'}"
        url = str(path) if request.param == "journal" else f"sqlite:///{path}"
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url)) if request.param == "journal" else url
        storages[multi] = (url, _plain_study(storage, multi))
    return directory, storages


@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("command", ["show", "export", "report"])
def test_a_study_plain_optuna_wrote_is_read_and_nothing_else_is_written(plain_storage, command, multi, tmp_path, monkeypatch):
    directory, storages = plain_storage
    url, values = storages[multi]
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    home = tmp_path / "home"  # no study home: none is made
    output = out / {"show": "", "export": "trials.csv", "report": "report.html"}[command]
    before = fingerprint(directory, tmp_path)
    result = run_main(command, "plain", "--storage", url, *(["-o", str(output)] if command != "show" else []),
                      env={"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": None})
    assert result.returncode == 0, result.stderr
    made = changed(before, fingerprint(directory, tmp_path))
    assert made == ([] if command == "show" else [str(output)])
    if command == "show":
        assert "4 trials, 3 COMPLETE, 1 FAIL" in result.stdout
        shown = values[1:2] if multi else values  # a Pareto front of one: trial 1 beats the others on both
        for value in shown:
            assert f"{value[0]:.4f}" in result.stdout, result.stdout
    elif command == "export":
        with output.open() as table:
            rows = list(csv.DictReader(table))
        assert [row["params_x"] for row in rows] == ["0.125", "0.625", "0.375", "0.5"]
        assert "" not in rows[0]  # every column named
        if multi:
            assert [row["values_1"] for row in rows[:3]] == [str(value[1]) for value in values]
    else:
        page = output.read_text()
        assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
        assert "records no architecture" in page
        for value in values:
            assert f"<td>{value[0]:.4g}</td>" in page


def test_show_ranks_a_plain_study_that_minimises_best_first(tmp_path):
    url = f"sqlite:///{tmp_path / 'min.db'}"
    study = optuna.create_study(study_name="plain", storage=url, direction="minimize")
    for value in (0.5, 0.25, 0.75):
        study.add_trial(create_trial(params={"x": value}, distributions={"x": FloatDistribution(0.0, 1.0)}, value=value))
    result = run_main("show", "plain", "--storage", url, env={"STUDY_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": None})
    assert result.returncode == 0, result.stderr
    assert "trials by value" in result.stdout and "val_accuracy" not in result.stdout
    shown = [result.stdout.index(f"{value:.4f}") for value in (0.25, 0.5, 0.75)]
    assert shown == sorted(shown), result.stdout  # the smallest first


# ---- a journal line that is JSON but no record ----

NOT_RECORDS = {
    "object without op_code": {"hello": 1},
    "JSON array": [1, 2],
    "op_code without its fields": {"op_code": 6, "worker_id": "w"},
    "op_code of another type": {"op_code": "x", "worker_id": "w"},
    "unknown op_code": {"op_code": 42, "worker_id": "w"},
    "trial_id of another type": {"op_code": 8, "worker_id": "w", "trial_id": "zero", "user_attr": {"a": 1}},
    "unknown trial state": {"op_code": 6, "worker_id": "w", "trial_id": 0, "state": 9, "values": None},
    "distribution Optuna cannot read": {"op_code": 5, "worker_id": "w", "trial_id": 0, "param_name": "x", "param_value_internal": 0.5,
                                        "distribution": "{not json"},
}


@pytest.fixture(scope="module")
def plain_journal(tmp_path_factory):
    """The bytes of a journal that plain Optuna wrote: a study with trials, params, intermediate values and attributes."""
    path = tmp_path_factory.mktemp("journal") / "optuna.journal"
    study = optuna.create_study(study_name="plain", storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path))))

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        trial.report(x, 1)
        trial.set_user_attr("note", "plain")
        return x

    study.optimize(objective, n_trials=3)
    return path.read_bytes()


@pytest.mark.parametrize("where", ["middle", "last line"])
@pytest.mark.parametrize("damage", list(NOT_RECORDS), ids=list(NOT_RECORDS))
def test_a_journal_line_that_is_no_record_is_one_line_naming_the_file_and_line(plain_journal, damage, where, tmp_path):
    path = tmp_path / "damaged.journal"
    lines = plain_journal.splitlines(keepends=True)
    at = 3 if where == "middle" else len(lines) + 1  # the damaged line's number
    lines.insert(at - 1, json.dumps(NOT_RECORDS[damage]).encode() + b"\n")
    path.write_bytes(b"".join(lines))
    spec = make_spec(tmp_path, "plain", LENET)
    env = {"STUDY_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": None}
    before = fingerprint(tmp_path)
    for command in (["show", "plain"], ["export", "plain", "-o", str(tmp_path / "t.csv")], ["report", "plain", "-o", str(tmp_path / "r.html")],
                    ["launch", str(spec), "--trials", "5"]):
        line = _one_line_error(run_main(*command, "--storage", str(path), env=env), f"journal {path}: line {at} ")
        assert "not an Optuna journal record" in line or "not a valid record" in line, line
    assert changed(before, fingerprint(tmp_path)) == []  # not repaired, nothing set aside, no study home


def test_the_journal_check_knows_every_operation_optuna_replays():
    """study.journal checks each record against its table of Optuna's operations: the table names them as Optuna does."""
    from optuna.storages.journal._storage import JournalOperation

    from study.journal import _OPERATIONS

    assert {number: name for number, (name, _) in _OPERATIONS.items()} == {operation.value: operation.name for operation in JournalOperation}
