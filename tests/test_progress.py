"""What a long command shows while it trains: the progress display whole at 80 and 120 columns, the time a launch
predicts at its start and how that compared at its end, and the same display in `confirm` and `finalize`."""

from __future__ import annotations

import itertools
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from rich.console import Console

from conftest import LENET, ROOT, command_env, hold_env, journal, make_spec, release, run_main, wait_for_holds
from study.progress import LiveProgress, Training, seconds_left

# The longest fields the commands show: a study name from a spec file, a Pareto front, hours left, a budget.
FIELDS = ["best: Pareto front of 12 trials", "best val_accuracy 0.8432 (trial 12)", "~32.7 min left (predicted)",
          "~1.25 h left (predicted)", "budget 12.0 min of 30.0 min used"]


def _progress_lines(text: str, name: str) -> list[str]:
    """The progress display's lines in a command's output: its first line (the name and the bar), then the indented fields."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith(f"{name} "))
    end = start + 1
    while end < len(lines) and lines[end].startswith("  "):
        end += 1
    return lines[start:end]


def _check_whole(lines: list[str], width: int, fields: list[str]) -> None:
    assert all(len(line) <= width for line in lines), lines
    assert not any("…" in line for line in lines), lines  # rich's mark of a cut field
    for field in fields:
        assert any(field in line for line in lines), f"{field!r} is not whole in {lines}"
    words = " ".join(lines).split()
    assert not [a for a, b in itertools.pairwise(words) if a == b and a.isalpha()], lines  # no "left left"


@pytest.mark.parametrize("width", [80, 120])
def test_the_progress_display_reads_whole(width):
    console = Console(width=width, record=True, force_terminal=True, soft_wrap=True)  # soft wrap: as the commands' consoles print
    progress = LiveProgress(console, "googlenet_lr_epochs", "trials", total=50, done=12, status=FIELDS)
    console.print(progress.progress.get_renderable())
    lines = console.export_text().rstrip("\n").splitlines()
    _check_whole(lines, width, ["googlenet_lr_epochs", "12 of 50 trials", "0:00:00", *FIELDS])
    assert "━" in lines[0]  # the bar takes the room the fields leave
    if width == 120:
        assert len(lines) <= 3


def test_a_launch_says_its_predicted_time_and_how_it_compared(study_home, tmp_path):
    from objectives.train import TrainConfig
    from study.budget import CostModel, machine

    spec = make_spec(tmp_path, "timed", LENET)
    result = run_main("launch", str(spec), "--trials", "2", "--budget", "30m", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # A fresh study times this machine first, and predicts from those steps: not from a prior.
    here = machine("auto")
    assert re.search(rf"^timing this machine \({re.escape(here)}, [0-9]+ threads?\): lenet at 28 px, ratio 1, batch 64, fp32: [0-9.e-]+ s a training step",
                     out, re.MULTILINE), out
    number = r"[0-9.]+ (?:s|min|h)"
    assert re.search(rf"^predicted time: 2 trials in about {number} \({number} and [0-9.e+]+ training FLOPs each, from training steps timed on "
                     rf"{re.escape(here)}\); --budget 30\.0 min holds all of them$", out, re.MULTILINE), out
    # At its end: what they took against that prediction.
    assert re.search(rf"^time: 2 trials took {number}, predicted {number} at the start \([0-9.]+× the prediction, from training steps", out, re.MULTILINE), out
    # The progress display, whole at 80 columns: trial n of N, best so far, time left named as predicted, the budget.
    lines = _progress_lines(out, "timed")
    _check_whole(lines, 80, ["2 of 2 trials", "best val_accuracy", "left (predicted)", "budget"])
    # The timings are kept in the study, keyed by this machine; the first trial's predicted seconds are theirs, the same model.
    study = optuna.load_study(study_name="timed", storage=journal(study_home))
    timings = study.user_attrs[f"step_timing {here}"]
    assert [(t["arch"], t["resize"], t["batch_size"]) for t in timings] == [("lenet", 28, 64)]
    first = study.trials[0]
    threads = first.user_attrs["cpu_threads"]
    assert [t["threads"] for t in timings] == [threads]  # timed as the trial trains
    assert first.user_attrs["predicted_seconds"] == pytest.approx(CostModel(here, threads, tuple(timings)).timed_seconds(TrainConfig(**first.user_attrs["config"])))

    # A second launch reuses them, timing nothing, and scales them by what the study's trials measured here.
    again = run_main("launch", str(spec), "--trials", "3", env={"COLUMNS": "120"})
    assert again.returncode == 0, again.stderr
    assert "timing this machine" not in again.stdout, again.stdout
    assert re.search(rf"^predicted time: 1 trial in about .*, from training steps timed on {re.escape(here)}, scaled by the 2 trials measured there "
                     r"\(×[0-9.]+\)\)$", again.stdout, re.MULTILINE), again.stdout
    assert optuna.load_study(study_name="timed", storage=journal(study_home)).user_attrs[f"step_timing {here}"] == timings
    _check_whole(_progress_lines(again.stdout, "timed"), 120, ["3 of 3 trials", "best val_accuracy", "left (predicted)"])


def test_worker_processes_are_timed_with_their_share_of_the_cores(study_home, tmp_path):
    # The repro: with --workers the launcher timed the steps on all the cores while each worker process trains on its share
    # (study.pool.cpu_threads), so the start prediction was short by up to the number of workers.
    from study.budget import machine
    from study.pool import cpu_cores, cpu_threads

    if cpu_cores() < 2:
        pytest.skip("two worker processes need two cores")
    share = cpu_threads(2)
    spec = make_spec(tmp_path, "shared", LENET)
    result = run_main("launch", str(spec), "--trials", "2", "--workers", "2")
    assert result.returncode == 0, result.stderr
    here = machine("auto")
    assert f"timing this machine ({here}, {share} thread{'' if share == 1 else 's'}): lenet at 28 px" in result.stdout, result.stdout
    study = optuna.load_study(study_name="shared", storage=journal(study_home))
    assert [t["threads"] for t in study.user_attrs[f"step_timing {here}"]] == [share]
    assert [t.user_attrs["cpu_threads"] for t in study.trials] == [share, share]


def test_confirm_and_finalize_show_the_same_progress(study_home, tmp_path):
    spec = make_spec(tmp_path, "decided", LENET)
    assert run_main("launch", str(spec), "--trials", "2").returncode == 0
    env = {"COLUMNS": "80"}

    confirm = run_main("confirm", str(spec), "--top", "1", "--seeds", "2", env=env)
    assert confirm.returncode == 0, confirm.stderr
    assert "timing this machine" not in confirm.stdout, confirm.stdout  # the search study's timings of this machine
    assert re.search(r"^predicted time: 2 trainings in about .*, scaled by the 2 trials measured there \(×[0-9.]+\)\)$", confirm.stdout, re.MULTILINE), confirm.stdout
    _check_whole(_progress_lines(confirm.stdout, "decided.confirm"), 80, ["2 of 2 trainings", "best val_accuracy", "left (predicted)"])
    assert re.search(r"^time: 2 trainings took .*× the prediction, from training steps .*\)$", confirm.stdout, re.MULTILINE), confirm.stdout

    final = run_main("finalize", "decided", env=env)
    assert final.returncode == 0, final.stderr
    assert re.search(r"^predicted time: 1 training in about .*, scaled by the [0-9]+ trials measured there \(×[0-9.]+\)\)$", final.stdout, re.MULTILINE), final.stdout
    _check_whole(_progress_lines(final.stdout, "decided final"), 80, ["1 of 1 epochs", "train_accuracy", "left (predicted)"])
    assert re.search(r"^time: 1 training took .*× the prediction, from training steps .*\)$", final.stdout, re.MULTILINE), final.stdout


def test_a_training_over_its_prediction_makes_the_time_left_grow():
    # Predicted 10 s for 2 epochs; the first took 5 s, as predicted: 5 s left, and 2 waiting trainings of 10 s each.
    training = Training("trial 0", epochs=2, predicted=10.0, started=0.0, done=1, last=5.0)
    assert seconds_left([training], waiting=2, each=10.0, now=5.0) == pytest.approx(25.0)
    assert training.line(5.0) == "trial 0: epoch 2 of 2, 5 s"
    # On time within its pace, the time left falls as the clock runs...
    assert seconds_left([training], 2, 10.0, now=8.0) == pytest.approx(22.0)
    # ...and once its second epoch has run longer than its first, the longer it runs the more is left: it takes longer,
    # and so, by as much, will the trainings that wait.
    over = [seconds_left([training], 2, 10.0, now=now) for now in (11.0, 15.0, 30.0)]
    assert over == sorted(over) and over[0] < over[-1], over
    assert seconds_left([training], 2, 10.0, now=30.0) == pytest.approx(2 * 10.0 * 30.0 / 10.0)
    # Before its first epoch ends it is expected as predicted, then, past its prediction's first epoch, longer.
    fresh = Training("trial 1", epochs=4, predicted=8.0, started=0.0)
    assert seconds_left([fresh], 0, 0.0, now=1.0) == pytest.approx(7.0)
    assert seconds_left([fresh], 0, 0.0, now=4.0) == pytest.approx(12.0)


@pytest.mark.parametrize("width", [80, 120])
def test_the_trainings_in_progress_read_whole(width):
    console = Console(width=width, record=True, force_terminal=True, soft_wrap=True)
    progress = LiveProgress(console, "googlenet_lr_epochs", "trials", total=50, done=12, status=FIELDS)
    progress.start(12, "trial 12", epochs=10, predicted=60.0)
    progress.start(13, "confirm trial 13", epochs=100, predicted=600.0)
    progress.epoch(12, 3, "val_accuracy 0.8123")  # on a terminal: shown in the display, no line printed
    console.print(progress.progress.get_renderable())
    lines = console.export_text().rstrip("\n").splitlines()
    _check_whole(lines, width, ["trial 12: epoch 4 of 10, ", "confirm trial 13: epoch 1 of 100, 0 s", *FIELDS])
    assert not any("val_accuracy 0.8123" in line for line in lines)
    progress.finish(12)
    console.print(progress.progress.get_renderable())
    assert "trial 12:" not in console.export_text()


def _epoch_lines(out: str, label: str) -> list[str]:
    return re.findall(rf"^{label}: epoch (\d) of 2, \d+ s, (?:val_accuracy|train_loss) [0-9.]+.*$", out, re.MULTILINE)


def test_off_a_terminal_every_command_prints_a_line_per_epoch(study_home, tmp_path):
    spec = make_spec(tmp_path, "logged", LENET, fixed={"epochs": 2})
    env = {"COLUMNS": "80"}
    assert run_main("create", str(spec), "--trials", "1").returncode == 0
    worker = run_main("worker", str(spec), env=env)
    assert worker.returncode == 0, worker.stderr
    assert _epoch_lines(worker.stdout, "trial 0") == ["1", "2"], worker.stdout
    launch = run_main("launch", str(spec), "--trials", "2", env=env)
    assert launch.returncode == 0, launch.stderr
    assert _epoch_lines(launch.stdout, "trial 1") == ["1", "2"], launch.stdout
    # The epoch lines come before the trial's own line.
    assert launch.stdout.index("trial 1: epoch 2 of 2") < launch.stdout.index("trial 1: lr=")
    confirm = run_main("confirm", str(spec), "--top", "1", "--seeds", "1", env=env)
    assert confirm.returncode == 0, confirm.stderr
    assert _epoch_lines(confirm.stdout, "confirm trial 0") == ["1", "2"], confirm.stdout
    final = run_main("finalize", "logged", env=env)
    assert final.returncode == 0, final.stderr
    assert _epoch_lines(final.stdout, "final training") == ["1", "2"], final.stdout
    assert re.search(r"^final training: epoch 2 of 2, \d+ s, train_loss [0-9.]+, train_accuracy [0-9.]+$", final.stdout, re.MULTILINE)


class Terminal:
    """A real terminal of `width` columns (a tmux server of its own) in which commands run as a user runs them, with the
    trainer of tests/hooked_study.py, so that a test can look at the screen while a training is held mid-way."""

    def __init__(self, directory: Path, width: int):
        self.directory, self.width, self.sockets = directory, width, []

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sockets[-1], *args], capture_output=True, text=True, check=True, timeout=60).stdout

    def start(self, *args: str, env: dict) -> Path:
        """`python tests/hooked_study.py ARGS` in a new window; returns the file its exit status is written to."""
        self.sockets.append(f"study-test-{secrets.token_hex(4)}")  # a tmux server per command, whose screen is its own
        run = len(self.sockets)
        done = self.directory / f"run-{run}.rc"
        # The terminal's own TERM and size, not the tests' COLUMNS.
        variables = {k: v for k, v in command_env({**env, "COLUMNS": None, "LINES": None}).items() if k not in ("TERM", "TMUX")}
        variables["PYTHONPATH"] = f"{ROOT}:{ROOT / 'tests'}"
        script = self.directory / f"run-{run}.sh"
        script.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in variables.items() if k.isidentifier())
                          + f"cd {shlex.quote(str(ROOT))}\n"
                          + f"{shlex.quote(sys.executable)} tests/hooked_study.py {shlex.join(args)}\necho $? > {shlex.quote(str(done))}\nsleep 600\n")
        self.tmux("new-session", "-d", "-x", str(self.width), "-y", "50", f"bash {shlex.quote(str(script))}")
        return done

    def screen(self, joined: bool = False) -> str:
        """What the terminal shows, with its history; `joined`: lines the terminal itself wrapped joined again."""
        return self.tmux("capture-pane", "-p", "-S", "-500", *(["-J"] if joined else []))

    def wait_for(self, text: str, done: Path) -> str:
        deadline = time.monotonic() + 300  # a guard against a hang, not a speed limit
        while text not in (screen := self.screen()):
            assert not done.exists() and time.monotonic() < deadline, screen
            time.sleep(0.1)
        return screen

    def close(self) -> None:
        for socket in self.sockets:
            subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, check=False)


@pytest.fixture
def terminal_of(tmp_path):
    assert shutil.which("tmux"), "tmux not found: `make test` installs it (apt-get install tmux)"
    opened = []

    def open_terminal(width: int) -> Terminal:
        opened.append(Terminal(tmp_path, width))
        return opened[-1]

    yield open_terminal
    for terminal in opened:
        terminal.close()


def _held_screen(terminal: Terminal, holds: Path, args: list[str], shows: str, env: dict) -> str:
    """Run a command in the terminal, every training held after its first epoch; the screen while the first is held
    (once it shows `shows`), then release every hold until the command ends. Returns that screen."""
    done = terminal.start(*args, env={**env, **hold_env(holds, "epoch:1")})
    seen = len(list(holds.glob("*.json")))
    hold = wait_for_holds(holds, seen + 1, lambda: not done.exists())[-1]
    screen = terminal.wait_for(shows, done)
    released = {hold["path"]}
    release(hold)
    deadline = time.monotonic() + 300
    while not done.exists():
        for path in set(holds.glob("*.json")) - released:
            released.add(path)
            Path(f"{path}.release").touch()
        assert time.monotonic() < deadline, terminal.screen()
        time.sleep(0.1)
    assert done.read_text().strip() == "0", terminal.screen()
    return screen


@pytest.mark.slow
@pytest.mark.parametrize("width", [80, 120])
def test_in_a_terminal_every_command_shows_the_running_epoch(study_home, tmp_path, terminal_of, width):
    spec = make_spec(tmp_path, "watched", LENET, fixed={"epochs": 2})
    assert run_main("create", str(spec), "--trials", "1").returncode == 0
    terminal, holds, env = terminal_of(width), tmp_path / "holds", {"STUDY_HOME": str(study_home), "MLFLOW_TRACKING_URI": None}
    for args, name, running in ((["worker", str(spec)], "watched", "trial 0: epoch 2 of 2, "),
                                (["launch", str(spec), "--trials", "2"], "watched", "trial 1: epoch 2 of 2, "),
                                (["confirm", str(spec), "--top", "1", "--seeds", "1"], "watched.confirm", "confirm trial 0: epoch 2 of 2, "),
                                (["finalize", "watched"], "watched final", "final training: epoch 2 of 2, ")):
        screen = _held_screen(terminal, holds, args, running, env)
        lines = screen.rstrip("\n").splitlines()
        display = lines[max(i for i, line in enumerate(lines) if line.startswith(f"{name} ")):]
        # The display: its name and bar, its fields, then the training held in its second epoch, each line whole.
        assert any(line.startswith(f"  {running}") and re.fullmatch(r"\d+ s", line.split(", ")[-1]) for line in display), display
        assert any("left (predicted)" in line for line in display), display
        _check_whole(display, width, [running.rstrip(", ")])
        # Lines printed above it wrap between words, by rich, not mid-word by the terminal.
        assert [line.rstrip() for line in terminal.screen().splitlines()] == [line.rstrip() for line in terminal.screen(joined=True).splitlines()]
        assert "epoch 1 of 2" not in screen  # no plain epoch lines on a terminal: the display shows them


def test_a_retried_trial_says_whose_retry_it_is(study_home, tmp_path):
    spec = make_spec(tmp_path, "again", LENET)
    refused = run_main("launch", str(spec), "--trials", "1", "--budget", "1000")  # 1000 FLOPs: the first trial does not fit
    assert refused.returncode == 0, refused.stderr
    assert "budget reached after 0 trials" in refused.stdout, refused.stdout
    retried = run_main("launch", str(spec), "--trials", "1")
    assert retried.returncode == 0, retried.stderr
    assert re.search(r"^trial 1 \(retry of trial 0\): lr=[0-9.]+ -> COMPLETE", retried.stdout, re.MULTILINE), retried.stdout
