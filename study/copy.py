"""`python -m study copy NAME --from STORAGE --to STORAGE`: a study moved to another storage, e.g. from the journal
file of one machine to the PostgreSQL database that many machines share.

The copy is the same study: its trials (numbers, states, values, parameters, attributes), its record (total,
preset, objective, sampler, pruner, the spec's text) and its identity in MLflow (records.STUDY_UID), so
its trials' `mlflow_run_id` name the runs they logged and a launch on the copy reopens the same MLflow parent run.
MLflow runs are not copied: they stay in the tracking store they were logged in, which is the copy's too as long
as its commands run with the same STUDY_HOME or MLFLOW_TRACKING_URI. The source is left as it was.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from study.specs import SpecError, study_name
from study.storage import mask, open_storage, setup_lock, storage_file


def copy_study(name: str, source_url: str, target_url: str) -> optuna.Study:
    """Copy study NAME from `source_url` to `target_url`, both checked before anything is written. Returns the copy."""
    name = study_name(name)
    source = open_storage(source_url, read_only=True)
    if name not in optuna.get_all_study_names(source):
        raise SpecError(f"no study named {name!r} in {mask(source_url)}")
    running = [t.number for t in optuna.load_study(study_name=name, storage=source).get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    if running:
        # A RUNNING trial copied would stay RUNNING in the copy for good: no worker of the copy holds it.
        raise SpecError(f"study {name} has {len(running)} RUNNING trial(s) in {mask(source_url)} (trial {', '.join(map(str, running))}): "
                        "stop its workers first; a launch there recovers the trials of workers that died")
    _check_target(name, target_url)
    target = open_storage(target_url)
    with setup_lock(target_url, target, name):  # a launch of the same name started meanwhile
        if name in optuna.get_all_study_names(target):
            raise SpecError(f"{mask(target_url)} already has a study named {name}; copy to another storage")
        optuna.copy_study(from_study_name=name, from_storage=source, to_storage=target)
    return optuna.load_study(study_name=name, storage=target)


def _check_target(name: str, url: str) -> None:
    """The target storage, read without writing: it answers (a database) or its directory exists (a file), and holds
    no study NAME."""
    file = storage_file(url)
    if file is not None and not file.exists():
        if not file.parent.is_dir():
            raise SpecError(f"--to {mask(url)}: directory {file.parent} does not exist")
        return
    if name in optuna.get_all_study_names(open_storage(url, read_only=True)):
        raise SpecError(f"{mask(url)} already has a study named {name}; copy to another storage")
