"""`python -m study COMMAND`: launch, list, show, report, ui.

Each command is one function taking the parsed arguments and returning an exit code.
User mistakes become one line on stderr and exit 1; `--debug` shows the traceback.
Heavy imports (torch, optuna, mlflow) happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def _open_study(name: str, storage_url: str | None):
    """An existing study, or a SpecError that says how to create it. Writes nothing."""
    import optuna

    from study.specs import SpecError
    from study.storage import default_storage_url, mask, open_storage

    if storage_url is None and not Path(default_storage_url()).exists():
        raise SpecError(f"no study named {name!r}: {default_storage_url()} does not exist yet; run `python -m study launch {name}` first")
    storage = open_storage(storage_url)
    if name not in optuna.get_all_study_names(storage):
        raise SpecError(f"no study named {name!r} in {mask(storage_url or default_storage_url())}; run `python -m study launch {name}` first")
    return optuna.load_study(study_name=name, storage=storage)


def _report_output(output: str | None, default: Path) -> Path:
    """The report path, checked before any work so a typo does not surface after a long study."""
    path = Path(output) if output else default
    if path.suffix != ".html":
        raise ValueError(f"-o {path}: the report is an HTML file; give a name ending in .html")
    if output and not path.parent.is_dir():
        raise ValueError(f"-o {path}: directory {path.parent} does not exist")
    return path


def _console():
    """Rich console; off a terminal (logs, make), wide and without hard wraps so lines stay greppable."""
    from rich.console import Console

    console = Console(soft_wrap=True)
    if not console.is_terminal:
        console.width = 160
    return console


def cmd_launch(args) -> int:
    import optuna

    from dashboards import write_report
    from objectives.data import locate
    from study.launch import Launch, check_preset_matches, choose_preset, counts_toward_total, make_pruner, report_path
    from study.specs import load_spec, resolve
    from study.storage import default_storage_url, home, make_home, mask, open_storage
    from study.tracking import Tracker, tracking_uri, ui_url

    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1; got {args.trials}")
    if args.timeout is not None and args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0 seconds; got {args.timeout}")
    console = _console()
    spec = load_spec(args.name)
    output = _report_output(args.output, report_path(home(), [spec.name]))
    preset, why = choose_preset(args.preset)
    plan = resolve(spec, preset)
    console.print(f"preset [bold]{preset}[/bold]: {why}")
    locate(args.data_dir)  # fail on missing data before anything is written
    storage = open_storage(args.storage)
    storage_label = mask(args.storage or default_storage_url())
    make_home()  # for the MLflow store and the report, also when the storage is elsewhere
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = make_pruner(plan.spec.pruner)
    study = optuna.create_study(study_name=spec.name, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(), pruner=pruner)
    check_preset_matches(study, preset)
    study_home = home()
    uri = tracking_uri(study_home)
    tracker = Tracker(spec.name, uri, artifact_root=study_home / "mlartifacts")
    tracker.describe_study(spec.path.read_text(), preset, storage_label, "TPESampler", type(pruner).__name__)
    launch = Launch(plan=plan, study=study, storage=storage, tracker=tracker, console=console, data_dir=args.data_dir)
    try:
        launch.run(args.trials, args.timeout)
    except KeyboardInterrupt:
        tracker.close_parent("KILLED")
        console.print("interrupted: the running trial is recorded as interrupted and will run again; launch the same command to resume")
        return 130
    except Exception:
        tracker.close_parent("FAILED")  # the failing trial is already recorded FAIL with its reason
        raise
    done = sum(counts_toward_total(t) for t in study.get_trials(deepcopy=False))
    tracker.close_parent("FINISHED" if done >= args.trials else "KILLED")
    path = write_report([study], output, uri, ui_url(uri))
    console.print(f"optuna storage: {storage_label}")
    console.print(f"mlflow store:   {mask(uri)}  (browse with `python -m study ui`)")
    console.print(f"report:         {path}")
    return 0


def cmd_list(args) -> int:
    from study.specs import available, load_spec

    for name in available():
        spec = load_spec(name)
        print(f"{name:22} {spec.summary()}")
    return 0


def cmd_show(args) -> int:
    from optuna.trial import TrialState
    from rich.table import Table

    study = _open_study(args.name, args.storage)
    trials = study.get_trials(deepcopy=False)
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value, reverse=True)
    counts = ", ".join(f"{sum(t.state == s for t in trials)} {s.name}" for s in TrialState if any(t.state == s for t in trials))
    console = _console()
    console.print(f"study {study.study_name} (preset {study.user_attrs.get('preset', '?')}): {len(trials)} trials, {counts}")
    if not done:
        console.print("no completed trials yet")
        return 0
    table = Table(title=f"best {min(args.top, len(done))} trials by validation accuracy")
    param_names = sorted({name for t in done for name in t.params})
    for column in ["trial", *param_names, "val_accuracy", "test_accuracy", "epochs_run", "train_seconds"]:
        table.add_column(column, justify="right")
    for t in done[:args.top]:
        params = [f"{t.params[n]:.4g}" if isinstance(t.params.get(n), float) else str(t.params.get(n, "")) for n in param_names]
        table.add_row(str(t.number), *params, f"{t.value:.4f}", f"{t.user_attrs.get('test_accuracy', float('nan')):.4f}",
                      str(t.user_attrs.get("epochs_run", "")), f"{t.user_attrs.get('train_seconds', float('nan')):.1f}")
    console.print(table)
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
    from study.storage import home
    from study.tracking import tracking_uri, ui_url

    output = _report_output(args.output, report_path(home(), args.names))
    png_dir = Path(args.png) if args.png else None
    if png_dir is not None:
        from dashboards.report import find_browser

        if png_dir.exists() and not png_dir.is_dir():
            raise ValueError(f"--png {png_dir}: not a directory")
        find_browser()  # before any work: PNGs need Chromium
    studies = [_open_study(name, args.storage) for name in args.names]
    uri = tracking_uri(home())
    print(write_report(studies, output, uri, ui_url(uri), cost=args.cost, png_dir=png_dir))
    if png_dir is not None:
        print(f"figures as PNG in {png_dir}")
    return 0


def cmd_ui(args) -> int:
    from mlflow.tracking import MlflowClient

    from study.storage import home
    from study.tracking import tracking_uri

    uri = tracking_uri(home())
    if uri.startswith(("http://", "https://")):
        print(f"MLFLOW_TRACKING_URI points to a tracking server; open {uri}")
        return 0
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {uri}: {base}  (Ctrl-C stops it)")
    for experiment in MlflowClient(tracking_uri=uri).search_experiments():
        if experiment.name != "Default":
            print(f"  {experiment.name}: {base}/#/experiments/{experiment.experiment_id}/runs")
    sys.stdout.flush()
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
               "--default-artifact-root", (home() / "mlartifacts").resolve().as_uri(), "--workers", "1"]
    try:
        return subprocess.run(command, check=False).returncode
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m study", description="Optuna studies of classic CNNs on Fashion-MNIST, tracked in MLflow.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    storage_help = "Optuna storage: a journal file path or an SQLAlchemy URL such as postgresql://host/db (default: $STUDY_HOME/optuna.journal)"

    launch = commands.add_parser("launch", help="run (or resume) a study")
    launch.add_argument("name", help="a shipped study (see `list`) or a path to a .toml spec")
    launch.add_argument("--trials", type=int, default=50, help="the study's total number of trials (default: 50); a relaunch runs only what is missing")
    launch.add_argument("--preset", choices=["smoke", "full"], help="smoke: data subset, capped resize and epochs; full: the real thing (default: full on CUDA, smoke on CPU)")
    launch.add_argument("--storage", help=storage_help)
    launch.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    launch.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files (default: $FASHION_MNIST_DIR, the cache, Debian's package)")
    launch.add_argument("-o", "--output", help="report file (default: $STUDY_HOME/reports/NAME.html)")
    launch.set_defaults(run=cmd_launch)

    listing = commands.add_parser("list", help="show every shipped study and its search space")
    listing.set_defaults(run=cmd_list)

    show = commands.add_parser("show", help="print a study's best trials")
    show.add_argument("name")
    show.add_argument("--storage", help=storage_help)
    show.add_argument("--top", type=int, default=10, help="how many trials to show (default: 10)")
    show.set_defaults(run=cmd_show)

    report = commands.add_parser("report", help="write the HTML report of one or more studies")
    report.add_argument("names", nargs="+", metavar="NAME")
    report.add_argument("--storage", help=storage_help)
    report.add_argument("-o", "--output", help="report file (default: $STUDY_HOME/reports/NAME.html)")
    report.add_argument("--cost", choices=["train_seconds", "train_flops", "peak_memory_bytes"], default="train_seconds",
                        help="the cost axis the accuracy plot opens on; buttons in the page switch it (default: train_seconds)")
    report.add_argument("--png", metavar="DIR", help="also write every figure as a PNG into DIR (needs Chromium, or Chrome at $BROWSER_PATH)")
    report.set_defaults(run=cmd_report)

    inspect = commands.add_parser("inspect", help="per-layer output shape, parameters, FLOPs and activation memory of a network")
    inspect.add_argument("arch", help="lenet, lenet_bn, alexnet, alexnet_28, vgg11, nin, googlenet, resnet18, densenet")
    inspect.add_argument("--resize", type=int, help="input side in pixels (default: the architecture's, e.g. 224 for alexnet)")
    inspect.add_argument("--ratio", type=int, default=1, help="channel divisor (default: 1)")
    inspect.add_argument("--format", choices=["table", "csv", "json"], default="table")
    inspect.set_defaults(run=cmd_inspect)

    ui = commands.add_parser("ui", help="serve the MLflow UI on the studies' tracking store")
    ui.add_argument("--port", type=int, default=5000, help="default: 5000")
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    ui.set_defaults(run=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as error:
        if args.debug:
            raise
        from objectives.data import DataError
        from study.specs import SpecError
        from study.storage import StorageError

        # OSError: a file that cannot be written or read, named in the message.
        known = isinstance(error, (DataError, SpecError, StorageError, ValueError, OSError))
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: {message}" if known else f"error: {type(error).__name__}: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

