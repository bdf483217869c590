"""Once means once: `finalize` trains and registers once, also when two start together or one was killed outright
(study/once.py), and `create` started several times at once on a fresh storage makes one study (storage._create_tables)."""

from __future__ import annotations

import contextlib
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import LENET, hold_env, journal, make_spec, postgres_database, release, run_cli, run_cli_together, run_main, start_hooked, wait_for_holds
from reliability.checks import record_hostile, sqlite_uri


@pytest.fixture(params=["journal", "postgresql"])
def storage(request):
    """The --storage flags of a study: the study home's journal, or a fresh PostgreSQL database."""
    if request.param == "journal":
        yield []
        return
    with postgres_database("once") as url:
        yield ["--storage", url]


def _launched(tmp_path, storage: list[str]) -> str:
    spec = make_spec(tmp_path, "once", LENET)
    result = run_main("launch", str(spec), "--trials", "1", *storage)
    assert result.returncode == 0, result.stderr
    return "once"


def _finals(home) -> dict[str, list]:
    """The study's final runs by MLflow status, and the versions of its registered model (under "versions")."""
    client = MlflowClient(tracking_uri=sqlite_uri(home))
    experiment = client.get_experiment_by_name("once")
    runs: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id], filter_string="tags.`study.role` = 'final'"):
        runs.setdefault(run.info.status, []).append(run)
    runs["versions"] = client.search_model_versions("name = 'once-final'")
    return runs


def _claim(storage: list[str], home):
    from records import FINALIZE_CLAIM

    return optuna.load_study(study_name="once", storage=storage[1] if storage else journal(home)).user_attrs.get(FINALIZE_CLAIM)


def _held_finalize(tmp_path, storage: list[str]):
    """A finalize held in its training (its final run exists, RUNNING, no epoch done), and its hold."""
    holds = tmp_path / "holds"
    held = start_hooked("finalize", "once", *storage, env=hold_env(holds, "start"))
    (hold,) = wait_for_holds(holds, 1, held.alive)
    return held, hold


def test_a_second_finalize_while_one_trains_trains_nothing(study_home, tmp_path, storage):
    _launched(tmp_path, storage)
    first, hold = _held_finalize(tmp_path, storage)

    second = run_cli("finalize", "once", *storage)
    assert second.returncode == 1, second.stdout
    assert second.stderr.startswith("error: finalize of study once is already running") and len(second.stderr.splitlines()) == 1
    assert f"pid {first.pid}," in second.stderr, second.stderr
    assert "final model" not in second.stdout

    release(hold)
    assert first.wait() == 0, first.errors()
    finals = _finals(study_home)
    record_hostile(f"a second finalize while one trains ({storage[1].split(':')[0] if storage else 'journal'})", tried=1,
                   duplicates=len(finals.get("FINISHED", [])) - 1 + len(finals.get("versions", [])) - 1)
    assert [len(finals.get(status, [])) for status in ("FINISHED", "RUNNING", "KILLED", "FAILED")] == [1, 0, 0, 0]
    (version,) = finals["versions"]
    assert version.run_id == finals["FINISHED"][0].info.run_id
    assert _claim(storage, study_home) is None  # given up at its end

    # Once it ended, finalize again finds its run and trains nothing.
    again = run_main("finalize", "once", *storage)
    assert again.returncode == 0, again.stderr
    assert f"already, in run {version.run_id}; not trained again" in again.stdout and "version 1" in again.stdout


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_finalizes_started_together_train_and_register_once(study_home, tmp_path, kind):
    storage = ["--storage", f"sqlite:///{tmp_path / 'once.db'}"] if kind == "sqlite" else []
    _launched(tmp_path, storage)
    results = run_cli_together([["finalize", "once", *storage]] * 2)
    assert min(r.returncode for r in results) == 0, [r.stderr for r in results]
    for result in results:  # the other one: refused while the first ran, or found its run once it ended
        assert result.returncode == 0 or "is already running" in result.stderr, result.stderr
    finals = _finals(study_home)
    record_hostile(f"2 finalize --register at once ({kind})", tried=1,
                   duplicates=len(finals.get("FINISHED", [])) - 1 + len(finals.get("versions", [])) - 1)
    assert len(finals["FINISHED"]) == 1 and set(finals) == {"FINISHED", "versions"}
    assert len(finals["versions"]) == 1


def test_a_killed_finalize_is_closed_killed_and_the_next_trains_once(study_home, tmp_path, storage):
    _launched(tmp_path, storage)
    killed, _ = _held_finalize(tmp_path, storage)
    (running,) = _finals(study_home)["RUNNING"]
    killed.kill()
    killed.wait()

    again = run_cli("finalize", "once", *storage)
    assert again.returncode == 0, again.stderr
    assert f"run {running.info.run_id} of a finalize that died (host " in again.stdout and f"pid {killed.pid})" in again.stdout
    finals = _finals(study_home)
    record_hostile(f"finalize killed in training, then finalize again ({storage[1].split(':')[0] if storage else 'journal'})", tried=1,
                   duplicates=len(finals.get("FINISHED", [])) - 1 + len(finals.get("versions", [])) - 1 + len(finals.get("RUNNING", [])))
    assert [run.info.run_id for run in finals["KILLED"]] == [running.info.run_id]
    assert len(finals["FINISHED"]) == 1 and "RUNNING" not in finals
    (version,) = finals["versions"]
    assert version.run_id == finals["FINISHED"][0].info.run_id
    assert _claim(storage, study_home) is None


def test_a_claim_from_another_host_holds_until_its_heartbeat_is_stale(study_home, tmp_path):
    from records import FINALIZE_CLAIM
    from study.once import LEASE

    _launched(tmp_path, [])
    study = optuna.load_study(study_name="once", storage=journal(study_home))
    claim = {"host": "elsewhere.example", "pid": 1, "token": "0" * 32}
    study.set_user_attr(FINALIZE_CLAIM, {**claim, "beat": time.time()})
    busy = run_main("finalize", "once")
    assert busy.returncode == 1 and "is already running (host elsewhere.example, pid 1," in busy.stderr, busy.stderr
    assert "FINISHED" not in _finals(study_home)

    study.set_user_attr(FINALIZE_CLAIM, {**claim, "beat": time.time() - LEASE - 1})  # that host went silent
    taken = run_main("finalize", "once")
    assert taken.returncode == 0, taken.stderr
    finals = _finals(study_home)
    assert len(finals["FINISHED"]) == 1 and len(finals["versions"]) == 1
    assert _claim([], study_home) is None


@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_creates_started_together_make_one_study(tmp_path, kind):
    from records import STUDY_UID, parent_runs

    spec = make_spec(tmp_path, "once", LENET)
    # Their collision on a fresh PostgreSQL database is a race that one round misses at times: three rounds, each on a
    # fresh database and study home.
    for round in range(3 if kind == "postgresql" else 1):
        home = tmp_path / f"home-{round}"
        with contextlib.ExitStack() as stack:
            url = stack.enter_context(postgres_database("once")) if kind == "postgresql" else str(home / "optuna.journal")
            storage = ["--storage", url] if kind == "postgresql" else []
            results = run_cli_together([["create", str(spec), "--trials", "2", "--preset", "cpu", *storage]] * 3,
                                       env={"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": None})
            assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
            opened = url if kind == "postgresql" else journal(home)
            assert optuna.get_all_study_names(opened) == ["once"]
            study = optuna.load_study(study_name="once", storage=opened)
            client = MlflowClient(tracking_uri=sqlite_uri(home))
            experiment = client.get_experiment_by_name("once")
            runs = client.search_runs([experiment.experiment_id])
            record_hostile(f"3 create at once ({kind})", tried=1, duplicates=len(runs) - 1)
            assert len(parent_runs(client, experiment.experiment_id, study.user_attrs[STUDY_UID])) == 1
            assert len(runs) == 1  # nothing else: no second parent under another identity
