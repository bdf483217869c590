"""One check of everything a launch can run, before the study, a trial or an MLflow run exists.

`launch` and `worker` call `validate_launch` with the settings they will run (study.session.settle) and the
devices of their trial slots; `confirm` and `finalize` call `validate_trials` with the trials whose
configurations they will train again. A failure is a SpecError: one line naming the spec or trial and the setting, never an exception
from inside Optuna or torch. What is checked:

- every TrainConfig at the edges of the plan (study.specs.edge_configs): fixed values, each choice, both ends
  of each range, every first trial (whose rows were checked against the spec's search space when it was read);
- this machine: the device of every trial slot and CUDA for the settings that need it
  (objectives.train.check_machine), and the memory estimate of each architecture's largest trial against all
  the memory of its device (the trainer checks the free memory again when the trial starts);
- the sampler and the pruner built with their arguments and driven through a few trials of an in-memory study:
  several of Optuna's arguments fail only there (TPESampler(n_startup_trials="x") constructs, then fails at
  the first trial); a sampler that models the space jointly is refused when it would sample a parameter
  independently, outside its model (Optuna's GP sampler, for a range that changes with the architecture).
"""

from __future__ import annotations

import dataclasses
import warnings

import optuna

import records
from objectives.train import TrainConfig, check_machine, memory_shortfall, resolve_device, total_memory_bytes
from study.costprune import CostBucketPruner
from study.session import Settings, make_pruner, make_sampler
from study.specs import Choices, Plan, SpecError, edge_configs

DRY_RUN_TRIALS = 3  # sampled trials after the first ones: enough to reach the sampler's and the pruner's own code
# The settings that size a training step, and which end of their range is the larger step.
LARGEST = {"resize": max, "batch_size": max, "ratio": min}


def validate_launch(settings: Settings, devices: list[str] | None) -> None:
    """Everything the launch or worker of `settings` can run, checked before it writes anything.

    `devices`: its trial slots' devices (study.pool.devices; "auto" keeps the config's own device), or None when
    the slots are elsewhere (Ray's nodes), so that this machine's devices and memory say nothing about them.
    """
    plan = settings.plan
    _check_devices([(plan.where, config) for config in edge_configs(plan)], devices)
    _check_memory([(plan.where, config) for config in largest_configs(plan)], devices)
    _dry_run(settings)


def validate_trials(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> None:
    """The configurations of `trials` of `study`, which `confirm` or `finalize` will train again in this process, on
    this machine: their devices, CUDA settings and memory. (A trial recorded without one cannot be trained again,
    which those commands say themselves.)"""
    labelled = [(f"study {study.study_name}, trial {trial.number}", config) for trial in trials if (config := records.train_config(trial)) is not None]
    _check_devices(labelled, ["auto"])
    _check_memory(labelled, ["auto"])


def largest_configs(plan: Plan, smallest: bool = False) -> list[TrainConfig]:
    """Per architecture, the trial with the largest training step the plan can draw: the largest input and batch,
    the smallest channel divisor (`smallest`: the other ends). A training step's memory and time grow with each of
    these, whatever the others are."""
    configs = []
    for arch in plan.archs():
        params = {"arch": arch} if isinstance(plan.search.get("arch"), Choices) else {}
        for name, pick in LARGEST.items():
            dist = plan.space(arch).get(name)
            if dist is not None:
                params[name] = (min if pick is max else max)(dist.edges()) if smallest else pick(dist.edges())
        configs.append(plan.config(params))
    return configs


def _as_run(config: TrainConfig, devices: list[str]) -> list[TrainConfig]:
    """The config as each trial slot trains it: a slot on a GPU puts it there (study.launch.TrialRunner), "auto" keeps its device."""
    return [config if device == "auto" else dataclasses.replace(config, device=device) for device in dict.fromkeys(devices)]


def _distinct_runs(labelled: list[tuple[str, TrainConfig]], devices: list[str], key):
    """(where, config as its slot trains it) once per distinct `key(config)`: each check runs once per case it can tell apart."""
    seen = set()
    for where, config in labelled:
        for run in _as_run(config, devices):
            if (case := key(run)) not in seen:
                seen.add(case)
                yield where, run


def _check_devices(labelled: list[tuple[str, TrainConfig]], devices: list[str] | None) -> None:
    if devices is None:
        return
    for where, run in _distinct_runs(labelled, devices, lambda run: (run.device, run.cuda_graph, run.precision)):
        try:
            check_machine(run)
        except ValueError as error:
            raise SpecError(f"{where}: {error}") from None


def _check_memory(labelled: list[tuple[str, TrainConfig]], devices: list[str] | None) -> None:
    if devices is None:
        return
    size = lambda run: (run.arch, run.resize, run.ratio, run.batch_size, str(resolve_device(run.device)))
    for where, run in _distinct_runs(labelled, devices, size):
        shortfall = memory_shortfall(run, total_memory_bytes(resolve_device(run.device)), "in all")
        if shortfall is not None:
            raise SpecError(f"{where}: {shortfall}; narrow the range, or lower batch_size")


def _dry_run(settings: Settings) -> None:
    """The sampler, then the pruner, as the launch builds them, driven through the first trials and a few more on an
    in-memory study: asked, drawn from the plan, reported for two epochs and told. Each is built inside the check,
    since building may fail too."""
    plan, multi_objective = settings.plan, settings.cost is not None
    directions = ["maximize", "minimize"] if multi_objective else ["maximize"]
    strategies = (("[sampler]", settings.sampler, lambda: (make_sampler(settings.sampler, plan), optuna.pruners.NopPruner())),
                  ("[pruner]", settings.pruner, lambda: (optuna.samplers.RandomSampler(seed=0), _pruner(settings.pruner, multi_objective))))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "trial finished" lines for trials that never ran
    try:
        for table, arguments, build in strategies:
            shown = ", ".join(f"{key} = {value!r}" for key, value in arguments.items())
            try:
                with warnings.catch_warnings():
                    # Optuna's experimental-feature notes only: any other warning is the user's to see.
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    sampler, pruner = build()
                    study = optuna.create_study(directions=directions, sampler=sampler, pruner=pruner)
                    _ask_and_tell(study, plan)
                ignored = _sampled_outside_the_model(study, sampler)
            except SpecError:
                raise  # already one line naming the spec (the grid sampler's)
            except Exception as error:  # noqa: BLE001 -- a bad argument fails in Optuna's own code, as any exception type
                message = (str(error).strip().splitlines() or [""])[0]
                raise SpecError(f"{plan.spec.path}: {table} {shown}: these arguments fail in Optuna ({type(error).__name__}: {message})") from None
            if ignored:
                raise SpecError(f"{plan.spec.path}: {table} {shown}: {type(sampler).__name__} would sample {', '.join(ignored)} at random, "
                                "outside its model, as the search space changes with the architecture; use tpe or random, "
                                "or the same ranges for every architecture")
    finally:
        optuna.logging.set_verbosity(verbosity)


def _pruner(settings: dict, multi_objective: bool) -> optuna.pruners.BasePruner:
    """The pruner as the launch builds it; a multi-objective study prunes with study.costprune, built here for its arguments."""
    if multi_objective:
        CostBucketPruner.from_settings(settings)
    return make_pruner(settings, multi_objective=multi_objective)


def _sampled_outside_the_model(study: optuna.Study, sampler: optuna.samplers.BaseSampler) -> list[str]:
    """The parameters of the dry run's trials that a sampler modelling the space jointly (GP) would hand to another
    sampler (GP: random), because their range is not the same in every trial. Optuna says so only in a log line once
    its startup trials are done, far into a study. A sampler that draws every parameter independently has no joint
    space and ignores nothing; TPE (multivariate by default since Optuna 5) draws such a parameter with its own
    univariate model, so nothing is left out of a model either."""
    joint = sampler.infer_relative_search_space(study, study.trials[-1])
    if not joint or isinstance(sampler, optuna.samplers.TPESampler):
        return []
    return sorted({name for trial in study.trials for name, dist in trial.distributions.items()
                   if not dist.single() and joint.get(name) != dist})


def _ask_and_tell(study: optuna.Study, plan: Plan) -> None:
    # The first trials, then one per architecture, so that every architecture's ranges are drawn at least once.
    rows = [*plan.enqueue, *({"arch": arch} for arch in plan.archs() if isinstance(plan.search.get("arch"), Choices))]
    for row in rows:
        study.enqueue_trial(row)
    for number in range(len(rows) + DRY_RUN_TRIALS):
        trial = study.ask()
        plan.suggest(trial)
        accuracy = 0.5 + 0.01 * number
        if len(study.directions) > 1:
            study.tell(trial, [accuracy, 1.0 + number])
            continue
        for epoch in (1, 2):
            trial.report(accuracy, epoch)
            trial.should_prune()
        study.tell(trial, accuracy)
