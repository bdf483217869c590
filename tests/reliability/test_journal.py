"""A journal file torn at its end (a crash or a full disk mid-append) is set aside and the study goes on;
one damaged in the middle is an error that names the file and the line, and nothing is written."""

from __future__ import annotations

import pytest

from conftest import journal, run_cli
from reliability.checks import check_consistent, fill, record_fault, sqlite_uri

TAILS = {
    "truncated": lambda content: content[:-30],
    "garbage line": lambda content: content + b"\x00\xffnot json at all\n",
    "partial garbage": lambda content: content + b'{"op_code": 5, "worker_id": "x", "tri',
}


@pytest.mark.parametrize("tear", list(TAILS), ids=list(TAILS))
def test_torn_tail_is_set_aside_and_the_study_goes_on(study_home, lenet_spec, tear):
    env = {"STUDY_HOME": str(study_home)}
    first = run_cli("launch", str(lenet_spec), "--trials", "2", "--log-model", "none", env=env)
    assert first.returncode == 0, first.stderr
    path = study_home / "optuna.journal"
    path.write_bytes(TAILS[tear](path.read_bytes()))

    second = run_cli("launch", str(lenet_spec), "--trials", "3", "--log-model", "none", env=env)
    assert second.returncode == 0, second.stderr
    aside = list(study_home.glob("optuna.journal.torn-*"))
    assert len(aside) == 1 and aside[0].stat().st_size > 0
    assert str(aside[0]) in second.stderr and "torn" in second.stderr
    for command in (("show", "kill"), ("export", "kill", "-o", str(study_home / "trials.csv"))):
        shown = run_cli(*command, env=env)
        assert shown.returncode == 0, shown.stderr
    record_fault(f"journal tail {tear}", 1, check_consistent("kill", journal(study_home), sqlite_uri(study_home), total=3))


def test_journal_damaged_in_the_middle_is_an_error_that_writes_nothing(study_home, lenet_spec):
    env = {"STUDY_HOME": str(study_home)}
    assert run_cli("launch", str(lenet_spec), "--trials", "1", "--log-model", "none", env=env).returncode == 0
    path = study_home / "optuna.journal"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = b"{broken\n"
    path.write_bytes(b"".join(lines))
    before = path.read_bytes()
    for command in (("launch", str(lenet_spec), "--trials", "2"), ("show", "kill")):
        result = run_cli(*command, env=env)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and f"{path}: line 3" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert path.read_bytes() == before
    assert not list(study_home.glob("optuna.journal.torn-*"))


def test_disk_full_mid_append_loses_nothing(study_home, lenet_spec, small_tmpfs):
    """ENOSPC for real: the journal lives on a tmpfs left with a few hundred bytes free."""
    storage = small_tmpfs / "optuna.journal"
    env = {"STUDY_HOME": str(study_home)}
    argv = ["launch", str(lenet_spec), "--storage", str(storage), "--log-model", "none"]
    assert run_cli(*argv, "--trials", "1", env=env).returncode == 0
    filler = fill(small_tmpfs, leave=700)  # a little space: the next appends tear
    full = run_cli(*argv, "--trials", "3", env=env)
    assert full.returncode != 0 and "Traceback" not in full.stderr
    assert "No space left on device" in full.stderr or "Errno 28" in full.stderr, full.stderr
    filler.unlink()

    again = run_cli(*argv, "--trials", "3", env=env)
    assert again.returncode == 0, again.stderr
    record_fault("journal append on a full disk", 1, check_consistent("kill", journal_at(storage), sqlite_uri(study_home), total=3))


def journal_at(path):
    import optuna

    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def test_a_torn_tail_that_does_not_fit_on_the_disk_stays_in_the_journal(study_home, lenet_spec, small_tmpfs):
    """The torn tail is set aside whole or not at all: on a disk without room for it the launch stops with one line
    naming the file it could not write, the journal keeps every byte, and no part of a side file is left."""
    storage = small_tmpfs / "optuna.journal"
    env = {"STUDY_HOME": str(study_home)}
    argv = ["launch", str(lenet_spec), "--storage", str(storage), "--log-model", "none", "--trials", "2"]
    assert run_cli(*argv[:-1], "1", env=env).returncode == 0
    storage.write_bytes(TAILS["partial garbage"](storage.read_bytes()) + b"x" * 65536)
    before = storage.read_bytes()
    filler = fill(small_tmpfs, leave=8192)  # room for a part of the 64 KiB tail, not for all of it
    full = run_cli(*argv, env=env)
    assert full.returncode == 1 and full.stderr.count("\n") == 1, full.stderr
    assert f"cannot write {storage}.torn-" in full.stderr and "No space left on device" in full.stderr, full.stderr
    assert storage.read_bytes() == before
    assert sorted(path.name for path in small_tmpfs.iterdir()) == ["filler", "optuna.journal"]
    filler.unlink()

    again = run_cli(*argv, env=env)
    assert again.returncode == 0, again.stderr
    (aside,) = small_tmpfs.glob("optuna.journal.torn-*")
    assert before.endswith(aside.read_bytes()) and aside.stat().st_size > 65536
    record_fault("journal tail set aside on a full disk", 1, check_consistent("kill", journal_at(storage), sqlite_uri(study_home), total=2))
