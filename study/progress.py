"""What `launch`, `confirm` and `finalize` show while they train: two lines that read whole at 80 columns and wider.

    vgg_ratio ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 3 of 10 trials 0:04:12
      best val_accuracy 0.8432 (trial 2) · ~12.5 min left (predicted)

The first line: the name, a bar that takes the width the other fields leave, how many of the total are done
and the time elapsed. The second: the command's fields (best so far, time left, budget), wrapped between
fields on a narrow terminal rather than cut short. Lines printed through `console` appear above it.
On a terminal it redraws live; off one (a log file, captured output) it is printed once, as it ends.
"""

from __future__ import annotations

from typing import Self

from rich.cells import cell_len
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

SEPARATOR = " · "
INDENT = "  "


class Fields:
    """Fields joined by SEPARATOR, a new line started where the next field would pass the width; a field wider
    than the whole line wraps inside itself, never cut short."""

    def __init__(self, fields: list[str]):
        self.fields = fields

    def __rich_console__(self, console, options):
        lines, line = [], ""
        for field in self.fields:
            joined = f"{line}{SEPARATOR}{field}" if line else f"{INDENT}{field}"
            if line and cell_len(joined) > options.max_width:
                lines.append(line)
                joined = f"{INDENT}{field}"
            line = joined
        # no_wrap and overflow set here: the commands' consoles print with soft wrap, which would cut nothing but
        # leave the terminal to break the line anywhere.
        yield Text("\n".join([*lines, line]), no_wrap=False, overflow="fold")


class _TwoLines(Progress):
    def get_renderables(self):
        for task in self.tasks:
            yield self.make_tasks_table([task])
            yield Fields(task.fields["status"])


class LiveProgress:
    """The display of one task: `name`, done of `total` `units` ("trials", "epochs"), and the status fields.

        with LiveProgress(console, "vgg_ratio", "trials", total=10, done=3, status=["best -"]) as progress:
            progress.console.print("trial 3: ...")   # above the display
            progress.update(done=4, status=["best val_accuracy 0.8432 (trial 3)", "~2.1 min left (predicted)"])
    """

    def __init__(self, console: Console, name: str, units: str, total: int, done: int = 0, status: list[str] | None = None):
        columns = (TextColumn("{task.description}", style="bold", markup=False),
                   # The only column without a width of its own: it takes what the others leave, down to nothing.
                   BarColumn(bar_width=None, table_column=Column(ratio=1, no_wrap=True)),
                   TextColumn(f"{{task.completed:.0f}} of {{task.total:.0f}} {units}", markup=False), TimeElapsedColumn())
        self.progress = _TwoLines(*columns, console=console, expand=True)
        self.task = self.progress.add_task(name, total=total, completed=done, status=list(status or []))

    @property
    def console(self) -> Console:
        return self.progress.console

    def update(self, done: int | None = None, status: list[str] | None = None) -> None:
        fields = {} if status is None else {"status": list(status)}
        self.progress.update(self.task, completed=done, **fields)

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
