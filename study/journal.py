"""Keep Optuna's journal file whole before anything appends to it.

A crash or a full disk in the middle of an append leaves a torn last record: a partial line, or
a final line that is not JSON. Optuna reads around it, but the next append would land right after
it and fuse two records, and from then on no command could read the study. So before a journal is
opened, under the same lock Optuna takes to append, a torn tail is moved out of the journal into
a file of its own (kept, never deleted) and the study goes on from its last whole record. A record
that is corrupt in the middle of the file cannot be set aside without losing what follows it: that
is an error naming the file and the line, and so is a file that holds no whole record at all: it is not a
journal (a wrong --storage), and it is left as it is.

Only the commands that write a study repair a journal. The commands that only read check it (`verify`) and
read it through `ReadOnlyJournal`, which never creates, locks or appends to the file; Optuna reads around a
torn tail.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from dashboards.files import write_whole


class JournalCorrupt(ValueError):
    """A record in the middle of the journal file is not valid JSON, or the file holds no record at all."""


def _whole(line: bytes) -> bool:
    """A complete journal record: one line holding a JSON object with Optuna's op_code."""
    if not line.endswith(b"\n"):
        return False
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        return False
    return isinstance(record, dict) and "op_code" in record


def torn_tail_start(content: bytes, path: Path) -> int | None:
    """The byte offset where the journal's torn tail starts, or None when every record is whole.

    Raises JournalCorrupt for a bad record followed by good ones, and for a file with content but no whole
    record: that is no journal with a torn tail but another file, which a repair would empty."""
    lines = content.splitlines(keepends=True)
    first_bad, offset = None, 0
    for number, line in enumerate(lines, start=1):
        if _whole(line):
            if first_bad is not None:
                bad_number, _ = first_bad
                raise JournalCorrupt(f"journal {path}: line {bad_number} is not a valid record, and whole records follow it; "
                                     f"the file was edited or damaged in the middle: restore it from a backup")
        elif first_bad is None:
            first_bad = (number, offset)
        offset += len(line)
    if first_bad is not None and first_bad[1] == 0:
        raise JournalCorrupt(f"{path} is not an Optuna journal file (no line of it is a journal record); it was left as it is: "
                             "check --storage, or move the file away to start a new journal there")
    return None if first_bad is None else first_bad[1]


def verify(path: Path) -> None:
    """What a command that only reads checks, without the lock or the repair: raises JournalCorrupt as
    torn_tail_start does. A torn tail is fine: Optuna reads around it, and the next launch sets it aside."""
    torn_tail_start(path.read_bytes(), path)


class ReadOnlyJournal(JournalFileBackend):
    """Optuna's journal file backend for the commands that only read: the file must exist (Optuna's creates it),
    and an append is a bug that fails rather than changes the file."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise FileNotFoundError(f"journal {path} does not exist")
        super().__init__(str(path))

    def append_logs(self, logs) -> None:
        raise RuntimeError(f"journal {self._file_path} is open read-only; a command that only reads tried to write to it")


def repair(path: Path) -> Path | None:
    """Move a torn tail of the journal at `path` into `<path>.torn-<time>`; returns that file, or None."""
    if not path.is_file():
        return None
    lock = JournalFileSymlinkLock(str(path))  # Optuna's own append lock: no record is half-written while we look
    lock.acquire()
    try:
        content = path.read_bytes()
        start = torn_tail_start(content, path)
        if start is None:
            return None
        aside = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%dT%H%M%S')}-{start}")
        # Whole and on the disk before the journal lets go of the tail: a full disk or a crash loses no byte of it.
        write_whole(aside, lambda out: out.write(content[start:]))
        with path.open("r+b") as journal:
            journal.truncate(start)
        return aside
    finally:
        lock.release()
