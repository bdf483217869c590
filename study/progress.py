"""What `launch`, `worker`, `confirm` and `finalize` show while they train: lines that read whole at 80 columns and wider.

    vgg_ratio ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 3 of 10 trials 0:04:12
      best val_accuracy 0.8432 (trial 2) · ~12.5 min left (predicted)
      trial 7: epoch 3 of 10, 41 s

The first line: the name, a bar that takes the width the other fields leave, how many of the total are done
and the time elapsed. The second: the command's fields (best so far, time left, budget), wrapped between
fields on a narrow terminal rather than cut short. Then one line per training in progress (`Training`), its
epoch and time so far. Lines printed through `console` appear above it.
On a terminal it redraws live; off one (a log file, captured output) it is printed once, as it ends, and each
training prints one plain line per finished epoch instead, so that a log shows life at least once an epoch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Self

from rich.cells import cell_len
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

SEPARATOR = " · "
INDENT = "  "


@dataclass
class Training:
    """One training in progress: its epochs done of `epochs`, the seconds it was predicted to take, and its clock."""

    label: str        # "trial 7", "confirm trial 2", "final training"
    epochs: int
    predicted: float  # seconds, the cost model's prediction for the whole training
    started: float = field(default_factory=time.monotonic)
    done: int = 0      # epochs finished
    last: float = 0.0  # seconds from its start to the end of its last finished epoch

    def elapsed(self, now: float) -> float:
        return now - self.started

    def expected(self, now: float) -> float:
        """Its whole time: at its own pace once an epoch finished, else as predicted; and once its current epoch has
        run longer than that pace allows, each epoch left as long as the current one so far, so that a training
        running over its prediction is expected to take longer the longer it runs."""
        pace = self.last * self.epochs / self.done if self.done else self.predicted
        return max(pace, self.last + (self.elapsed(now) - self.last) * (self.epochs - self.done))

    def line(self, now: float) -> str:
        return f"{self.label}: epoch {min(self.done + 1, self.epochs)} of {self.epochs}, {self.elapsed(now):.0f} s"


def seconds_left(running: list[Training], waiting: int, each: float, slots: int = 1, now: float | None = None) -> float:
    """The time left of `running` trainings and `waiting` ones not started, `slots` side by side. A waiting one takes
    `each` seconds, stretched by how much longer than predicted the running ones are expected to take."""
    now = time.monotonic() if now is None else now
    stretch = max([1.0, *(t.expected(now) / t.predicted for t in running if t.predicted > 0)])
    return (sum(t.expected(now) - t.elapsed(now) for t in running) + waiting * each * stretch) / slots


class Fields:
    """Fields joined by SEPARATOR, a new line started where the next field would pass the width; a field wider
    than the whole line wraps inside itself, never cut short."""

    def __init__(self, fields: list, running: list[Training]):
        self.fields, self.running = fields, running

    def __rich_console__(self, console, options):
        lines, line = [], ""
        # A field may be a function of the trainings in progress (the time left), computed at each redraw.
        for text in (f(self.running) if callable(f) else f for f in self.fields):
            joined = f"{line}{SEPARATOR}{text}" if line else f"{INDENT}{text}"
            if line and cell_len(joined) > options.max_width:
                lines.append(line)
                joined = f"{INDENT}{text}"
            line = joined
        # no_wrap and overflow set here: the commands' consoles print with soft wrap, which would cut nothing but
        # leave the terminal to break the line anywhere.
        now = time.monotonic()
        yield Text("\n".join([*lines, line, *(f"{INDENT}{t.line(now)}" for t in self.running)]), no_wrap=False, overflow="fold")


class _TwoLines(Progress):
    def get_renderables(self):
        for task in self.tasks:
            yield self.make_tasks_table([task])
            yield Fields(task.fields["status"], task.fields["trainings"]())


class LiveProgress:
    """The display of one task: `name`, done of `total` `units` ("trials", "epochs"), the status fields (strings, or
    functions of the trainings in progress), and the trainings in progress, which every command reports the same way.

        with LiveProgress(console, "vgg_ratio", "trials", total=10, done=3, status=["best -"]) as progress:
            progress.start(7, "trial 7", epochs=10, predicted=95.0)
            progress.epoch(7, 1, "val_accuracy 0.8123")   # off a terminal: "trial 7: epoch 1 of 10, 9 s, val_accuracy 0.8123"
            progress.finish(7)
            progress.console.print("trial 7: ...")   # above the display
            progress.update(done=4, status=["best val_accuracy 0.8432 (trial 7)", "~2.1 min left (predicted)"])
    """

    def __init__(self, console: Console, name: str, units: str, total: int, done: int = 0, status: list[str] | None = None):
        columns = (TextColumn("{task.description}", style="bold", markup=False),
                   # The only column without a width of its own: it takes what the others leave, down to nothing.
                   BarColumn(bar_width=None, table_column=Column(ratio=1, no_wrap=True)),
                   TextColumn(f"{{task.completed:.0f}} of {{task.total:.0f}} {units}", markup=False), TimeElapsedColumn())
        self.progress = _TwoLines(*columns, console=console, expand=True)
        self.running: dict = {}  # key (a trial number) -> Training, in the order they started
        self.lock = threading.Lock()  # trainings start and end in several threads (one per trial slot)
        self.task = self.progress.add_task(name, total=total, completed=done, status=list(status or []), trainings=self.trainings)

    @property
    def console(self) -> Console:
        return self.progress.console

    def start(self, key, label: str, epochs: int, predicted: float) -> None:
        with self.lock:
            self.running[key] = Training(label, epochs, predicted)

    def epoch(self, key, epoch: int, detail: str = "") -> None:
        """Training `key` finished `epoch`: shown live on a terminal; off one, one plain line (with `detail`, its metrics)."""
        now = time.monotonic()
        with self.lock:
            training = self.running[key]
            training.done, training.last = epoch, training.elapsed(now)
        if not self.console.is_terminal:
            self.console.print(f"{training.label}: epoch {epoch} of {training.epochs}, {training.last:.0f} s{', ' + detail if detail else ''}",
                               markup=False, highlight=False)
        self.progress.refresh()

    def finish(self, key) -> None:
        with self.lock:
            self.running.pop(key, None)

    def trainings(self) -> list[Training]:
        with self.lock:
            return list(self.running.values())

    def update(self, done: int | None = None, status: list | None = None) -> None:
        fields = {} if status is None else {"status": list(status)}
        self.progress.update(self.task, completed=done, **fields)

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
