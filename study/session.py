"""Create or join a study, and the one frozen `Settings` every part of a launch reads.

`launch` creates a study (or resumes it) from its flags and records the settings on it; `worker` joins
one and takes them from it. Either way the study's record is read and written here and nowhere else:
objective and cost, preset, sampler, pruner and the study's total of trials. `settle` says what a launch
or worker will run without writing anything (study.validate checks it); `open_session` then creates or
joins the study.
"""

from __future__ import annotations

import secrets
import uuid
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import optuna
import torch

from records import STUDY_UID
from study.specs import PRESETS, Plan, Spec, SpecError, load_spec, recorded_spec, resolve
from study.storage import default_storage_url, home_holds_tracking, make_home, mask, open_storage, opened, setup_lock, storage_file
from study.strategies import PRUNERS, SAMPLERS, strategy_class

# Costs a multi-objective study minimises beside validation accuracy: TrainResult fields.
COSTS = ("train_seconds", "train_flops")
# What a study records about itself (Optuna study user attributes).
RECORDED = ("preset", "objective", "sampler", "pruner", "trials")
SPEC_TEXT = "spec"  # the spec's TOML as launched, so that its name alone finds it again (spec_for)


@dataclass(frozen=True, kw_only=True)
class Request:
    """What the user asked for, checked: the flags of `launch`, `create` and `worker`, each a field of the flag's name
    (from_args reads them so), and whether the command joins a study. None: the study's record or the default."""

    name: str
    join: bool = False            # worker: the study must exist and says everything
    trials: int | None = None     # the study's total (launch and create)
    preset: str | None = None
    objective: str | None = None  # "accuracy" or "accuracy,cost"
    cost: str | None = None       # the cost of accuracy,cost (default: the first of COSTS)
    sampler: str | None = None
    pruner: str | None = None
    storage: str | None = None
    heartbeat: int = 10

    def __post_init__(self) -> None:
        """Check the flags, each once, before anything is read or written."""
        if self.trials is not None and self.trials < 1:
            raise ValueError(f"--trials must be >= 1; got {self.trials}")
        if self.heartbeat < 1:
            raise ValueError(f"--heartbeat must be >= 1 second; got {self.heartbeat}")
        if self.objective not in (None, "accuracy", "accuracy,cost"):
            raise ValueError(f"--objective {self.objective}: use accuracy or accuracy,cost")
        if self.cost is not None and self.objective != "accuracy,cost":
            raise ValueError(f"--cost {self.cost} needs --objective accuracy,cost")
        if self.cost is not None and self.cost not in COSTS:
            raise ValueError(f"--cost {self.cost}: use {' or '.join(COSTS)}")
        for flag, value, names in (("--sampler", self.sampler, SAMPLERS), ("--pruner", self.pruner, PRUNERS)):
            if value is not None and value not in names:
                raise ValueError(f"{flag} {value}: choose one of {', '.join(names)}")

    @classmethod
    def from_args(cls, args, join: bool = False) -> Request:
        """The request of a parsed command line: each field read from the flag of its name; one the command lacks keeps
        the field's default."""
        return cls(join=join, **{field.name: getattr(args, field.name) for field in fields(cls) if hasattr(args, field.name)})

    @property
    def wanted_objective(self) -> str | None:
        """"accuracy" or "accuracy,<cost>", as the study records it; None: the study's record, else accuracy."""
        if self.objective is None or self.objective == "accuracy":
            return self.objective
        return f"accuracy,{self.cost or COSTS[0]}"


@dataclass(frozen=True)
class Settings:
    """One launch's settings, as the study records them."""

    spec: Spec
    plan: Plan
    preset: str
    preset_reason: str
    objective: str             # "accuracy" or "accuracy,<cost>"
    sampler: dict              # name and arguments
    pruner: dict
    total: int

    @property
    def cost(self) -> str | None:
        """None: maximise validation accuracy; else also minimise this TrainResult field."""
        return self.objective.partition(",")[2] or None

    @property
    def record(self) -> dict:
        """What the study records of these settings: its user attributes RECORDED."""
        return {"preset": self.preset, "objective": self.objective, "sampler": self.sampler["name"], "pruner": self.pruner["name"], "trials": self.total}


@dataclass(frozen=True)
class Session:
    settings: Settings
    study: optuna.Study
    storage: optuna.storages.BaseStorage
    heartbeat: int = 10  # seconds between a running trial's heartbeats or lease renewals (study.recovery)


def choose_preset(requested: str | None, spec: Spec | None = None) -> tuple[str, str]:
    """The preset and a sentence saying why and, given the spec, what the preset changes in it."""
    if requested:
        preset, why = requested, "as requested"
    elif torch.cuda.is_available():
        preset, why = "full", f"CUDA device {torch.cuda.get_device_name(0)} found"
    else:
        preset, why = "cpu", "no CUDA device"
    if spec is not None:
        return preset, f"{why}; {_preset_changes(spec, preset, chosen=not requested)}"
    if preset == "cpu" and not requested:
        why += ", so the spec's CPU budget: data subsets and narrower ranges (use --preset full for the real study)"
    return preset, why


def _preset_changes(spec: Spec, preset: str, chosen: bool) -> str:
    """What the spec's [presets.PRESET] table sets, named; or that it sets nothing, so the spec runs as written."""
    table = spec.presets.get(preset)
    changes = [] if table is None else [f"{name}={value}" for name, value in table.fixed.items()] + [
        f"{name} {dist.describe()}" for name, dist in table.search.items()]
    if table is not None and table.conditional:
        changes.append(f"{' and '.join(sorted({name for ranges in table.conditional.values() for name in ranges}))} per architecture")
    if not changes:
        return f"{spec.path.name} has no [presets.{preset}] settings, so it runs as written"
    unless = " (--preset full runs the spec without them)" if chosen and preset == "cpu" else ""
    return f"{spec.path.name} [presets.{preset}] sets {', '.join(changes)}{unless}"


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, less its `study.stop()` once the grid is covered: that works only inside
    `study.optimize`, and here the study's total says when to stop."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


# [pruner] / [sampler] settings other than `name` are the arguments of the class study.strategies names.


def make_pruner(settings: dict, multi_objective: bool = False) -> optuna.pruners.BasePruner:
    settings = dict(settings)
    name = settings.pop("name", "median")
    if multi_objective or name == "none":
        return optuna.pruners.NopPruner()  # Optuna cannot prune multi-objective studies (trial.report is single-objective)
    return strategy_class(PRUNERS, name)(**settings)


def make_sampler(settings: dict, plan: Plan) -> optuna.samplers.BaseSampler:
    settings = dict(settings)
    name = settings.pop("name", "tpe")
    if name == "tpe":
        settings.setdefault("constant_liar", True)  # parallel trials do not all draw the same point
    # A seed of its own when the spec names none: Optuna seeds an unseeded sampler at its first draw, so a copy made
    # before it would draw otherwise; with one, a copy draws what the study will (study.budget.coming_configs).
    settings.setdefault("seed", secrets.randbits(32))
    if name == "grid":
        return GridSampler(plan.grid(), **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return strategy_class(SAMPLERS, name)(**settings)


def _strategy(spec_settings: dict, name: str | None, default: str) -> dict:
    """A sampler or pruner: the spec's arguments when the chosen name is the spec's, else the name alone."""
    name = name or spec_settings.get("name", default)
    return {**spec_settings, "name": name} if spec_settings.get("name", default) == name else {"name": name}


def check_preset_matches(study_name: str, recorded: str | None, preset: str) -> None:
    """A study keeps the preset it was created with; mixing cpu and full trials would corrupt its comparisons."""
    if recorded is not None and recorded not in PRESETS:
        raise SpecError(f"study {study_name} was created with preset {recorded!r}, which no longer exists (presets: {', '.join(PRESETS)}); "
                        "launch it under another name or --storage")
    if recorded is not None and recorded != preset:
        raise SpecError(f"study {study_name} was created with preset {recorded}; relaunch with --preset {recorded} or use another --storage")


def settle(request: Request, spec: Spec, recorded: dict | None = None) -> Settings:
    """What a launch or a worker will run, known before anything is written: a launch's settings come from its flags and
    the spec (a relaunch's record, which must agree with them, is read again when open_session opens the study; `create`
    passes it here, from read_record); a worker's from the study's record, read without writing."""
    if not request.join:
        return _settings(request, spec, recorded or {})
    _check_default_storage(request, spec)
    with opened(request.storage, heartbeat=request.heartbeat) as storage:
        return _settings(request, spec, _record(request, spec, storage))


def open_session(request: Request, spec: Spec) -> Session:
    """Create or resume the study (`launch`), or join it (`worker`); its settings recorded on it in one place."""
    _check_default_storage(request, spec)
    storage = open_storage(request.storage, request.heartbeat)
    # Before the study is written: the home holds a launch's report, and the MLflow store unless MLFLOW_TRACKING_URI names
    # one; a worker on a remote storage and tracking store writes nothing in it, nor creates it.
    if not request.join or home_holds_tracking():
        make_home()
    with setup_lock(request.storage, storage, spec.name):  # two first launches at once create one study with one identity
        return _create_or_load(request, spec, storage)


def read_record(request: Request, spec: Spec) -> dict | None:
    """The study's record, read without creating, locking or writing anything. None: no such study yet, or one whose
    record misses a setting, which a launch or create started at the same moment is writing now (open_session, whose
    setup_lock waits for it, then finds it whole)."""
    file = storage_file(request.storage or default_storage_url())
    if file is not None and not file.exists():
        return None
    with opened(request.storage, read_only=True) as storage:
        recorded = _record(request, spec, storage)
    return recorded if recorded is not None and all(key in recorded for key in RECORDED) else None


def spec_for(name: str, storage_url: str | None) -> Spec:
    """The spec a command that joins a study runs: a shipped study or a .toml path (load_spec), else the spec the
    study NAME recorded at its launch, so that a study launched from a file is found by its name too."""
    try:
        return load_spec(name)
    except SpecError:
        file = storage_file(storage_url or default_storage_url())
        if name.endswith(".toml") or (file is not None and not file.exists()):
            raise
        with opened(storage_url, read_only=True) as storage:
            if name not in optuna.get_all_study_names(storage):
                raise
            text = optuna.load_study(study_name=name, storage=storage).user_attrs.get(SPEC_TEXT)
        if text is None:
            raise SpecError(f"study {name} was launched from a spec file and recorded no copy of it; give the spec's path instead of its name") from None
        return recorded_spec(name, text)


def _check_default_storage(request: Request, spec: Spec) -> None:
    """A worker joins a launched study: the default journal must exist already."""
    if request.join and request.storage is None and not Path(default_storage_url()).exists():
        raise SpecError(f"no study named {spec.name!r}: {default_storage_url()} does not exist yet; run `python -m study launch {request.name}` first")


def _record(request: Request, spec: Spec, storage: optuna.storages.BaseStorage) -> dict | None:
    """The study's record (its user attributes); None when there is no such study yet, which only a launch may create."""
    if spec.name not in optuna.get_all_study_names(storage):
        if request.join:
            raise SpecError(f"no study named {spec.name!r} in {mask(request.storage or default_storage_url())}; run `python -m study launch {request.name}` first")
        return None
    recorded = dict(optuna.load_study(study_name=spec.name, storage=storage).user_attrs)
    if request.join and "trials" not in recorded:
        raise SpecError(f"study {spec.name} does not record its total; launch it again with `python -m study launch {request.name} --trials N`")
    return recorded


def _settings(request: Request, spec: Spec, recorded: dict) -> Settings:
    """The settings from the flags, else the study's record (empty for a new study), else the spec and the defaults."""
    if request.join:
        preset, reason = recorded["preset"], "the study's"
        check_preset_matches(spec.name, preset, preset)
    else:
        preset, reason = choose_preset(request.preset, spec)
        check_preset_matches(spec.name, recorded.get("preset"), preset)
    objective = request.wanted_objective or recorded.get("objective") or "accuracy"
    if recorded.get("objective", objective) != objective:
        raise SpecError(f"study {spec.name} optimises {recorded['objective']}; it cannot change to {objective} (use another --storage or study name)")
    return Settings(spec=spec, plan=resolve(spec, preset), preset=preset, preset_reason=reason, objective=objective,
                    sampler=_strategy(spec.sampler, request.sampler or recorded.get("sampler"), "tpe"),
                    pruner=_strategy(spec.pruner, request.pruner or recorded.get("pruner"), "median"),
                    total=recorded["trials"] if request.join else request.trials)


def _create_or_load(request: Request, spec: Spec, storage: optuna.storages.BaseStorage) -> Session:
    recorded = _record(request, spec, storage)
    exists = recorded is not None
    settings = _settings(request, spec, recorded or {})
    sampler = make_sampler(settings.sampler, settings.plan)
    pruner = make_pruner(settings.pruner, multi_objective=settings.cost is not None)
    directions = ["maximize", "minimize"] if settings.cost else ["maximize"]
    study = optuna.create_study(study_name=spec.name, storage=storage, directions=directions, load_if_exists=True, sampler=sampler, pruner=pruner)
    if not request.join:
        for key, value in settings.record.items():
            study.set_user_attr(key, value)
        if study.user_attrs.get(SPEC_TEXT) != spec.text:
            study.set_user_attr(SPEC_TEXT, spec.text)
        # Optuna's plots and optuna-dashboard name the objectives after these, instead of "Objective 0".
        metric_names = ["val_accuracy", settings.cost] if settings.cost else ["val_accuracy"]
        if study.metric_names != metric_names:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(metric_names)
        if not exists:
            study.set_user_attr(STUDY_UID, uuid.uuid4().hex)  # its identity in MLflow (records); older studies have none
    return Session(settings=settings, study=study, storage=storage, heartbeat=request.heartbeat)
