"""Keep Optuna's journal file whole before anything appends to it.

A crash or a full disk in the middle of an append leaves a torn last record: a partial line, or
a final line that is not JSON. Optuna reads around it, but the next append would land right after
it and fuse two records, and from then on no command could read the study. So before a journal is
opened, under the same lock Optuna takes to append, a torn tail is moved out of the journal into
a file of its own (kept, never deleted) and the study goes on from its last whole record. A record
that is corrupt in the middle of the file cannot be set aside without losing what follows it: that
is an error naming the file and the line, and so is a file that holds no whole record at all: it is not a
journal (a wrong --storage), and it is left as it is.

A torn append leaves bytes an append of Optuna's never ends with: a line without its newline, or one that is not JSON.
A line that is JSON and ends with its newline but is not a record Optuna can replay (not an object, an unknown op_code,
a field missing or of another type) was written whole by something else, an edit or another program: it is never a
torn tail to set aside, wherever it stands, but an error naming the file and the line, for every command, as is a
file in which no line is a record.

Only the commands that write a study repair a journal. The commands that only read check it (`verify`) and
read it through `ReadOnlyJournal`, which never creates, locks or appends to the file; Optuna reads around a
torn tail.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from optuna.distributions import json_to_distribution
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.study import StudyDirection
from optuna.trial import TrialState

from dashboards.files import write_whole


class JournalCorrupt(ValueError):
    """A record in the middle of the journal file is damaged, a line is JSON but no record, or the file holds no record at all."""


TORN = "torn"  # what _damage says of a line a torn append leaves

_NUMBER = (int, float)
_TIME = (str,)
_MAYBE_TIME = (str, type(None))
_ATTR = (dict,)
# Optuna's journal operations (optuna.storages.journal._storage.JournalOperation, by number) and the fields its
# replay (JournalStorageReplayResult) reads from each, with the JSON types it reads them as. Every record also
# carries the worker_id of its writer.
_OPERATIONS = {
    0: ("CREATE_STUDY", {"study_name": (str,), "directions": (list,)}),
    1: ("DELETE_STUDY", {"study_id": (int,)}),
    2: ("SET_STUDY_USER_ATTR", {"study_id": (int,), "user_attr": _ATTR}),
    3: ("SET_STUDY_SYSTEM_ATTR", {"study_id": (int,), "system_attr": _ATTR}),
    4: ("CREATE_TRIAL", {"study_id": (int,), "datetime_start": _MAYBE_TIME}),
    5: ("SET_TRIAL_PARAM", {"trial_id": (int,), "param_name": (str,), "param_value_internal": _NUMBER, "distribution": (str,)}),
    6: ("SET_TRIAL_STATE_VALUES", {"trial_id": (int,), "state": (int,), "values": (list, type(None))}),
    7: ("SET_TRIAL_INTERMEDIATE_VALUE", {"trial_id": (int,), "step": (int,), "intermediate_value": _NUMBER}),
    8: ("SET_TRIAL_USER_ATTR", {"trial_id": (int,), "user_attr": _ATTR}),
    9: ("SET_TRIAL_SYSTEM_ATTR", {"trial_id": (int,), "system_attr": _ATTR}),
    10: ("DISCARD_TRIALS", {}),  # Optuna's replay skips it
}
# The fields a CREATE_TRIAL record may carry (an enqueued or copied trial), read when present.
_CREATE_TRIAL_OPTIONAL = {"state": (int,), "datetime_complete": _TIME, "distributions": (dict,), "params": (dict,), "user_attrs": (dict,),
                          "system_attrs": (dict,), "value": (*_NUMBER, type(None)), "values": (list, type(None)), "intermediate_values": (dict,)}


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "true or false", type(None): "null"}


def _is(value, types: tuple) -> bool:
    """isinstance, except that JSON's true and false are no numbers here."""
    return isinstance(value, types) and (not isinstance(value, bool) or bool in types)


def _damage(line: bytes) -> str | None:
    """None for a whole record; TORN for what a torn append leaves (no newline, not JSON); else what makes the line,
    JSON written whole, no record Optuna can replay."""
    if not line.endswith(b"\n"):
        return TORN
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        return TORN
    if not isinstance(record, dict):
        return f"JSON {_JSON_KINDS.get(type(record), type(record).__name__)}, not an object"
    if "op_code" not in record:
        return "no op_code"
    op_code = record["op_code"]
    if not _is(op_code, (int,)) or op_code not in _OPERATIONS:
        return f"op_code {op_code!r} is none of Optuna's journal operations 0 to {len(_OPERATIONS) - 1}"
    name, fields = _OPERATIONS[op_code]
    present = {**fields, "worker_id": (str,)}
    if op_code == 4:
        present |= {key: types for key, types in _CREATE_TRIAL_OPTIONAL.items() if key in record}
    for key, types in present.items():
        if key not in record:
            return f"{name} without its {key}"
        if not _is(record[key], types):
            return f"{name} with {key} {record[key]!r}, not {' or '.join('null' if t is type(None) else t.__name__ for t in types)}"
    try:
        _check_values(op_code, record)
    except KeyError as error:
        return f"{name} without its {error.args[0]}"
    except (ValueError, TypeError, IndexError) as error:
        return f"{name} with a value Optuna cannot read ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
    return None


def _check_values(op_code: int, record: dict) -> None:
    """What Optuna's replay converts, converted here first, so that a value it cannot read raises here."""
    if op_code in (2, 3, 8, 9):
        attribute = "user_attr" if op_code in (2, 8) else "system_attr"
        if len(record[attribute]) != 1:
            raise ValueError(f"{attribute} of {len(record[attribute])} attributes, not 1")
    if op_code == 0:
        for direction in record["directions"]:
            StudyDirection(direction)
    if op_code == 4:
        for key in ("datetime_start", "datetime_complete"):
            if record.get(key) is not None:
                datetime.fromisoformat(record[key])
        distributions = {key: json_to_distribution(value) for key, value in record.get("distributions", {}).items()}
        for key, value in record.get("params", {}).items():
            if key not in distributions:
                raise ValueError(f"param {key!r} without its distribution")
            distributions[key].to_external_repr(value)
        for step, value in record.get("intermediate_values", {}).items():
            int(step)
            if not _is(value, _NUMBER):
                raise ValueError(f"intermediate value {value!r}, not a number")
    if op_code == 5:
        json_to_distribution(record["distribution"]).to_external_repr(record["param_value_internal"])
    if op_code in (4, 6):
        state = TrialState(record.get("state", TrialState.RUNNING.value))
        if op_code == 6 and state == TrialState.RUNNING:
            datetime.fromisoformat(record["datetime_start"])
        if op_code == 6 and state.is_finished():
            datetime.fromisoformat(record["datetime_complete"])
        if record.get("values") is not None and not all(_is(value, _NUMBER) for value in record["values"]):
            raise ValueError(f"values {record['values']!r}, not numbers")


def torn_tail_start(content: bytes, path: Path) -> int | None:
    """The byte offset where the journal's torn tail starts, or None when every record is whole.

    Raises JournalCorrupt for a line that is JSON but no record (_damage), for a torn line followed by records, and for
    a file with content but no whole record: that is no journal with a torn tail but another file, which a repair would empty."""
    lines = content.splitlines(keepends=True)
    damage = [_damage(line) for line in lines]
    if lines and None not in damage:
        raise JournalCorrupt(f"{path} is not an Optuna journal file (no line of it is a journal record); it was left as it is: "
                             "check --storage, or move the file away to start a new journal there")
    torn = None  # the number of the first torn line
    for number, what in enumerate(damage, start=1):
        if what is TORN:
            torn = torn or number
        elif torn is not None:
            raise JournalCorrupt(f"journal {path}: line {torn} is not a valid record, and records follow it; "
                                 f"the file was edited or damaged in the middle: restore it from a backup")
        elif what is not None:
            raise JournalCorrupt(f"journal {path}: line {number} is not an Optuna journal record ({what}); "
                                 "the file was edited or written by another program: restore it from a backup")
    return None if torn is None else sum(len(line) for line in lines[:torn - 1])


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
