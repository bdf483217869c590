"""`python -m study COMMAND`: launch, create, worker, confirm, finalize, list, show, export, report, copy, inspect, ui, serve-storage.

Each command is one function taking the parsed arguments and returning an exit code.
User mistakes become one line on stderr and exit 1; `--debug` shows the traceback.
Heavy imports (torch, optuna, mlflow) happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from study.strategies import PRUNERS, SAMPLERS  # names only: imports no Optuna


def _open_study(name: str, storage_url: str | None):
    """An existing study, named as launch named it (NAME, or the path of its .toml spec), or a SpecError that says
    how to create it. Opens the storage read-only: creates, locks, repairs and writes nothing."""
    import optuna

    from study.specs import SpecError, study_name
    from study.storage import default_storage_url, mask, open_storage, storage_file

    study = study_name(name)
    file = storage_file(storage_url or default_storage_url())
    if file is not None and not file.exists():
        raise SpecError(f"no study named {study!r}: {file} does not exist yet; run `python -m study launch {name}` first")
    storage = open_storage(storage_url, read_only=True)
    if study not in optuna.get_all_study_names(storage):
        raise SpecError(f"no study named {study!r} in {mask(storage_url or default_storage_url())}; run `python -m study launch {name}` first")
    return optuna.load_study(study_name=study, storage=storage)


def _report_output(output: str | None, default: Path, storage_url: str | None) -> Path:
    """The report path, checked before any work so a typo does not surface after a long study, and never a file the
    study uses (study.names.check_output)."""
    from study.names import check_output

    path = Path(output) if output else default
    if path.suffix != ".html":
        raise ValueError(f"-o {path}: the report is an HTML file; give a name ending in .html")
    check_output("-o", path, storage_url)
    if output and not path.parent.is_dir():
        raise ValueError(f"-o {path}: directory {path.parent} does not exist")
    if path.parent.is_dir():
        try:
            tempfile.TemporaryFile(dir=path.parent).close()  # the one sure test, also for root and read-only mounts
        except OSError as error:
            raise ValueError(f"-o {path}: cannot write in {path.parent} ({error.strerror}); choose another directory") from None
    return path


def _console():
    """Rich console; off a terminal (logs, make), wide and without hard wraps so lines stay greppable, unless $COLUMNS says a width.
    On a terminal rich wraps long lines between words: with soft wrap the terminal would break them mid-word."""
    from rich.console import Console

    console = Console()
    console.soft_wrap = not console.is_terminal
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = 160
    return console


def cmd_launch(args) -> int:
    return _run_study(args, join=False)


def cmd_worker(args) -> int:
    return _run_study(args, join=True)


def _run_study(args, join: bool) -> int:
    """`launch` (create or resume a study) and `worker` (join one that exists): the same session and trial loop."""
    from study.interrupts import Interrupts
    from study.pool import devices
    from study.session import Request, settle, spec_for
    from study.storage import home
    from study.validate import validate_launch

    # Every flag checked once, before anything is read or written.
    request = Request.from_args(args, join)
    if args.budget is not None:
        from study.budget import Budget

        args.budget = Budget.parse(args.budget)
    if args.register is not None and (args.log_model == "none" or not args.register.strip()):
        raise ValueError(f"--register {args.register!r}: give a model name, and keep --log-model best or all so there is a model to register")
    if args.register is not None:
        from study.names import check_model_name

        check_model_name("--register", args.register)
    on_ray = bool(getattr(args, "ray", None))
    _check_checkpoint_dir(args, join, on_ray)
    slots = [] if on_ray else devices(args.workers, args.gpus, args.trials_per_gpu)
    # A spec file or a shipped study, else the spec the study recorded: a study copied to this storage runs by its name.
    spec = spec_for(args.name, args.storage)
    # Everything the launch can run, before the study, a trial or an MLflow run exists (and before a Ray cluster is
    # joined); on Ray the cluster's nodes, not this machine, train the trials.
    validate_launch(settle(request, spec), None if on_ray else slots)
    ray_slots = _ray_slots(args) if on_ray else None
    from study.launch import report_path

    output = None if join else _report_output(args.output, report_path(home(), [spec.name]), args.storage)
    with Interrupts(anywhere=True).installed():
        return _launch(args, request, spec, slots, ray_slots, output)


def _check_checkpoint_dir(args, join: bool, on_ray: bool) -> None:
    """Refuse a set-up whose interrupted trials would be retried where their checkpoints are not: trials on Ray's nodes, or
    a worker on a storage other machines share, with the checkpoints in this machine's study home. One machine (a launch,
    its --workers) is fine: every retry runs here."""
    from study.storage import home, mask, shared_by_machines

    if args.checkpoint_dir is not None:
        return
    if on_ray:
        where = f"--ray {args.ray}: trials run on the cluster's nodes"
    elif join and shared_by_machines(args.storage):
        where = f"worker on {mask(args.storage)}: another machine's worker may take an interrupted trial's retry"
    else:
        return
    raise ValueError(f"{where}, which cannot read the checkpoints in this machine's {home() / 'checkpoints'}; give --checkpoint-dir "
                     "a folder every machine reaches (a shared file system)")


def _ray_slots(args):
    """--ray ADDRESS: the trial slots as actors on that Ray cluster, which places them; checked and connected up front."""
    if args.gpus is not None:
        raise ValueError(f"--gpus {args.gpus} picks GPUs of this machine; with --ray, Ray places the trials (use --trials-per-gpu and --workers)")
    try:
        import ray  # noqa: F401 -- before the slower imports of study.ray_slots
    except ImportError:
        raise ValueError(f"--ray {args.ray}: Ray is not installed; install it with pip install '.[ray]'") from None
    from study.ray_slots import connect, ray_slots

    connect(args.ray)
    return ray_slots(args.workers, args.trials_per_gpu)


def _ready_to_train(data_dir: str | None, mlflow_wait: float | None = None) -> str:
    """What a command that trains checks before it writes anything, each a one-line error: the data files are whole
    and the tracking store answers (a silent server, one that answers /health but not its API, a half-made store).
    Returns the tracking URI."""
    from objectives.data import verify

    verify(data_dir)
    return _tracking_ready(mlflow_wait)


def _tracking_ready(mlflow_wait: float | None = None) -> str:
    """The tracking URI, once its store answers (a silent server, one that answers /health but not its API, a half-made
    store: each a one-line error); what every command that writes a study checks before it writes."""
    import optuna

    from study.storage import home
    from study.tracking import check_reachable, tracking_uri

    uri = tracking_uri(home())
    check_reachable(uri, mlflow_wait)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return uri


def _open_with_parent(request, spec, uri: str):
    """Create, resume or join the study, and open its MLflow parent run: what launch, worker and create share.
    Returns the session and its Tracker."""
    from records import STUDY_UID
    from study.launch import pruner_name
    from study.session import open_session
    from study.storage import default_storage_url, home, mask, setup_lock
    from study.tracking import Tracker

    session = open_session(request, spec)
    study = session.study
    with setup_lock(request.storage, session.storage, spec.name):  # two first launches at once open one parent run
        tracker = Tracker(spec.name, uri, artifact_root=home() / "mlartifacts", study_uid=study.user_attrs.get(STUDY_UID))
        if not request.join:
            tracker.describe_study(spec.text, session.settings.preset, mask(request.storage or default_storage_url()),
                                   type(study.sampler).__name__, pruner_name(session))
    return session, tracker


# What one `worker` process holds of a PostgreSQL server's connections, whatever its --workers: one, shared by its
# queries, heartbeats and the claim's advisory lock (study.storage.open_storage; tests/test_scale.py counts them).
WORKER_CONNECTIONS = 1


def _connections_note(storage) -> str | None:
    """A `worker` directly on PostgreSQL: the server's connections in use against its max_connections, and how many more
    such workers fit, so that whoever starts many of them knows before they are refused. None on any other storage."""
    import sqlalchemy

    from study.storage import on_postgresql

    if not on_postgresql(storage):
        return None
    with storage.engine.connect() as connection:
        limit, used = connection.execute(sqlalchemy.text(
            "SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int, "
            "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')")).one()
    return (f"PostgreSQL: {used} of its {limit} connections in use; a worker holds {WORKER_CONNECTIONS}, so "
            f"{max(0, (limit - used) // WORKER_CONNECTIONS)} more workers fit; for more, serve the storage to them with "
            "`python -m study serve-storage` (docs/several-machines.md)")


DEFAULT_TRIALS = 50  # a new study's total when launch or create is not given --trials


def cmd_create(args) -> int:
    """Create the study and its MLflow parent run, validated as launch validates, and train nothing: workers on other
    machines then join it. Again with the same settings: says so and writes nothing."""
    import dataclasses

    from records import count
    from study.session import Request, read_record, settle
    from study.specs import load_spec
    from study.storage import default_storage_url, mask
    from study.validate import validate_launch

    request = Request.from_args(args)
    spec = load_spec(args.name)
    recorded = read_record(request, spec)
    # Flags not given keep the study's record, so that the same create run again is the same study.
    kept = recorded or {}
    request = dataclasses.replace(request, trials=request.trials or kept.get("trials") or DEFAULT_TRIALS, preset=request.preset or kept.get("preset"))
    settings = settle(request, spec, recorded)  # a preset or objective other than the record's: launch's error
    # The trials train on the workers' machines, which check their own devices when they join.
    validate_launch(settings, None)
    storage_label = mask(args.storage or default_storage_url())
    if recorded is not None:
        wanted = settings.record
        differing = [key for key in wanted if recorded.get(key) != wanted[key]]
        if differing:
            raise ValueError(f"study {spec.name} exists in {storage_label} with " + ", ".join(f"{key} {recorded.get(key)}" for key in differing)
                             + f", not {', '.join(str(wanted[key]) for key in differing)}; `python -m study launch` changes a study's total, sampler and pruner")
        print(f"study {spec.name} exists in {storage_label} ({count(settings.total, 'trial')}, preset {settings.preset}); nothing changed")
        return 0
    uri = _tracking_ready(args.mlflow_wait)
    _, tracker = _open_with_parent(request, spec, uri)
    print(f"created study {spec.name} in {storage_label}: {count(settings.total, 'trial')}, preset {settings.preset}, objective {settings.objective}; "
          f"MLflow parent run {tracker.parent_run_id} in {mask(uri)}")
    print(f"workers join it with: python -m study worker {args.name} --storage {storage_label}")
    return 0


def _launch(args, request, spec, slots: list[str], ray_slots, output: Path | None) -> int:
    from rich.markup import escape

    from records import count, count_done
    from study.launch import run_launch
    from study.pool import cap_workers
    from study.storage import default_storage_url, mask
    from study.tracking import PICKLE_NOTE

    uri = _ready_to_train(args.data_dir, args.mlflow_wait)
    session, tracker = _open_with_parent(request, spec, uri)
    settings, study = session.settings, session.study
    console = _console()
    console.print(f"preset [bold]{settings.preset}[/bold]: {escape(settings.preset_reason)}")  # it names [presets.*] tables
    storage_label = mask(args.storage or default_storage_url())
    if settings.cost:
        pruning = "no pruning" if settings.pruner["name"] == "none" else "pruned on val_accuracy against trials of similar cost (study/costprune.py)"
        console.print(f"objectives: maximise val_accuracy, minimise {settings.cost} ({pruning})")
    if request.join and (note := _connections_note(session.storage)):
        console.print(note, markup=False)
    if tracker.other_studies:
        console.print(f"MLflow experiment {spec.name} also holds {tracker.other_studies} other studies named {spec.name} (another storage, or a "
                      f"journal that was replaced); this study's trials go under a parent run of their own, {tracker.parent_run_id}")
    if args.log_model != "none":
        console.print(PICKLE_NOTE)
    to_run = settings.total - count_done(study.get_trials(deepcopy=False))
    if ray_slots:
        if args.workers is None:
            at_once = "as many as the cluster holds" + (f", at most {to_run}" if to_run > 0 else "")
        elif args.workers > to_run > 0:
            at_once = f"{to_run} (not {args.workers}: {count(to_run, 'trial')} still to run)"
        else:
            at_once = str(args.workers)
        console.print(f"Ray cluster {args.ray}: trials run as Ray actors, {at_once} at once")
    else:
        asked = len(slots)
        slots, why = cap_workers(slots, to_run)
        if asked > 1:
            shown = f"{count(len(slots), 'worker')}: {', '.join('cpu' if d == 'auto' else d for d in slots)}"
            console.print(f"{shown} (not {asked}: {why})" if why else shown)
    try:
        run_launch(session, tracker, console, slots, args.timeout, args.data_dir, args.log_model, budget=args.budget, make_slots=ray_slots,
                   checkpoint_dir=args.checkpoint_dir)
    except KeyboardInterrupt:
        if not request.join:
            tracker.close_parent_on_exit("KILLED")
        console.print("interrupted: the running trials are recorded as interrupted and will run again; launch the same command to resume")
        return 130
    except Exception:
        if not request.join:
            # Also when an MLflow write failed: MLflow may still answer (a full artifact store); if not, the next launch closes it.
            tracker.close_parent_on_exit("FAILED")  # the failing trial is already recorded FAIL with its reason
        raise
    done = count_done(study.get_trials(deepcopy=False))
    if not request.join or done >= settings.total:
        tracker.close_parent("FINISHED" if done >= settings.total else "KILLED")
    if args.register:
        _register_best(tracker, study, args.register, console)
    console.print(f"optuna storage: {storage_label}")
    console.print(f"mlflow store:   {mask(uri)}  (browse with `python -m study ui`)")
    if not request.join:
        _write_study_report(console, study, output, uri)
    _print_chance(console, study.get_trials(deepcopy=False), settings.preset)
    return 0


def _default_report(study_name: str, storage_url: str | None) -> Path:
    """The study's report at its default path (as `launch` writes it), checked before any work."""
    from study.launch import report_path
    from study.storage import home

    return _report_output(None, report_path(home(), [study_name]), storage_url)


def _write_study_report(console, study, output: Path, uri: str) -> None:
    """The study's report, rewritten whole after a command that changed it (launch, confirm, finalize)."""
    from dashboards import write_report
    from study.tracking import ui_url

    console.print(f"report:         {write_report([study], output, uri, ui_url(uri))}")


def _print_chance(console, trials, preset: str | None) -> None:
    """The study's (or an architecture's) no-better-than-chance line, if any, wrapped to the terminal: it is prose."""
    from records import chance_warnings

    for line in chance_warnings(trials, preset=preset):
        console.print(line, style="bold yellow", markup=False, soft_wrap=False)


def _register_best(tracker, study, name: str, console) -> None:
    """--register NAME: the study's best trial's logged model as a version of registered model NAME."""
    from optuna.trial import TrialState

    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        console.print(f"--register {name}: no completed trial, so no model to register")
        return
    best = max(study.best_trials, key=lambda t: t.values[0])  # the most accurate, also on a Pareto front
    version = tracker.register_model(name, best)
    if version is None:
        console.print(f"--register {name}: best trial {best.number} has no logged model (it ran with --log-model none)")
        return
    console.print(f"registered model: {name} version {version.version} (trial {best.number}, {version.source}); load it with "
                  f"mlflow.pytorch.load_model('models:/{name}/{version.version}')")


def _session_of(args):
    """The launched study args.name (a shipped study or a .toml spec, as for launch), joined as a worker would."""
    from study.session import Request, open_session, spec_for

    request = Request.from_args(args, join=True)
    return open_session(request, spec_for(request.name, request.storage))


def cmd_confirm(args) -> int:
    from dashboards.confirmed import search_ranking
    from study.confirm import run_confirm
    from study.interrupts import Interrupts
    from study.storage import home, make_home
    from study.validate import validate_trials
    from study.views import print_confirmed

    study = _open_study(args.name, args.storage)
    validate_trials(study, search_ranking(study)[:args.top])  # the configurations run_confirm trains again, before it writes
    output = _default_report(study.study_name, args.storage)
    with Interrupts().installed() as interrupts:  # Ctrl-C and SIGTERM stop it only where nothing is half-written
        uri = _ready_to_train(args.data_dir)
        session = _session_of(args)
        make_home()
        console = _console()
        try:
            rows = run_confirm(session, uri, home() / "mlartifacts", console, args.top, args.seeds, args.data_dir, interrupts)
        except KeyboardInterrupt:
            console.print("interrupted: a training that was running is recorded as interrupted and queued again; confirm again to finish")
            return 130
    print_confirmed(console, rows)
    _write_study_report(console, study, output, uri)
    return 0


def cmd_finalize(args) -> int:
    from study.finalize import choose, run_finalize
    from study.interrupts import Interrupts
    from study.storage import home, make_home
    from study.validate import validate_trials

    if args.register is not None and not args.register.strip():
        raise ValueError("--register: give a model name")
    from study.names import check_model_name
    from study.specs import study_name

    # Before anything is written; the default is the study's name with -final, which MLflow may not take as a model's.
    check_model_name("--register" if args.register else "--register (default: <study>-final)",
                     args.register or f"{study_name(args.name)}-final")
    with Interrupts().installed() as interrupts:  # Ctrl-C and SIGTERM stop it only where nothing is half-written
        uri = _ready_to_train(args.data_dir)
        study = _open_study(args.name, args.storage)
        validate_trials(study, [choose(study, args.trial)[0]])  # the configuration run_finalize trains, before it writes
        output = _default_report(study.study_name, args.storage)
        make_home()
        console = _console()
        try:
            final = run_finalize(study, uri, home() / "mlartifacts", console, args.trial, args.register or f"{study.study_name}-final",
                                 args.storage, args.data_dir, interrupts)
        except KeyboardInterrupt:
            console.print("interrupted: the final run is closed KILLED unless it had finished; finalize again to finish")
            return 130
    console.print(f"final model: trial {final.trial}'s configuration ({final.chosen_by}), trained on {final.n_train:,} images; "
                  f"test_accuracy {final.test_accuracy:.4f}")
    console.print(f"mlflow run {final.run_id}; model {final.model_uri}; registered {final.registered}")
    _write_study_report(console, study, output, uri)
    return 0


def cmd_list(args) -> int:
    from study.session import choose_preset
    from study.specs import available, load_spec, resolve

    # The ranges a launch on this machine samples from: the preset it would pick, or the one asked for.
    preset, reason = choose_preset(args.preset)
    print(f"search spaces of preset {preset}: {reason}")
    for name in available():
        print(f"{name:22} {resolve(load_spec(name), preset).summary()}")
    return 0


def cmd_show(args) -> int:
    import optuna
    from optuna.trial import TrialState

    from records import count

    study = _open_study(args.name, args.storage)
    trials = study.get_trials(deepcopy=False)
    counts = ", ".join(f"{sum(t.state == s for t in trials)} {s.name}" for s in TrialState if any(t.state == s for t in trials))
    console = _console()
    console.print(f"study {study.study_name} (preset {study.user_attrs.get('preset', '?')}): {count(len(trials), 'trial')}, {counts}")
    _print_chance(console, trials, study.user_attrs.get("preset"))
    from dashboards.confirmed import confirmed, load_companion
    from study.views import print_confirmed, print_costs, table

    print_confirmed(console, confirmed(study, load_companion(study)))
    print_costs(console, study, args.top)
    if len(study.directions) > 1:
        return _show_pareto(study, console)
    # A study plain Optuna wrote may minimise its own value: best first whatever the direction.
    maximise = study.direction == optuna.study.StudyDirection.MAXIMIZE
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value, reverse=maximise)
    if not done:
        console.print("no completed trials yet")
        return 0
    param_names = sorted({name for t in done for name in t.params})
    rows = []
    for t in done[:args.top]:
        params = [f"{t.params[n]:.4g}" if isinstance(t.params.get(n), float) else str(t.params.get(n, "")) for n in param_names]
        rows.append([str(t.number), *params, f"{t.value:.4f}", f"{t.user_attrs.get('test_accuracy', float('nan')):.4f}",
                     str(t.user_attrs.get("epochs_run", "")), f"{t.user_attrs.get('train_seconds', float('nan')):.1f}"])
    ours = "preset" in study.user_attrs  # launched here: the value is the validation accuracy
    console.print(table(console, f"best {count(min(args.top, len(done)), 'trial')} by {'validation accuracy' if ours else 'value'}",
                        ["trial", *param_names, "val_accuracy" if ours else "value", "test_accuracy", "epochs_run", "train_seconds"], rows))
    return 0


def _show_pareto(study, console) -> int:
    """A multi-objective study: its Pareto front (Optuna's best_trials), cheapest first."""
    from records import count
    from study.views import table


    cost = study.user_attrs.get("objective", "accuracy,cost").split(",")[1]
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    if not front:
        console.print("no completed trials yet")
        return 0
    param_names = sorted({name for t in front for name in t.params})
    rows = []
    for t in front:
        params = [f"{t.params[n]:.4g}" if isinstance(t.params.get(n), float) else str(t.params.get(n, "")) for n in param_names]
        rows.append([str(t.number), *params, f"{t.values[0]:.4f}", f"{t.values[1]:.4g}", f"{t.user_attrs.get('test_accuracy', float('nan')):.4f}"])
    console.print(table(console, f"Pareto front: {count(len(front), 'trial')}, none beaten on both val_accuracy (max) and {cost} (min)",
                         ["trial", *param_names, "val_accuracy", cost, "test_accuracy"], rows))
    return 0


def cmd_export(args) -> int:
    from records import count
    from study.export import trials_table, write_table
    from study.names import check_output
    from study.storage import home
    from study.tracking import read_only_uri

    path = Path(args.output)
    if path.suffix not in (".csv", ".parquet"):
        raise ValueError(f"-o {path}: give a name ending in .csv or .parquet")
    check_output("-o", path, args.storage)
    if not path.parent.is_dir():
        raise ValueError(f"-o {path}: directory {path.parent} does not exist")
    if path.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401 -- pandas writes Parquet through it
        except ImportError:
            raise ValueError(f"-o {path}: writing Parquet needs pyarrow (pip install pyarrow), or export to .csv") from None
    study = _open_study(args.name, args.storage)
    frame = trials_table(study, read_only_uri(home()))
    write_table(frame, path)
    print(f"{path}: {count(len(frame), 'trial')}, {count(len(frame.columns), 'column')}")
    return 0


def cmd_copy(args) -> int:
    from study.copy import copy_study
    from study.storage import mask

    study = copy_study(args.name, args.source, args.target)
    print(f"copied study {study.study_name} from {mask(args.source)} to {mask(args.target)}: {len(study.get_trials(deepcopy=False))} trials, "
          "their MLflow runs where they were logged")
    print(f"continue it there with: python -m study launch {study.study_name} --storage {mask(args.target)} "
          f"(--trials N raises its total), or python -m study worker {study.study_name} --storage {mask(args.target)}")
    return 0


def cmd_inspect(args) -> int:
    import dataclasses

    import pandas as pd
    from rich.table import Table

    from objectives.inspect import layer_costs
    from objectives.models import get_architecture

    resize = args.resize or get_architecture(args.arch).default_resize
    rows = layer_costs(args.arch, resize, args.ratio)
    frame = pd.DataFrame([dataclasses.asdict(row) for row in rows])
    frame["output_shape"] = frame["output_shape"].map(lambda shape: "x".join(map(str, shape)))
    if args.format == "csv":
        print(frame.to_csv(index=False), end="")
        return 0
    if args.format == "json":
        print(frame.to_json(orient="records"))
        return 0
    console = _console()
    table = Table(title=f"{args.arch} at {resize} px, ratio {args.ratio}: forward cost of one example (activations fp32, batch 1)")
    for column in ("#", "layer", "output shape", "params", "FLOPs", "activation bytes"):
        table.add_column(column, justify="left" if column in ("layer", "output shape") else "right")
    for row in frame.itertuples():
        table.add_row(str(row.index), row.layer, row.output_shape, f"{row.params:,}", f"{row.flops:,}", f"{row.activation_bytes:,}")
    table.add_row("", "total", "", f"{frame.params.sum():,}", f"{frame.flops.sum():,}", f"{frame.activation_bytes.sum():,}", style="bold")
    console.print(table)
    for column, heading, unit in (("flops", "most compute", "FLOPs"), ("activation_bytes", "most activation memory", "bytes"),
                                  ("params", "most parameters", "parameters")):
        top = frame.loc[frame[column].idxmax()]
        console.print(f"{heading}: #{top['index']} {top.layer} ({top[column] / frame[column].sum():.0%} of the {unit})")
    return 0


def cmd_report(args) -> int:
    from dashboards import write_report
    from study.launch import report_path
    from study.specs import study_name
    from study.storage import home
    from study.tracking import read_only_uri, tracking_uri, ui_url

    output = _report_output(args.output, report_path(home(), [study_name(name) for name in args.names]), args.storage)
    png_dir = Path(args.png) if args.png else None
    if png_dir is not None:
        from dashboards.report import find_browser
        from study.names import check_output

        check_output("--png", png_dir, args.storage)

        if png_dir.exists() and not png_dir.is_dir():
            raise ValueError(f"--png {png_dir}: not a directory")
        find_browser()  # before any work: PNGs need Chromium
    studies = [_open_study(name, args.storage) for name in args.names]
    uri = read_only_uri(home())  # None: no MLflow store yet, so a report of the Optuna side alone
    print(write_report(studies, output, uri, ui_url(tracking_uri(home())), cost=args.cost, png_dir=png_dir))
    if png_dir is not None:
        print(f"figures as PNG in {png_dir}")
    return 0


def cmd_ui(args) -> int:
    from mlflow.tracking import MlflowClient

    from study.mlflow_app import APP_NAME
    from study.storage import home, mask
    from study.tracking import read_only_uri, tracking_uri, ui_links

    uri = tracking_uri(home())
    if uri.startswith(("http://", "https://")):
        return _remote_ui(uri)
    _check_port_free(args.host, args.port)
    read_only = read_only_uri(home())
    if read_only is None:  # the UI server would create an empty store
        raise ValueError(f"no MLflow store at {uri.removeprefix('sqlite:///')} yet; launch a study first (`python -m study launch NAME`)")
    # MLflow finds its app plugins by their entry point, which installing the project registers (pyproject.toml).
    if not importlib.metadata.entry_points(group="mlflow.app", name=APP_NAME):
        raise ValueError(f"MLflow's app {APP_NAME!r} (the UI in its model-training view) is not registered: this project was installed "
                         "before it had one, or not at all; install it again (`make setup`, or `.venv/bin/python -m pip install -e .`)")
    base = f"http://{args.host}:{args.port}"
    links = ui_links(MlflowClient(tracking_uri=read_only), base)
    print(f"MLflow UI on {mask(uri)}: starting at {base} ...", flush=True)

    def answered() -> None:  # the links only once they open: a click before would be refused
        print(f"MLflow UI on {mask(uri)}: {base}  (Ctrl-C stops it)")
        for name, link in links:
            print(f"  {name}: {link}")
        # The reports' run links open this UI, on whatever port it serves (dashboards.report reads #mlflow=).
        for report in sorted((home() / "reports").glob("*.html")):
            print(f"  report {report.stem}: {report.resolve().as_uri()}#mlflow={base}")
        sys.stdout.flush()

    # Every page in MLflow's model-training view, its home page first: MLflow's app wrapped by study/mlflow_app.py.
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
               "--default-artifact-root", (home() / "mlartifacts").resolve().as_uri(), "--workers", "1", "--app-name", APP_NAME]
    return _serve(command, f"{base}/health", answered)


def _check_port_free(host: str, port: int) -> None:
    """Fail at once on a port that is taken, rather than print links to another server and wait for the UI's own error."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed connection's TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as error:
            with socket.socket() as other:
                other.bind((host, 0))
                suggestion = other.getsockname()[1]
            raise ValueError(f"--port {port}: {host}:{port} is already in use ({error.strerror}); stop what serves it, "
                             f"or choose another port, e.g. --port {suggestion}") from None


def _serve(command: list[str], health: str, answered: Callable[[], None]) -> int:
    """Run the UI server in its own process group, call `answered` once `health` answers, and stop the whole group
    (uvicorn and its workers) when `ui` ends: on Ctrl-C, on SIGTERM, or on an error here."""
    from study.tracking import ask_server

    # MLflow's server warns about its own dependencies (Starlette deprecations) on import: nothing a user of `ui` can act on.
    # Prepended, so that a PYTHONWARNINGS the user set still decides.
    quiet = {**os.environ, "PYTHONWARNINGS": ",".join(filter(None, ["ignore", os.environ.get("PYTHONWARNINGS")]))}
    server = subprocess.Popen(command, start_new_session=True, env=quiet)  # its own group: a terminal's Ctrl-C reaches us only

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # Until it answers or ends: a server that never starts ends (its port taken, a bad store) and says why itself.
        while server.poll() is None:
            try:
                ask_server(health, time.monotonic() + 5)  # each probe bounded; the loop waits while the server lives
            except OSError:
                time.sleep(0.2)
                continue
            answered()
            break
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_group(server)


def _stop_group(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, then SIGKILL to what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return  # the group is gone
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            server.poll()  # reap the leader, so the group check below sees only live processes
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def cmd_serve_storage(args) -> int:
    """Optuna's gRPC storage proxy in front of --storage, for many workers (study/storage_proxy.py)."""
    from study.storage import mask, open_storage, storage_kind

    if not storage_kind(args.storage).servable:
        raise ValueError(f"--storage {mask(args.storage)}: give the storage the proxy serves (postgresql://..., a journal file), not another proxy")
    try:
        from study.storage_proxy import serve
    except ImportError:
        raise ValueError("serve-storage: the gRPC server is not installed; install it with pip install '.[cluster]'") from None
    server = serve(open_storage(args.storage, server=True), args.host, args.port)
    # A server started in the background of a script inherits SIGINT as ignored; Ctrl-C (or kill -INT) must still stop it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"serving {mask(args.storage)} on grpc://{args.host}:{args.port}; workers use --storage grpc://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=5)
    return 0


def _add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=positive_int, help="trials run at once, one worker process each (default: one per GPU slot, 1 on a CPU)")
    parser.add_argument("--gpus", help="GPU indices to use, e.g. 0,1 (default: every visible GPU)")
    parser.add_argument("--trials-per-gpu", type=positive_int, default=1, help="trials sharing one GPU, for small models (default: 1)")
    parser.add_argument("--checkpoint-dir", type=Path, help="where running trials keep their checkpoints, one folder per study, so that an "
                        "interrupted trial's retry resumes where it stopped; with workers on several machines or Ray, a path every one of "
                        "them reaches (a shared file system) (default: the study home's checkpoints/)")
    _add_mlflow_wait(parser)
    parser.add_argument("--heartbeat", type=positive_int, default=10,
                        help="seconds between a running trial's heartbeats (relational storage) or lease renewals (journal, gRPC proxy); "
                             "a trial silent for 3 of them is failed and run again, whatever host ran it (default: 10)")


def _add_mlflow_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mlflow-wait", type=positive_seconds, metavar="S",
                        help="seconds to wait for an MLflow server to answer before anything is written, retrying with backoff "
                             "(default: $STUDY_MLFLOW_WAIT, else 60: a server busy with many workers starting answers late)")


def _remote_ui(uri: str) -> int:
    """MLFLOW_TRACKING_URI names an `mlflow server`: it already serves the UI, so say where instead of starting one."""
    from mlflow.tracking import MlflowClient

    from study.storage import mask
    from study.tracking import MLFLOW_WAIT_ENV, MODEL_TRAINING_CLICK, ask_server, mlflow_wait, ui_links, ui_url

    shown = ui_url(uri)  # without its credentials: the browser asks for them
    wait = mlflow_wait()
    try:
        ask_server(f"{uri.rstrip('/')}/health", time.monotonic() + wait)
    except OSError as error:
        raise ValueError(f"MLFLOW_TRACKING_URI={mask(uri).rstrip('/')} does not answer within {wait:g} s ({mask(str(getattr(error, 'reason', error)))}); "
                         f"start that `mlflow server`, wait longer ({MLFLOW_WAIT_ENV}), or unset the variable") from None
    print(f"MLFLOW_TRACKING_URI points to the MLflow server {shown}, which serves the UI itself; no local UI started. Open {shown}")
    for name, link in ui_links(MlflowClient(tracking_uri=uri), shown):
        print(f"  {name}: {link}")
    print(MODEL_TRAINING_CLICK)
    return 0


# Every number a flag takes is checked where argparse reads it: each type function states its rule, and
# Parser.error puts the flag's name before it ("--trials must be >= 1; got 0").
def _integer(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}; got {value}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    return _integer(text, 0)


def positive_seconds(text: str) -> float:
    """A finite number of seconds above 0: nan and inf would mean no limit at all."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0; got {text!r}")
    return value


def port(text: str) -> int:
    """A TCP port to serve on; not 0, whose port the system picks, so that the address printed is one to use."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535; got {text!r}")
    return value


class UsageError(Exception):
    """A command line argparse cannot read: main prints it as one `error:` line and returns 1, as for every user error."""


class Parser(argparse.ArgumentParser):
    """argparse's usage errors as every other user error: one line naming the flag and the command's help, not
    argparse's usage text and exit 2."""

    def error(self, message: str):
        flag, rule = re.fullmatch(r"(?:argument (\S+): )?(.*)", message, re.DOTALL).groups()
        if flag:
            message = f"{flag} {rule}" if rule.startswith("must ") else f"{flag}: {rule}"
        raise UsageError(f"{' '.join(message.split())}; see {self.prog} --help")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an argument no parser knows is refused with the help of its command, not the top one's."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = getattr(parsed, "command", None)
            Parser(prog=f"{self.prog} {command}" if command else self.prog).error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed


# What docs/commands.md says of these flags (tests/test_cli.py compares them).
OBJECTIVE_HELP = ("accuracy (default), or accuracy,cost: maximise val_accuracy and minimise --cost, a Pareto front; Optuna cannot prune "
                  "multi-objective studies, so these are pruned by the platform on validation accuracy alone, against trials of similar cost "
                  "(--pruner none runs every trial to its end)")
def _either(names) -> str:
    *most, last = names
    return f"{', '.join(most)} or {last}"


SAMPLER_HELP = f"Optuna sampler: {_either(SAMPLERS)} (grid: every combination of the spec's choices); overrides the spec's [sampler] (default tpe)"
PRUNER_HELP = f"Optuna pruner: {_either(PRUNERS)}; overrides the spec's [pruner] (default median)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m study", description="Optuna studies of classic CNNs on Fashion-MNIST, tracked in MLflow.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    storage_help = ("Optuna storage: a journal file path, an SQLAlchemy URL such as postgresql://host/db, or grpc://host:port of a "
                    "`serve-storage` proxy (default: $STUDY_HOME/optuna.journal)")

    launch = commands.add_parser("launch", help="run (or resume) a study")
    launch.add_argument("name", help="a shipped study (see `list`) or a path to a .toml spec")
    launch.add_argument("--trials", type=positive_int, default=DEFAULT_TRIALS, help=f"the study's total number of trials (default: {DEFAULT_TRIALS}); a relaunch runs only what is missing")
    launch.add_argument("--preset", choices=["cpu", "full"], help="cpu: the spec's budget for a machine without a GPU (data subsets, narrower ranges); full: the notes' data and ranges (default: full on CUDA, cpu without)")
    launch.add_argument("--storage", help=storage_help)
    launch.add_argument("--timeout", type=positive_seconds, help="stop starting new trials after this many seconds")
    launch.add_argument("--budget", help="the study's budget: device time such as 2h, 30m or 90s, or training FLOPs such as 5e15; "
                                         "no trial starts whose predicted cost does not fit (see docs/after-the-search.md#budgets)")
    launch.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files (default: $FASHION_MNIST_DIR, the cache, Debian's package)")
    launch.add_argument("-o", "--output", help="report file (default: $STUDY_HOME/reports/NAME.html)")
    launch.add_argument("--objective", help=OBJECTIVE_HELP)
    launch.add_argument("--cost", help="the cost of --objective accuracy,cost: train_seconds (default) or train_flops")
    launch.add_argument("--sampler", help=SAMPLER_HELP)
    launch.add_argument("--pruner", help=PRUNER_HELP)
    _add_worker_arguments(launch)
    launch.add_argument("--log-model", choices=["best", "all", "none"], default="best",
                        help="trained networks logged to MLflow as PyTorch models, with a test-set confusion matrix: "
                             "each new best trial, every trial, or none (default: best)")
    launch.add_argument("--register", metavar="NAME", help="register the study's best model in the MLflow model registry under NAME")
    launch.add_argument("--ray", metavar="ADDRESS", help="run the trials as actors on a Ray cluster: auto (the cluster this machine belongs to), "
                                                         "ray://host:port or a host:port GCS address; --workers caps how many run at once "
                                                         "(default: the cluster's capacity); needs pip install '.[ray]'")
    launch.set_defaults(run=cmd_launch)

    create = commands.add_parser("create", help="create a study and its MLflow parent run without training, for workers to join")
    create.add_argument("name", help="a shipped study (see `list`) or a path to a .toml spec")
    create.add_argument("--trials", type=positive_int, help=f"the study's total number of trials (default: {DEFAULT_TRIALS}, or the existing study's)")
    create.add_argument("--preset", choices=["cpu", "full"], help="cpu or full, as for launch; the workers' machines need not be this one, "
                                                                  "so name it (default: this machine's, or the existing study's)")
    create.add_argument("--storage", help=storage_help + "; postgresql://... or grpc://... for workers on other machines")
    create.add_argument("--objective", help="accuracy (default), or accuracy,cost, as for launch")
    create.add_argument("--cost", help="the cost of --objective accuracy,cost: train_seconds (default) or train_flops")
    create.add_argument("--sampler", help=SAMPLER_HELP)
    create.add_argument("--pruner", help=PRUNER_HELP)
    _add_mlflow_wait(create)
    create.set_defaults(run=cmd_create)

    worker = commands.add_parser("worker", help="join a launched study (from this or another machine) and run trials until its total is reached")
    worker.add_argument("name", help="the study's spec: a shipped study or a path to its .toml")
    worker.add_argument("--storage", help=storage_help + "; postgresql://... to share a study between machines")
    worker.add_argument("--timeout", type=positive_seconds, help="stop starting new trials after this many seconds")
    worker.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files")
    worker.set_defaults(log_model="best", register=None, budget=None, run=cmd_worker)
    _add_worker_arguments(worker)

    confirm = commands.add_parser("confirm", help="train the study's best configurations again with other seeds, and rank them by the mean")
    confirm.add_argument("name", help="the study's spec, as for launch: a shipped study or a path to its .toml")
    confirm.add_argument("--top", type=positive_int, default=5, help="how many of the best configurations (default: 5)")
    confirm.add_argument("--seeds", type=positive_int, default=3, help="further seeds per configuration, beside the one it ran with (default: 3)")
    confirm.add_argument("--storage", help=storage_help)
    confirm.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files")
    confirm.set_defaults(run=cmd_confirm)

    finalize = commands.add_parser("finalize", help="train the chosen configuration on train + validation, test it once, register the model")
    finalize.add_argument("name", help="the study's name")
    finalize.add_argument("--trial", type=non_negative_int, help="the trial whose configuration to train (default: the confirmed best, else the best trial)")
    finalize.add_argument("--register", metavar="NAME", help="registered model name (default: <study>-final)")
    finalize.add_argument("--storage", help=storage_help)
    finalize.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files")
    finalize.set_defaults(run=cmd_finalize)

    listing = commands.add_parser("list", help="show every shipped study and its search space")
    listing.add_argument("--preset", choices=["cpu", "full"], help="show this preset's ranges (default: the one a launch here would pick)")
    listing.set_defaults(run=cmd_list)

    show = commands.add_parser("show", help="print a study's best trials")
    show.add_argument("name")
    show.add_argument("--storage", help=storage_help)
    show.add_argument("--top", type=positive_int, default=10, help="how many trials to show (default: 10)")
    show.set_defaults(run=cmd_show)

    export = commands.add_parser("export", help="write one row per trial (params, state, MLflow metrics) to CSV or Parquet")
    export.add_argument("name")
    export.add_argument("-o", "--output", required=True, help="FILE.csv or FILE.parquet")
    export.add_argument("--storage", help=storage_help)
    export.set_defaults(run=cmd_export)

    report = commands.add_parser("report", help="write the HTML report of one or more studies")
    report.add_argument("names", nargs="+", metavar="NAME")
    report.add_argument("--storage", help=storage_help)
    report.add_argument("-o", "--output", help="report file (default: $STUDY_HOME/reports/NAME.html)")
    report.add_argument("--cost", choices=["train_seconds", "train_flops", "peak_memory_bytes"], default="train_seconds",
                        help="the cost axis the accuracy plot opens on; buttons in the page switch it (default: train_seconds)")
    report.add_argument("--png", metavar="DIR", help="also write every figure as a PNG into DIR (needs Chromium, or Chrome at $BROWSER_PATH)")
    report.set_defaults(run=cmd_report)

    copy = commands.add_parser("copy", help="copy a study to another storage (e.g. its journal to PostgreSQL), to go on there")
    copy.add_argument("name", help="the study's name")
    copy.add_argument("--from", dest="source", required=True, help="the storage that holds it (a journal file path, an SQLAlchemy URL, grpc://host:port)")
    copy.add_argument("--to", dest="target", required=True, help="the storage to copy it to, which must not hold a study of that name")
    copy.set_defaults(run=cmd_copy)

    inspect = commands.add_parser("inspect", help="per-layer output shape, parameters, FLOPs and activation memory of a network")
    # The names live in objectives/models.py's ARCHITECTURES, which imports torch: `--help` stays instant without them.
    inspect.add_argument("arch", help="an architecture of objectives/models.py (a name it does not know lists them all)")
    inspect.add_argument("--resize", type=positive_int, help="input side in pixels (default: the architecture's, e.g. 224 for alexnet)")
    inspect.add_argument("--ratio", type=positive_int, default=1, help="channel divisor (default: 1)")
    inspect.add_argument("--format", choices=["table", "csv", "json"], default="table")
    inspect.set_defaults(run=cmd_inspect)

    serve = commands.add_parser("serve-storage", help="serve a storage to many workers through Optuna's gRPC proxy (workers: --storage grpc://HOST:PORT)")
    serve.add_argument("--storage", required=True, help="the storage it serves: postgresql://host/db, or a journal file path")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only; 0.0.0.0 for every machine)")
    serve.add_argument("--port", type=port, default=13000, help="default: 13000")
    serve.set_defaults(run=cmd_serve_storage)

    ui = commands.add_parser("ui", help="serve the MLflow UI on the studies' tracking store")
    ui.add_argument("--port", type=port, default=5000, help="default: 5000")
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    ui.set_defaults(run=cmd_ui)
    return parser


# MLflow's HTTP client waits 120 s per request and retries 7 times with backoff: many minutes of silence when
# a tracking server is down or does not answer. These bound every request to two tries of 10 s (urllib3 waits no
# backoff before a first retry); a server silent from the start is refused sooner, by study.tracking.check_reachable.
# A user's own settings win. The 10 s bound each read, not the request: MLflow (mlflow.utils.rest_utils.http_request)
# hands requests a (connect, read) timeout and offers no hook for a total deadline (its request_auth plugins see the
# request, not the wait), so a server that answers a byte at a time during a launch can still hold a write; only the
# probes before anything is written (study.tracking.ask_server) have a total deadline.
# MLflow also prints "View run ... at URL" with the tracking URI as given, credentials included: the platform prints
# its own, masked, links.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)  # MLflow reads them at every request
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader left (`list | head -1`): what it read is all it wanted. Point stdout at /dev/null so
        # the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as error:
        if args.debug:
            raise
        from objectives.data import DataError
        from study.specs import SpecError
        from study.storage import StorageError, mask

        # OSError: a file that cannot be written or read, named in the message.
        known = isinstance(error, (DataError, SpecError, StorageError, ValueError, OSError))
        # Masked again: an error from a library (MLflow's client, a database driver) may echo the URL it was given.
        message = mask(str(error).strip().splitlines()[0]) if str(error).strip() else type(error).__name__
        print(f"error: {message}" if known else f"error: {type(error).__name__}: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

