"""What a long command shows while it trains: the progress display whole at 80 and 120 columns, the time a launch
predicts at its start and how that compared at its end, and the same display in `confirm` and `finalize`."""

from __future__ import annotations

import itertools
import re

import pytest
from rich.console import Console

from conftest import LENET, make_spec, run_main
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
    spec = make_spec(tmp_path, "timed", LENET)
    result = run_main("launch", str(spec), "--trials", "2", "--budget", "30m", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # At its start: the trials' predicted time here, from the cost model, and what the budget holds.
    number = r"[0-9.]+ (?:s|min|h)"
    assert re.search(rf"^predicted time: 2 trials in about {number} \([0-9.e+]+ training FLOPs each at [0-9.e+]+ FLOP/s, "
                     r"a prior for [^,]+, where no trial of lenet has run yet\); --budget 30\.0 min holds all of them$", out, re.MULTILINE), out
    # At its end: what they took against that prediction.
    assert re.search(rf"^time: 2 trials took {number}, predicted {number} at the start \([0-9.]+× the prediction\)$", out, re.MULTILINE), out
    # The progress display, whole at 80 columns: trial n of N, best so far, time left named as predicted, the budget.
    lines = _progress_lines(out, "timed")
    _check_whole(lines, 80, ["2 of 2 trials", "best val_accuracy", "left (predicted)", "budget"])

    # A second launch of the study predicts from the throughput its trials measured.
    again = run_main("launch", str(spec), "--trials", "3", env={"COLUMNS": "120"})
    assert again.returncode == 0, again.stderr
    assert re.search(r"^predicted time: 1 trial in about .*, measured by this study's trials on [^)]+\)$", again.stdout, re.MULTILINE), again.stdout
    _check_whole(_progress_lines(again.stdout, "timed"), 120, ["3 of 3 trials", "best val_accuracy", "left (predicted)"])


def test_confirm_and_finalize_show_the_same_progress(study_home, tmp_path):
    spec = make_spec(tmp_path, "decided", LENET)
    assert run_main("launch", str(spec), "--trials", "2").returncode == 0
    env = {"COLUMNS": "80"}

    confirm = run_main("confirm", str(spec), "--top", "1", "--seeds", "2", env=env)
    assert confirm.returncode == 0, confirm.stderr
    assert re.search(r"^predicted time: 2 trainings in about .*, measured by this study's trials on [^)]+\)$", confirm.stdout, re.MULTILINE)
    _check_whole(_progress_lines(confirm.stdout, "decided.confirm"), 80, ["2 of 2 trainings", "best val_accuracy", "left (predicted)"])
    assert re.search(r"^time: 2 trainings took .*× the prediction\)$", confirm.stdout, re.MULTILINE), confirm.stdout

    final = run_main("finalize", "decided", env=env)
    assert final.returncode == 0, final.stderr
    assert re.search(r"^predicted time: 1 training in about .*, measured by this study's trials on [^)]+\)$", final.stdout, re.MULTILINE)
    _check_whole(_progress_lines(final.stdout, "decided final"), 80, ["1 of 1 epochs", "train_accuracy", "left (predicted)"])
    assert re.search(r"^time: 1 training took .*× the prediction\)$", final.stdout, re.MULTILINE), final.stdout


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
