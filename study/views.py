"""What `show` adds for the decisions after a search: the confirmed ranking and the cost model's error."""

from __future__ import annotations

import re

import optuna
from rich import box
from rich.console import Console
from rich.table import Table

import records
from dashboards.confirmed import NOISE_LEVEL, TEST_NAME, Confirmed, verdict
from study.budget import median_abs, prediction_errors


def table(console: Console, title: str, columns: list[str], rows: list[list[str]]) -> Table:
    """A table in full when it fits the terminal; else its headers wrap between words and after their underscores
    rather than being cut short."""
    for wrap in (False, True):
        shown = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for column in columns:
            shown.add_column(column.replace("_", "_\n") if wrap else column, justify="right",
                             min_width=max(len(part) for part in re.split(r"[_ ]", column)))
        for row in rows:
            shown.add_row(*row)
        if console.measure(shown, options=console.options.update(max_width=10_000)).maximum <= console.width:  # its natural width
            break
    return shown


def print_confirmed(console: Console, rows: list[Confirmed]) -> None:
    """The confirmed ranking: mean ± standard deviation over seeds, and whether each is within the noise of the best."""
    if not rows:
        return
    cells = []
    for rank, row in enumerate(rows, 1):
        p = "" if row.p_value is None else f"{row.p_value:.3f}"
        noise = "best" if rank == 1 else (f"within noise (p >= {NOISE_LEVEL})" if row.within_noise else "worse (p < 0.05)")
        cells.append([str(rank), str(row.trial), str(row.search_rank), str(len(row.val)), f"{row.val_mean:.4f} ± {row.val_std:.4f}",
                      f"{row.test_mean:.4f} ± {row.test_std:.4f}", p, noise])
    console.print(table(console, f"confirmed ranking: mean ± standard deviation over seeds; {TEST_NAME}",
                        ["confirmed rank", "trial", "search rank", "seeds", "val_accuracy", "test_accuracy", "p (Welch)", "vs best"], cells))
    console.print(verdict(rows))


def print_costs(console: Console, study: optuna.Study, top: int) -> None:
    """Predicted against measured cost of the study's trials, and the model's median error."""
    trials = [t for t in study.get_trials(deepcopy=False) if records.PREDICTED_FLOPS in t.user_attrs and "train_flops" in t.user_attrs]
    if not trials:
        return
    table = Table(title=f"cost model: predicted before each trial against measured (last {records.count(min(top, len(trials)), 'trial')})")
    for column in ("trial", "state", "predicted FLOPs", "measured FLOPs", "predicted s", "measured s (wall)"):
        table.add_column(column, justify="right")
    for t in trials[-top:]:
        attrs = t.user_attrs
        table.add_row(str(t.number), t.state.name, f"{attrs[records.PREDICTED_FLOPS]:.3g}", f"{attrs['train_flops']:.3g}",
                      f"{attrs[records.PREDICTED_SECONDS]:.1f}", f"{attrs['wall_seconds']:.1f}")
    console.print(table)
    errors = prediction_errors(study.get_trials(deepcopy=False))
    parts = [f"{what} {value:.0%}" for what, values in errors.items() if (value := median_abs(values)) is not None]
    if parts:
        console.print(f"cost model, median absolute error ({records.count(len(errors['flops']), 'complete trial')}): {', '.join(parts)}")
