"""A name is data, never a path: the names a user gives, and the files a command writes, checked at the door.

Names. A study's name (a spec file's stem) becomes the Optuna study, the MLflow experiment (and `NAME.confirm`,
its companion's), a run name and, through dashboards.files.slug, file names; a registered model name goes to
MLflow's registry and into its search filters. Each is checked against the rules of every place it goes before
anything is written, rather than failing in MLflow after a whole study trained.

Outputs. A file a command writes (`export -o`, `report -o`, `report --png DIR`, `launch -o`) never is, nor
resolves to, a file that the study or its MLflow store uses (study_files): a journal may have any name, so
`-o results.csv` could otherwise replace the study it exports.
"""

from __future__ import annotations

import os
from pathlib import Path

# MLflow's database columns for experiment and registered model names hold 256 characters (its own checks let
# experiment names reach 500, which a PostgreSQL store then refuses).
NAME_CHARS = 256


def _mlflow_refusal(check, name: str) -> str | None:
    """What MLflow's own validation function `check` says of `name`, as one line; None when it accepts it."""
    from mlflow.exceptions import MlflowException

    try:
        check(name)
    except MlflowException as error:
        return error.message.strip().splitlines()[0]
    return None


def _printable(name: str) -> str | None:
    """Names are printed on one line, in tables and logs: no control or other unprintable character."""
    bad = next((c for c in name if not c.isprintable()), None)
    return None if bad is None else f"it holds the unprintable character {bad!r}"


def _within(name: str, limit: int, why: str = "") -> str | None:
    return None if len(name) <= limit else f"it is {len(name)} characters long, and MLflow stores at most {limit}{why}"


def check_study_name(name: str, where: str) -> None:
    """A study name a user gives (a spec file's stem) against the MLflow experiment names it becomes, its own and its
    confirm companion's (NAME.confirm); raises SpecError naming `where` it came from."""
    from mlflow.utils.validation import _validate_experiment_name

    from dashboards.confirmed import companion_name
    from study.specs import SpecError

    suffix = companion_name(name)[len(name):]
    problem = (_printable(name) or _within(name, NAME_CHARS - len(suffix), f" ({NAME_CHARS}, less the {suffix!r} of its confirm study)")
               or _mlflow_refusal(_validate_experiment_name, name))
    if problem:
        raise SpecError(f"{where}: its name {name!r} becomes the study's and its MLflow experiment's, and {problem}; rename the file")


def check_model_name(flag: str, name: str) -> None:
    """A registered model name (`--register NAME`, or finalize's default `<study>-final`) against MLflow's rules for
    them and the registry's search filters, which quote it; raises ValueError naming `flag`."""
    from mlflow.utils.validation import _validate_model_name

    problem = _printable(name) or _within(name, NAME_CHARS) or _mlflow_refusal(_validate_model_name, name)
    if problem is None and any(c in name for c in "'\"\\"):
        problem = "it holds a quote or a backslash, and the registry's search filters quote names"
    if problem:
        raise ValueError(f"{flag} {name!r}: not a registered model name MLflow takes: {problem}")


def study_files(storage_url: str | None) -> list[tuple[Path, str]]:
    """Every file or folder the study at `storage_url` (default: the home's journal) and its MLflow store use, with
    what it is. Each one's side files (_side_file) and everything inside a folder are used too."""
    from study.storage import default_storage_url, home, storage_file
    from study.tracking import tracking_uri

    used = [(home() / "mlflow.db", "the MLflow store"), (home() / "mlartifacts", "the MLflow artifact store")]
    if (file := storage_file(storage_url or default_storage_url())) is not None:
        used.append((file, "the study's storage"))
    if (tracking := storage_file(tracking_uri(home()))) is not None:  # MLFLOW_TRACKING_URI: an SQLite file, or a file store
        used.append((tracking, "the MLflow store"))
    return used


def _side_file(name: str, of: str) -> bool:
    """Whether file `name` belongs to file `of` of the same folder: SQLite's rollback journal, WAL and shared memory,
    Optuna's journal lock (and the name it renames the lock to on release), a torn tail set aside (study.journal.repair),
    a store being built (study.tracking._building_name)."""
    if name.startswith(f".{of}.building-"):
        return True
    if not name.startswith(of):
        return False
    rest = name[len(of):]
    return rest in ("-wal", "-shm", "-journal", ".lock") or rest.startswith(".torn-") or (rest.startswith(".lock") and rest.endswith(".rename"))


def _relation(candidate: Path, place: Path) -> str | None:
    """How path `candidate` would reach the used file or folder `place`, if it does: both are absolute."""
    if candidate == place:
        return "that is"
    if place in candidate.parents:
        return "that is inside"
    if candidate.parent == place.parent and _side_file(candidate.name, place.name):
        return "that is a file of"
    if candidate.exists() and place.exists() and os.path.samefile(candidate, place):
        return "that is (a hard link) the same file as"
    return None


def check_output(flag: str, output: Path, storage_url: str | None) -> None:
    """Refuse, before any work, an output path that is, or resolves through symbolic links or a hard link to, a file
    the study or its MLflow store uses (study_files); `flag` names the option in the one-line error."""
    output = Path(output)
    for used, what in study_files(storage_url):
        for place in {Path(os.path.abspath(used)), used.resolve()}:
            for candidate in {Path(os.path.abspath(output)), output.resolve()}:
                if (relation := _relation(candidate, place)) is not None:
                    raise ValueError(f"{flag} {output}: {relation} {what} ({used}); write the output elsewhere")
