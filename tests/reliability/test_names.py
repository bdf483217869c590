"""A name is data, never a path: file names made from study and model names are safe slugs inside their folder,
an output never replaces a file the study or its MLflow store uses, and the names a user gives are checked against
every place they go before anything is written. Property-based tests throw names with separators, dots, `..`,
Unicode, control characters and long lengths at the slug and, through real commands, at studies of a shared storage
named by anyone (plain Optuna)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import urllib.parse
from pathlib import Path

import optuna
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from conftest import LENET, journal, make_spec, run_main
from dashboards.files import SLUG_BYTES, slug
from reliability.checks import changed, fingerprint, record_hostile
from study.names import check_output

# Names as anyone may give them: path-like pieces, dots, Unicode, control characters, up to 300 characters.
PIECES = ["/", "\\", ".", "..", "../", "/proc/", "a", "Z", "9", "_", "-", "+", " ", "é", "名", "\U0001f600", "\n", "\x00", "\t",
          "\u202e", ":", "'", '"', "%", "#", "?", "~", "-0123456789"]
NAMES = st.one_of(
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=40).map("".join),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=300),
    st.sampled_from(["../../escaped", "/some/dir/abs", "a/b", ".", "..", ".hidden", "x" * 245, "é" * 150, "tiny-0123456789"]),
)
SAFE = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_+-]{0,98}", fullmatch=True).filter(lambda name: not re.search(r"-[0-9a-f]{10}$", name))
ENV = {"MLFLOW_TRACKING_URI": None}


def _harmless(name: str) -> bool:
    """Names the command-level tests give, chosen so that even a command that took a name for a path could write
    nothing outside their sandbox (reports/ is four folders deep in it; nothing can be created under /proc), and
    that the command line reads as a study's name (NAME.toml means a spec file)."""
    return name.count("..") <= 3 and (not name.startswith("/") or name.startswith("/proc/")) and not name.endswith(".toml")


COMMAND_NAMES = NAMES.filter(_harmless)


def _one_line_error(result, *fragments: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---- the slug ----

@settings(max_examples=300, deadline=None)
@given(NAMES)
def test_slug_is_one_safe_bounded_path_component(name):
    made = slug(name)
    assert made and len(made.encode()) <= SLUG_BYTES
    assert "/" not in made and "\\" not in made and ".." not in made and not made.startswith(".")
    assert made.isprintable() and made == made.strip()
    assert Path(made).name == made and os.path.normpath(made) == made
    if made != name:  # information was lost: the hash of the whole name says which name it was
        assert re.search(r"-[0-9a-f]{10}$", made)
    with tempfile.TemporaryDirectory() as folder:  # the file system takes it, with a suffix, as one file of the folder
        (Path(folder) / f"{made}.html").write_text("x")
        assert os.listdir(folder) == [f"{made}.html"]


@settings(max_examples=100, deadline=None)
@given(SAFE)
def test_slug_of_a_safe_name_is_the_name(name):
    assert slug(name) == name


@settings(max_examples=100, deadline=None)
@given(st.lists(NAMES, min_size=2, max_size=20, unique=True))
def test_distinct_names_have_distinct_slugs(names):
    assert len({slug(name) for name in names}) == len(names)


def test_slugs_that_lose_information_still_differ():
    assert len({slug(name) for name in ["a/b", "a:b", "a_b", "a\nb", "a b", "a..b", "x" * 245, "x" * 246]}) == 8


# ---- studies of a shared storage, named by anyone ----

@pytest.fixture(scope="module")
def named_home(tmp_path_factory, tiny_study):
    """A copy of the shared study's home, three folders deep in a sandbox, to which the tests add copies of `tiny`
    under odd names, as plain Optuna (another user of the storage) may name a study."""
    sandbox = tmp_path_factory.mktemp("names")
    home = sandbox / "one" / "two" / "home"
    shutil.copytree(tiny_study, home)
    return home


def _copy_of_tiny(home: Path, name: str) -> None:
    storage = journal(home)
    if name not in optuna.get_all_study_names(storage):
        optuna.copy_study(from_study_name="tiny", from_storage=storage, to_storage=storage, to_study_name=name)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(COMMAND_NAMES)
def test_report_of_any_study_name_writes_one_whole_file_in_reports(named_home, name):
    _copy_of_tiny(named_home, name)
    sandbox = named_home.parent.parent.parent
    before = fingerprint(sandbox)
    result = run_main("report", "--", name, env={"STUDY_HOME": str(named_home), **ENV})
    assert result.returncode == 0, result.stderr
    written = Path(result.stdout.strip().splitlines()[-1])
    others = set(changed(before, fingerprint(sandbox))) - {str(written)}
    record_hostile("odd study names (hypothesis) through report", tried=1, files_outside=len(others))
    assert written == named_home / "reports" / f"{slug(name)}.html"
    assert written.resolve().parent == (named_home / "reports").resolve()
    assert not others  # nothing else: no other file, no temporary left
    assert written.read_text().rstrip().endswith("</html>")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(COMMAND_NAMES)
def test_export_of_any_study_name_writes_only_its_output(named_home, tmp_path_factory, name):
    _copy_of_tiny(named_home, name)
    sandbox = named_home.parent.parent.parent
    out = tmp_path_factory.mktemp("out")
    before = fingerprint(sandbox, out)
    result = run_main("export", "-o", str(out / "trials.csv"), "--", name, env={"STUDY_HOME": str(named_home), **ENV})
    assert result.returncode == 0, result.stderr
    written = changed(before, fingerprint(sandbox, out))
    record_hostile("odd study names (hypothesis) through export -o", tried=1, files_outside=len(set(written) - {str(out / "trials.csv")}))
    assert written == [str(out / "trials.csv")]
    assert len(pd.read_csv(out / "trials.csv")) == len(optuna.load_study(study_name=name, storage=journal(named_home)).trials)


@pytest.mark.parametrize("case", ["relative", "absolute", "long"])
def test_report_of_a_path_like_study_name_stays_in_reports(named_home, case):
    """The issue's cases: before, `../../escaped` wrote two folders above the home's reports/, `/some/dir/abs`
    wrote /some/dir/abs.html (here a folder of the sandbox), and 245 characters failed with `File name too long`."""
    outside = named_home.parent / "some" / "dir" / "abs"
    name = {"relative": "../../escaped", "absolute": str(outside), "long": "x" * 245}[case]
    _copy_of_tiny(named_home, name)
    result = run_main("report", name, env={"STUDY_HOME": str(named_home), **ENV})
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent == named_home / "reports"
    assert not (named_home.parent / "escaped.html").exists() and not outside.parent.exists()


def test_a_spec_file_with_a_long_odd_name_launches_and_reports(tmp_path):
    """A spec file's stem is the study's name: 245 characters with dots, a space and Unicode train, and the report
    and the MLflow artifacts take its slug inside their folders (before, the report failed after the whole study)."""
    name = "..odd name é" + "x" * 233
    assert len(name) == 245
    home = tmp_path / "home"
    spec = make_spec(tmp_path, name, LENET)
    result = run_main("launch", str(spec), "--trials", "1", env={"STUDY_HOME": str(home), **ENV})
    assert result.returncode == 0, result.stderr
    assert (home / "reports" / f"{slug(name)}.html").is_file()
    assert sorted(p.name for p in (home / "reports").iterdir()) == [f"{slug(name)}.html"]
    experiment = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}").get_experiment_by_name(name)
    assert experiment is not None
    assert experiment.artifact_location == (home / "mlartifacts" / slug(name)).resolve().as_uri()


# ---- outputs never replace what the study uses ----

@pytest.fixture
def plain_home(tmp_path, monkeypatch):
    """A study home whose journal holds `plain`, a study made by plain Optuna, and an MLflow store file."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "mlartifacts").mkdir()
    (home / "mlflow.db").write_bytes(b"an MLflow store")
    study = optuna.create_study(study_name="plain", storage=journal(home))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    monkeypatch.setenv("STUDY_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


def _refusals(home: Path) -> dict[str, tuple[list[str], str]]:
    """(arguments, the flag named in the error) of each command that would write over a file the study uses."""
    results = home.parent / "results.csv"
    shutil.copy(home / "optuna.journal", results)  # a journal may have any name
    (home.parent / "link.csv").symlink_to(home / "optuna.journal")
    os.link(home / "optuna.journal", home.parent / "hard.csv")
    (home.parent / "link.html").symlink_to(home / "mlflow.db")
    report_journal = home.parent / "journal.html"
    shutil.copy(home / "optuna.journal", report_journal)
    spec = make_spec(home.parent, "lenet", LENET)
    return {
        "export over its own journal": (["export", "plain", "--storage", str(results), "-o", str(results)], "-o"),
        "export through a symlink": (["export", "plain", "-o", str(home.parent / "link.csv")], "-o"),
        "export through a hard link": (["export", "plain", "-o", str(home.parent / "hard.csv")], "-o"),
        "report into mlartifacts": (["report", "plain", "-o", str(home / "mlartifacts" / "r.html")], "-o"),
        "report through a symlink to mlflow.db": (["report", "plain", "-o", str(home.parent / "link.html")], "-o"),
        "report over its own journal": (["report", "plain", "--storage", str(report_journal), "-o", str(report_journal)], "-o"),
        "report --png into mlartifacts": (["report", "plain", "--png", str(home / "mlartifacts" / "figures")], "--png"),
        "launch over its own journal": (["launch", str(spec), "--storage", str(report_journal), "-o", str(report_journal)], "-o"),
    }


@pytest.mark.parametrize("case", ["export over its own journal", "export through a symlink", "export through a hard link",
                                  "report into mlartifacts", "report through a symlink to mlflow.db", "report over its own journal",
                                  "report --png into mlartifacts", "launch over its own journal"])
def test_an_output_that_is_a_file_of_the_study_is_refused_before_any_work(plain_home, case):
    args, flag = _refusals(plain_home)[case]
    before = fingerprint(plain_home.parent)
    _one_line_error(run_main(*args), f"error: {flag} ", "write the output elsewhere")
    touched = changed(before, fingerprint(plain_home.parent))
    record_hostile("outputs aimed at the study's own files (-o, --png; symlinks, hard links)", tried=1, files_outside=len(touched))
    assert touched == []


def test_the_store_of_mlflow_tracking_uri_is_refused_as_an_output(plain_home):
    store = plain_home.parent / "store.html"
    store.write_bytes(b"an MLflow store")
    result = run_main("report", "plain", "-o", str(store), env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    _one_line_error(result, "-o ", "the MLflow store")
    assert store.read_bytes() == b"an MLflow store"


@pytest.mark.parametrize("name", ["optuna.journal", "optuna.journal.lock", "optuna.journal.lock1b2c.rename", "optuna.journal.torn-20260101T000000-12",
                                  "mlflow.db", "mlflow.db-wal", "mlflow.db-shm", "mlflow.db-journal", ".mlflow.db.building-12-34",
                                  "mlartifacts", "mlartifacts/1/run/artifacts/model.pt"])
def test_every_file_the_study_uses_is_refused(plain_home, name):
    with pytest.raises(ValueError, match="write the output elsewhere"):
        check_output("-o", plain_home / name, None)


@pytest.mark.parametrize("name", ["optuna.journal.csv", "optuna.journal-old", "mlflow.db.html", "reports/plain.html", "mlartifacts.html"])
def test_files_beside_those_the_study_uses_are_outputs_like_any(plain_home, name):
    check_output("-o", plain_home / name, None)


def test_the_side_files_of_an_sqlite_storage_are_refused(plain_home, tmp_path):
    database = tmp_path / "study.db"
    for name in ("study.db", "study.db-wal", "study.db-shm", "study.db-journal"):
        with pytest.raises(ValueError, match="the study's storage"):
            check_output("-o", tmp_path / name, f"sqlite:///{database}?timeout=10")


# ---- names the user gives ----

BAD_MODEL_NAMES = {"a/b": "cannot contain '/'", "a:b": "cannot contain", "..": "resolve", "it's": "quote", "a\nb": "unprintable",
                   "x" * 257: "257 characters"}


@pytest.mark.parametrize("name", list(BAD_MODEL_NAMES))
def test_launch_refuses_a_bad_register_name_before_anything_is_written(tmp_path, name):
    home = tmp_path / "home"
    spec = make_spec(tmp_path, "lenet", LENET)
    result = run_main("launch", str(spec), "--trials", "1", "--register", name, env={"STUDY_HOME": str(home), **ENV})
    _one_line_error(result, "--register", repr(name), BAD_MODEL_NAMES[name])
    assert not home.exists()


@pytest.mark.parametrize("name", list(BAD_MODEL_NAMES))
def test_finalize_refuses_a_bad_register_name_before_anything_is_written(tmp_path, name):
    home = tmp_path / "home"
    result = run_main("finalize", "tiny", "--register", name, env={"STUDY_HOME": str(home), **ENV})
    _one_line_error(result, "--register", repr(name), BAD_MODEL_NAMES[name])
    assert not home.exists()


def test_finalize_refuses_a_default_model_name_mlflow_does_not_take(tmp_path):
    home = tmp_path / "home"
    result = run_main("finalize", "a:b", env={"STUDY_HOME": str(home), **ENV})
    _one_line_error(result, "--register (default: <study>-final)", "'a:b-final'")
    assert not home.exists()


@pytest.mark.parametrize("name, rule", [("tab\there", "unprintable"), ("x" * 249, "249 characters")])
def test_launch_refuses_a_spec_file_whose_name_mlflow_does_not_take(tmp_path, name, rule):
    home = tmp_path / "home"
    spec = make_spec(tmp_path, name, LENET)
    result = run_main("launch", str(spec), "--trials", "1", env={"STUDY_HOME": str(home), **ENV})
    _one_line_error(result, "spec file", rule, "rename the file")
    assert not home.exists()


# ---- links in the MLflow UI ----

def test_ui_links_quote_model_names(tmp_path):
    from study.tracking import ui_links

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = "best #1? 50% & more é"
    client.create_registered_model(name)
    client.create_model_version(name, (tmp_path / "model").as_uri())
    [(label, link)] = [(label, link) for label, link in ui_links(client, "http://127.0.0.1:5000") if label.startswith("model ")]
    assert label == f"model {name} v1"
    route = link.removeprefix("http://127.0.0.1:5000/#/models/")
    quoted, _, rest = route.partition("/")
    assert rest.startswith("versions/1?") and urllib.parse.unquote(quoted) == name
    assert not set(quoted) & set(" #?&%/é") - {"%"} and "#" not in link.removeprefix("http://127.0.0.1:5000/#")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(NAMES)
def test_a_register_name_is_refused_in_one_line_or_registered_found_and_linked(registry, name):
    """Every name `--register` may be given: refused before anything is written, in one line, or one MLflow registers,
    finds again by its quoted name (as the launch does) and `ui` links to by that name."""
    from study.names import check_model_name
    from study.tracking import ui_links

    try:
        check_model_name("--register", name)
    except ValueError as error:
        record_hostile("odd --register names (hypothesis): refused in one line or registered", tried=1)
        assert str(error).startswith("--register ") and "\n" not in str(error)
        return
    record_hostile("odd --register names (hypothesis): refused in one line or registered", tried=1)
    if not registry.search_registered_models(f"name = '{name}'"):
        registry.create_registered_model(name)
        registry.create_model_version(name, "file:///nowhere/model")
    assert [model.name for model in registry.search_registered_models(f"name = '{name}'")] == [name]
    (link,) = [link for label, link in ui_links(registry, "http://127.0.0.1:5000") if label == f"model {name} v1"]
    route = link.removeprefix("http://127.0.0.1:5000/#/models/")
    assert urllib.parse.unquote(route.partition("/")[0]) == name and route.partition("/")[2].startswith("versions/1?")
