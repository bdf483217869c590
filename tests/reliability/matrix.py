"""Every command on every kind of study, on every storage: the design of the matrix as data, its coverage, and the
runner of one cell (tests/reliability/test_matrix_local.py and test_matrix_remote.py run the cells).

A cell is one study on one storage: its objective, its architectures, and the steps run on it. Its kinds follow:
the objective's, "several architectures" when it searches two, "confirm companion" when `confirm` runs on it (the
companion `<NAME>.confirm` then goes through the same steps), "finalized" when `finalize` does. Every pair of kind
and storage, kind and step, storage and step is covered by some cell (test_the_matrix_covers_every_pair), which is
all-pairs, not the full product. Cells on one storage share it (one journal, database or proxy for all).

Steps, in the order a cell runs them: launch (2 tiny LeNet trials, fixed learning rates so that a trial can be
chosen); `interrupt`: Ctrl-C while the command named in `stop` (launch, confirm or finalize) is provably at a seeded
random point (phase and trial), then the same command again; confirm (--top 1 --seeds 1); finalize; show; export to
CSV and Parquet; report; `worker`: in a cell whose launch Ctrl-C stopped inside a trial, it joins the study, whose
total is not reached, and runs what is missing (instead of a second launch); in every cell that has it, it joins
the finished study at the end and finds nothing to do. Storages: `journal` is a journal file given with --storage,
`ray` the study home's own journal (launch --ray).

After each step that writes: the consistency checker (reliability.checks.check_consistent) and tests/reader.py,
which reads the storage and the MLflow store without importing the project; after each export and report, the
reader reads the file. `by` says how worker, confirm, finalize and report name the study (its name or its spec's path);
show and export use both forms in every cell.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import LENET, ROOT, hold_env, make_spec, run_cli, start_hooked, wait_for_holds
from reliability.checks import SEED, Counts, check_consistent, record_fault
from study.storage import STORAGE_KINDS

STORAGES = (*(kind.name for kind in STORAGE_KINDS), "ray")  # ray: the study home's journal, launched with --ray
KINDS = ("accuracy", "accuracy,train_seconds", "accuracy,train_flops", "several architectures", "confirm companion", "finalized")
STEPS = ("launch", "interrupt", "worker", "show", "export", "report", "confirm", "finalize")


@dataclass(frozen=True)
class Cell:
    storage: str      # journal: a journal file given with --storage; ray: launch --ray, with $STUDY_HOME/optuna.journal
    objective: str    # accuracy, or accuracy,<cost>
    archs: int        # 1: lenet; 2: lenet and lenet_bn searched
    steps: str        # beyond the launch (and the interrupt, which `stop` says)
    stop: str = ""    # the command that Ctrl-C interrupts: launch, confirm, finalize, or none
    by: str = "name"  # how worker, confirm, finalize and report name the study: name or path

    @property
    def name(self) -> str:
        return f"{self.storage}_{self.objective.removeprefix('accuracy,train_') if ',' in self.objective else 'single'}"

    @property
    def all_steps(self) -> set[str]:
        return {"launch", *self.steps.split(), *(["interrupt"] if self.stop else [])}

    @property
    def kinds(self) -> set[str]:
        return {self.objective, *(["several architectures"] if self.archs > 1 else []),
                *(["confirm companion"] if "confirm" in self.steps else []), *(["finalized"] if "finalize" in self.steps else [])}


CELLS = [
    #    storage       objective                 archs  steps                                      stop        by
    Cell("journal",    "accuracy",               1,     "show export report"),
    Cell("journal",    "accuracy,train_seconds", 2,     "worker confirm show export",              "launch",   "path"),
    Cell("journal",    "accuracy,train_flops",   1,     "finalize show export report",             "finalize"),
    Cell("sqlite",     "accuracy",               1,     "worker finalize show export",             "launch",   "path"),
    Cell("sqlite",     "accuracy,train_seconds", 1,     "show export report"),
    Cell("sqlite",     "accuracy,train_flops",   2,     "confirm show export report",              "confirm"),
    Cell("postgresql", "accuracy",               2,     "confirm finalize show export",            "confirm"),
    Cell("postgresql", "accuracy,train_seconds", 1,     "worker show export report",               "launch",   "path"),
    Cell("postgresql", "accuracy,train_flops",   1,     "confirm finalize show export report",     "finalize", "path"),
    Cell("proxy",      "accuracy",               2,     "worker show export report",               "launch"),
    Cell("proxy",      "accuracy,train_seconds", 1,     "confirm finalize show export",            "confirm",  "path"),
    Cell("proxy",      "accuracy,train_flops",   1,     "worker show export",                      "",         "path"),
    Cell("ray",        "accuracy",               1,     "show export report",                      "launch",   "path"),
    Cell("ray",        "accuracy,train_seconds", 1,     "worker confirm finalize show export",     "finalize"),
    Cell("ray",        "accuracy,train_flops",   2,     "show export report"),
]
# The fast tier's slice (`make test-fast`): the local file storages, single objective and accuracy,cost, the read-only steps.
FAST = {"journal_single", "sqlite_seconds"}

LEARNING_RATES = (0.05, 0.03)  # the two trials of every launch, enqueued so that a hold can pick one by its rate
TRIALS = len(LEARNING_RATES)
PHASES = {"launch": ("start", "epoch:1", "report"), "confirm": ("start", "epoch:1"), "finalize": ("start", "epoch:1")}


def missing_pairs(cells: list[Cell]) -> list[str]:
    """The pairs of (kind, storage), (kind, step) and (storage, step) that no cell covers."""
    covered = set()
    for cell in cells:
        covered |= {("kind-storage", kind, cell.storage) for kind in cell.kinds}
        covered |= {("kind-step", kind, step) for kind, step in itertools.product(cell.kinds, cell.all_steps)}
        covered |= {("storage-step", cell.storage, step) for step in cell.all_steps}
    wanted = ({("kind-storage", k, s) for k in KINDS for s in STORAGES} | {("kind-step", k, s) for k in KINDS for s in STEPS}
              | {("storage-step", s, t) for s in STORAGES for t in STEPS})
    return sorted(" × ".join(pair[1:]) for pair in wanted - covered)


def other_form(form: str) -> str:
    """The other way to name a study: its spec's path for its name, and the other way round."""
    return "path" if form == "name" else "name"


def tiny_spec(directory: Path, cell: Cell) -> Path:
    """The cell's spec: LeNet (and LeNet-BN) for one epoch on 128 images, its two trials enqueued."""
    # fp32: "auto" would time both precisions of the shape in every command on a CPU with bf16 arithmetic.
    fixed = {"n_train": 128, "n_val": 64, "n_test": 64, "precision": "fp32"}
    if cell.archs == 1:
        return make_spec(directory, cell.name, LENET, fixed=fixed, enqueue=[{"lr": lr} for lr in LEARNING_RATES])
    return make_spec(directory, cell.name, LENET, fixed={**fixed, "arch": None}, search={"arch": {"choices": ["lenet", "lenet_bn"]}},
                     enqueue=[{"lr": lr, "arch": arch} for lr, arch in zip(LEARNING_RATES, ("lenet", "lenet_bn"))])


class Reader:
    """tests/reader.py as one process for a test module, started with a clean sys.path (-I): it must read every record
    without importing the project."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-I", str(ROOT / "tests" / "reader.py"), "serve"], cwd=ROOT, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.process.stdout.readline().strip() == "ready"

    def check(self, check: str, **args) -> dict:
        """Run one check; fails the test with the problems it found."""
        self.process.stdin.write(json.dumps({"check": check, "args": args}) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        assert not answer["problems"], f"tests/reader.py {check}:\n" + "\n".join(answer["problems"])
        return answer["checked"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


@dataclass
class Place:
    """Where a module's cells live: the study home (MLflow store, reports), and each storage's --storage value (None:
    the home's journal) with the Optuna storage the checker opens."""

    home: Path
    urls: dict[str, str | None]
    reader: Reader
    ray_address: str | None = None
    ray_holds: object = None  # test_ray.Holds of the cluster's trial slots

    def url(self, storage: str) -> str | None:
        return self.urls[storage]

    def reader_url(self, storage: str) -> str:
        return self.urls[storage] or str(self.home / "optuna.journal")

    def tracking_uri(self) -> str:
        return f"sqlite:///{(self.home / 'mlflow.db').resolve()}"


class CellRun:
    """One cell, step by step, each step checked; problems with how a command names the study are collected and
    reported at the end, so that one refusal does not hide the rest of the cell."""

    def __init__(self, cell: Cell, place: Place, tmp_path: Path, open_storage: Callable[[], optuna.storages.BaseStorage]):
        self.cell, self.place, self.tmp = cell, place, tmp_path
        self.spec = tiny_spec(tmp_path, cell)
        self.open_storage = open_storage
        self._storage = None
        self.rng = random.Random(f"{SEED}-{cell.name}")
        self.env = {"STUDY_HOME": str(place.home), "MLFLOW_TRACKING_URI": None, "HOOKED_HOLD_DIR": None, "HOOKED_HOLD_AT": None}
        url = place.url(cell.storage)
        self.storage_flag = ["--storage", url] if url else []
        self.checkpoint_flag = ["--checkpoint-dir", str(place.home / "checkpoints")]  # where a launch keeps them: shared, as on several machines
        self.naming_problems: dict[str, None] = {}  # a set that keeps its order
        self.counts = Counts()
        self.companion = False

    @property
    def storage(self) -> optuna.storages.BaseStorage:
        """What the consistency checker and the phase checks read; opened once the launch has made it."""
        if self._storage is None:
            self._storage = self.open_storage()
        return self._storage

    # ---- commands ----

    @property
    def name(self) -> str:
        return self.cell.name

    def ref(self, form: str) -> str:
        return self.name if form == "name" else str(self.spec)

    def launch_argv(self) -> list[str]:
        objective = ["--objective", "accuracy,cost", "--cost", self.cell.objective.split(",")[1]] if "," in self.cell.objective else ["--objective", "accuracy"]
        ray = ["--ray", self.place.ray_address, "--workers", "1", *self.checkpoint_flag] if self.cell.storage == "ray" else []
        return ["launch", str(self.spec), "--trials", str(TRIALS), "--preset", "cpu", "--log-model", "none", *objective, *ray, *self.storage_flag]

    def command_argv(self, command: str, form: str) -> list[str]:
        extra = {"confirm": ["--top", "1", "--seeds", "1"], "worker": self.checkpoint_flag, "finalize": []}[command]
        return [command, self.ref(form), *extra, *self.storage_flag]

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        result = run_cli(*argv, env=self.env, timeout=300)
        assert result.returncode == 0, f"{' '.join(argv)}: exit {result.returncode}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        return result

    def run_named(self, argv_of, form: str) -> subprocess.CompletedProcess:
        """A command that names the study as `form` says; if that form is refused, noted, and the other form run."""
        result = run_cli(*argv_of(form), env=self.env, timeout=300)
        if result.returncode == 1 and result.stderr.startswith("error:"):
            self.naming_problems[f"{' '.join(argv_of(form))}: {result.stderr.strip()}"] = None
            return self.run(argv_of(other_form(form)))
        assert result.returncode == 0, f"{' '.join(argv_of(form))}: exit {result.returncode}\n{result.stderr[-3000:]}"
        return result

    # ---- checks ----

    def studies(self) -> list[str]:
        return [self.name, *([f"{self.name}.confirm"] if self.companion else [])]

    def check_written(self) -> None:
        """After a step that writes: Optuna and MLflow agree, read by the checker and by the reader."""
        counts = check_consistent(self.name, self.storage, self.place.tracking_uri(), total=TRIALS)
        if self.companion:
            more = check_consistent(f"{self.name}.confirm", self.storage, self.place.tracking_uri(), total=1)
            counts = Counts(counts.trials + more.trials, counts.lost + more.lost, counts.duplicates + more.duplicates)
        self.counts = counts
        self.place.reader.check("storage", storage=self.place.reader_url(self.cell.storage), tracking_uri=self.place.tracking_uri(),
                                studies=self.studies())

    def check_stopped(self) -> None:
        """Right after Ctrl-C: nothing RUNNING on either side (the retry may wait for the next launch)."""
        self.place.reader.check("storage", storage=self.place.reader_url(self.cell.storage), tracking_uri=self.place.tracking_uri(),
                                studies=self.studies(), unfinished_ok=True)

    def trials(self, name: str | None = None) -> list:
        return optuna.load_study(study_name=name or self.name, storage=self.storage).get_trials(deepcopy=False)

    # ---- steps ----

    def launch(self) -> None:
        if self.cell.stop == "launch":
            self.interrupt("launch", lambda form: self.launch_argv())
            if "worker" in self.cell.steps:  # a study whose total is not reached: the worker runs what is missing
                self.run_named(functools.partial(self.command_argv, "worker"), self.cell.by)
                self.check_written()
                return
        self.run(self.launch_argv())
        self.check_written()
        self.place.reader.check("report", path=str(self.place.home / "reports" / f"{self.name}.html"),
                                storage=self.place.reader_url(self.cell.storage), studies=[self.name])

    def interrupt(self, command: str, argv_of) -> None:
        """Ctrl-C while `command` is provably at a seeded point: a phase, and for a launch one of its two trials."""
        phases = ("start", "report") if self.cell.storage == "ray" and command == "launch" else PHASES[command]  # Ray actors hold at start only
        if command == "launch" and "worker" in self.cell.steps:
            phases = tuple(phase for phase in phases if phase != "report")  # inside a trial: the worker has it to run again
        phase, lr = self.rng.choice(phases), self.rng.choice(LEARNING_RATES)
        if self.cell.storage == "ray" and phase == "start":
            process = self._held_on_ray(argv_of(self.cell.by), lr)
        else:
            process, hold = self._held(command, argv_of, phase, lr if command == "launch" and phase != "report" else None)
            lr = hold["lr"]
        print(f"Ctrl-C in {command} at {phase}" + (f", the trial with lr {lr}" if command == "launch" and phase != "report" else ""))
        self._assert_in_phase(command, phase, lr)
        process.send_signal(signal.SIGINT)
        code = process.wait(300)
        if self.place.ray_holds is not None:
            self.place.ray_holds.auto.set()  # the stopped actor's hold file, released for the next launches
        assert code == 130, f"{command} interrupted at {phase}: exit {code}\n{process.errors()[-3000:]}"
        assert "Traceback" not in process.errors(), process.errors()[-3000:]
        self.check_stopped()

    def _held(self, command: str, argv_of, phase: str, lr: float | None):
        """The command started held at `phase` (for the trial with learning rate `lr`); if the way it names the study is
        refused, noted, and started again with the other form. Returns the process and its hold."""
        for attempt, form in enumerate((self.cell.by, other_form(self.cell.by))):
            holds = self.tmp / f"holds-{command}-{attempt}"
            process = start_hooked(*argv_of(form), env={**self.env, **hold_env(holds, phase, lr)})
            try:
                (hold,) = wait_for_holds(holds, 1, process.alive)
            except AssertionError:
                if process.wait() != 1 or not process.errors().startswith("error:") or attempt:
                    raise AssertionError(f"{' '.join(argv_of(form))} ended (exit {process.wait()}) before {phase}: {process.errors()[-3000:]}") from None
                self.naming_problems[f"{' '.join(argv_of(form))}: {process.errors().strip()}"] = None
                continue
            assert hold["pid"] == process.pid
            return process, hold
        raise AssertionError("unreachable")

    def _held_on_ray(self, argv: list[str], lr: float):
        """A Ray launch held in its actor at the start of the trial with learning rate `lr` (the cluster's workers hold
        every trial at its start; one slot, so the trials come one after the other)."""
        holds = self.place.ray_holds
        holds.auto.clear()
        process = start_hooked(*argv, env=self.env)
        for _ in LEARNING_RATES:
            holds.wait(1, process)
            (held,) = holds.held()
            if json.loads(held.read_text())["lr"] == lr:
                return process
            holds.release_all()
        raise AssertionError(f"no trial with lr {lr} was held")

    def _assert_in_phase(self, command: str, phase: str, lr: float | None) -> None:
        """The study is where the hold says: the trial (of the launch or the companion) RUNNING with the epochs of its
        phase reported, the final run RUNNING with its epochs logged, or every trial of the launch done (report)."""
        epochs = 1 if phase == "epoch:1" else 0
        if command == "finalize":
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.place.tracking_uri())
            experiment = client.get_experiment_by_name(self.name)
            (final,) = client.search_runs([experiment.experiment_id], filter_string="tags.`study.role` = 'final' and attributes.status = 'RUNNING'")
            assert len(client.get_metric_history(final.info.run_id, "train_loss")) == epochs
            return
        trials = self.trials(self.name if command == "launch" else f"{self.name}.confirm")
        if phase == "report":
            assert all(t.state.is_finished() for t in trials) and len(trials) == TRIALS, [(t.number, t.state) for t in trials]
            return
        (running,) = [t for t in trials if t.state == TrialState.RUNNING]
        assert command != "launch" or running.params["lr"] == lr
        reported = len(running.intermediate_values) + len(running.user_attrs.get("val_curve", []))  # one of them: single or accuracy,cost
        assert reported == epochs, (reported, phase)

    def confirm(self) -> None:
        self.companion = True
        argv_of = functools.partial(self.command_argv, "confirm")
        if self.cell.stop == "confirm":
            self.interrupt("confirm", argv_of)
        self.run_named(argv_of, self.cell.by)
        self.check_written()

    def finalize(self) -> None:
        argv_of = functools.partial(self.command_argv, "finalize")
        if self.cell.stop == "finalize":
            self.interrupt("finalize", argv_of)
        self.run_named(argv_of, self.cell.by)
        self.check_written()
        self.place.reader.check("final", storage=self.place.reader_url(self.cell.storage), study_name=self.name, tracking_uri=self.place.tracking_uri())

    def show(self) -> None:
        for form in ("name", "path"):
            result = self.run_named(lambda f: ["show", self.ref(f), *self.storage_flag], form)
            assert f"study {self.name} " in result.stdout, result.stdout
        if self.companion:
            self.run(["show", f"{self.name}.confirm", *self.storage_flag])

    def export(self) -> None:
        forms = ("name", "path") if self.cell.by == "name" else ("path", "name")
        for form, suffix in zip(forms, (".csv", ".parquet")):
            path = self.tmp / f"{self.name}-by-{form}{suffix}"
            self.run_named(lambda f, path=path: ["export", self.ref(f), "-o", str(path), *self.storage_flag], form)
            self.place.reader.check("export", path=str(path), storage=self.place.reader_url(self.cell.storage), study_name=self.name,
                                    tracking_uri=self.place.tracking_uri())
        if self.companion:
            path = self.tmp / f"{self.name}.confirm.csv"
            self.run(["export", f"{self.name}.confirm", "-o", str(path), *self.storage_flag])
            self.place.reader.check("export", path=str(path), storage=self.place.reader_url(self.cell.storage), study_name=f"{self.name}.confirm",
                                    tracking_uri=self.place.tracking_uri())

    def report(self) -> None:
        path = self.tmp / f"{self.name}.html"
        companion = [f"{self.name}.confirm"] if self.companion else []
        self.run_named(lambda form: ["report", self.ref(form), *companion, "-o", str(path), *self.storage_flag], self.cell.by)
        self.place.reader.check("report", path=str(path), storage=self.place.reader_url(self.cell.storage), studies=self.studies())

    def worker_with_nothing_to_do(self) -> None:
        before = len(self.trials())
        self.run_named(functools.partial(self.command_argv, "worker"), self.cell.by)
        assert len(self.trials()) == before
        self.check_written()


def run_cell(cell: Cell, place: Place, tmp_path: Path, open_storage: Callable[[], optuna.storages.BaseStorage]) -> None:
    """Every step of the cell in order, each checked; then its figures for the README's Reliability table."""
    run = CellRun(cell, place, tmp_path, open_storage)
    run.launch()
    for step in ("confirm", "finalize", "show", "export", "report"):
        if step in cell.steps:
            getattr(run, step)()
    if "worker" in cell.steps:
        run.worker_with_nothing_to_do()  # checks, as after every step that can write
    else:
        run.check_written()  # the read-only steps changed nothing either side sees
    record_fault(f"matrix: {cell.storage}", 1, run.counts)
    if cell.stop:
        record_fault(f"matrix: Ctrl-C in {cell.stop}", 1, run.counts)
    if run.naming_problems:
        pytest.fail("a study's name or its spec's path refused:\n" + "\n".join(run.naming_problems))
