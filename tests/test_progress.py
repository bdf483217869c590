"""What a long command shows while it trains: the progress display whole at 80 and 120 columns, the time a launch
predicts at its start and how that compared at its end, and the same display in `confirm` and `finalize`."""

from __future__ import annotations

import itertools
import re

import pytest
from rich.console import Console

from conftest import LENET, make_spec, run_main
from study.progress import LiveProgress

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
