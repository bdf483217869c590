"""Self-contained HTML reports from Optuna studies and their MLflow runs.

One file, plotly.js inlined once, opens offline. Sections: summary; accuracy against training
cost (buttons switch the cost axis) with the Pareto front; the 224 versus 28-px AlexNet
comparison; learning curves; the search (history, parameter importance, parallel coordinates,
slices); per-layer cost of the best configuration; a sortable, filterable table of every trial
with a link to its MLflow run. `png_dir` also writes every figure as a PNG (kaleido + Chromium).

The per-layer section imports `objectives.inspect`, the cost-analysis module: it builds the
network on the CPU and counts FLOPs and activation bytes; it trains nothing and loads no data.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import optuna
import pandas as pd
import plotly.graph_objects as go
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.study import StudyDirection
from optuna.trial import TrialState

import records
from dashboards import figures
from dashboards.decisions import confirmed_section, cost_model_section
from dashboards.figures import COST_AXES, format_value
from dashboards.files import WriteError, write_whole
from dashboards.masking import mask
from dashboards.section import Section

CONFIG_SHOWN = ("arch", "resize", "ratio", "lr", "epochs", "batch_size", "momentum")  # a best trial's configuration, in this order
ALEXNET_PAIR = ("alexnet", "alexnet_28")  # the original and note 004's 28-px variant
# Optuna draws these plots in white-to-blue, where the lowest values vanish into the page; viridis runs from
# dark purple to yellow, every point visible on white.
COLOUR_SCALE = "Viridis"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


# The epoch metrics the learning-curve figure draws (objectives.train.metric): validation accuracy from the Optuna
# trial (records.val_curve), the others from MLflow; and those whose last value the table of trials shows.
MLFLOW_CURVES = tuple(name for name in records.EPOCH_METRICS if records.epoch_metric(name)["curve"] and name != "val_accuracy")
TABLE_METRICS = tuple(name for name in records.EPOCH_METRICS if records.epoch_metric(name)["column"])


def accuracy_index(study: optuna.Study) -> int:
    """Which of the study's objectives is validation accuracy: the first one maximised."""
    return next((i for i, d in enumerate(study.directions) if d == StudyDirection.MAXIMIZE), 0)


def _accuracy(trial: optuna.trial.FrozenTrial, index: int) -> float | None:
    if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
        return None
    if trial.values is not None:
        return trial.values[index]  # a pruned single-objective trial keeps the last val_accuracy it reported
    return records.last_val_accuracy(trial)  # Optuna stores no values for a pruned trial of a multi-objective study


def trials_frame(studies: list[optuna.Study]) -> pd.DataFrame:
    """One row per trial of every study: state, params, final metrics and the MLflow run id."""
    rows = []
    for study in studies:
        index = accuracy_index(study)
        for trial in study.get_trials(deepcopy=False):
            attrs, config = records.user_attrs(trial), records.config(trial)
            last = {name: values[max(values)] for name, values in records.epoch_values(trial).items() if values}
            rows.append({
                "study": study.study_name,
                "trial": trial.number,
                "state": trial.state.name,
                # Each epoch metric's last value; the trial's value and its recorded results, set below, take precedence.
                **{name: last.get(name) for name in records.EPOCH_METRICS},
                "val_accuracy": _accuracy(trial, index),
                "arch": config.get("arch"),
                **{f"params_{k}": v for k, v in trial.params.items()},
                "resize": config.get("resize"),
                **{k: attrs.get(k) for k in (*records.RESULT_FIELDS, records.DEVICE, records.PEAK_MEMORY_SOURCE, records.PREDICTED_FLOPS, records.PREDICTED_SECONDS)},
                "fail_reason": attrs.get(records.FAIL_REASON),
                "mlflow_run_id": attrs.get(records.MLFLOW_RUN_ID),
                "config": config,
                "intermediate": records.val_curve(trial),
            })
    frame = pd.DataFrame(rows)
    if not frame.empty:
        for column in (*records.EPOCH_METRICS, *records.RESULT_FIELDS, records.PREDICTED_FLOPS, records.PREDICTED_SECONDS):
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
        frame["seconds_per_epoch"] = frame["train_seconds"] / frame["epochs_run"]
        # CPU trials recorded before the per-trial measure hold the process's all-time peak (ru_maxrss), which
        # grows from trial to trial: no figure of theirs to compare.
        process_wide = frame[records.PEAK_MEMORY_SOURCE].isna() & (frame["device"] == "cpu")
        frame.loc[process_wide, "peak_memory_bytes"] = float("nan")
    return frame


class Mlflow:
    """What the report reads from MLflow; every lookup degrades to nothing when a run or the store is missing."""

    def __init__(self, tracking_uri: str | None, ui_url: str, studies: list[optuna.Study]):
        self.client = MlflowClient(tracking_uri=tracking_uri) if tracking_uri else None
        self.ui_url = ui_url
        self.experiment_ids = {}
        self.stopped: str | None = None  # why MLflow was asked no more, once it failed a request part-way
        self.trial_run_ids: dict[tuple[str, int], str] = {}  # (study, trial number) -> run id, as MLflow holds them
        for study in studies if self.client else []:
            experiment = self.client.get_experiment_by_name(study.study_name)
            if experiment is not None:
                self.experiment_ids[study.study_name] = experiment.experiment_id
                for number, run in records.live_trial_runs(self.client, experiment.experiment_id, study.user_attrs.get(records.STUDY_UID)).items():
                    self.trial_run_ids[(study.study_name, number)] = run.info.run_id

    def run_id(self, row) -> str | None:
        """The trial's run as MLflow holds it under the study's parent (also one rebuilt after the trial, whose id
        the finished trial cannot record), else the id the trial recorded."""
        return self.trial_run_ids.get((row["study"], row["trial"])) or row["mlflow_run_id"]

    def run_url(self, row) -> str:
        if not row["mlflow_run_id"] or row["study"] not in self.experiment_ids:
            return ""
        # workflowType: MLflow 3's UI shows the run in its model-training view, not the GenAI one it starts in.
        return f"{self.ui_url}/#/experiments/{self.experiment_ids[row['study']]}/runs/{row['mlflow_run_id']}?workflowType=machine_learning"

    def curves(self, run_ids) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """Each run's (epoch, value) points of every curve MLflow holds for the report (MLFLOW_CURVES). A run the store
        does not hold is skipped; once MLflow fails a request otherwise (it stopped answering after the report began),
        it is asked nothing more: each request waits its bounded time, which a hundred drawn trials would multiply.
        `self.stopped` then says why."""
        found = {}
        for run_id in run_ids if self.client else []:
            try:
                found[run_id] = {name: sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, name)) for name in MLFLOW_CURVES}
            except MlflowException as error:
                if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                    continue
                self.stopped = mask(error.message.splitlines()[0])[:300]  # it names the tracking URI
                break
        return found


def _best(group: pd.DataFrame):
    done = group[group["state"] == "COMPLETE"].dropna(subset=["val_accuracy"])
    return done.loc[done["val_accuracy"].idxmax()] if len(done) else None


def _config(row) -> dict:
    """The best trial's configuration as it trained (recorded on the trial), the settings a reader compares first."""
    return {k: row["config"][k] for k in CONFIG_SHOWN if row["config"].get(k) is not None}


def _bytes(n) -> str:
    return "" if pd.isna(n) else f"{n / 2**20:,.0f} MiB"


def _seconds(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 120 else f"{s:.1f} s"


def summary_section(studies: list[optuna.Study], frame: pd.DataFrame) -> Section:
    section = Section("summary", "Summary")
    if frame.empty:
        return section.note("No trials yet: launch the study first.")
    counts = ", ".join(f"{n} {state}" for state, n in frame["state"].value_counts().items())
    # Compute time: wall seconds of every trial that finished training, by device.
    by_device = frame.dropna(subset=["wall_seconds"]).groupby("device")["wall_seconds"].sum()
    compute = ", ".join(f"{_seconds(s)} on {device}" for device, s in by_device.items()) or "none recorded"
    for study in studies:
        for line in records.chance_warnings(study.get_trials(deepcopy=False), accuracy_index(study), study.user_attrs.get("preset")):
            prefix = f"{study.study_name}: " if len(studies) > 1 else ""
            section.parts.append(f'<p class="chance">{html.escape(prefix + line)}</p>')
    section.parts.append(f"<p><b>{len(studies)} stud{'y' if len(studies) == 1 else 'ies'}, {len(frame)} trials</b> ({counts}); "
                         f"compute time {html.escape(compute)}.</p>")
    head = "".join(f"<th>{h}</th>" for h in ("study", "preset", "objectives", "trials", "best trial", "val_accuracy", "test_accuracy",
                                               "configuration", "device", "training time"))
    body = []
    for study in studies:
        group = frame[frame["study"] == study.study_name]
        names = study.metric_names or ["val_accuracy" if i == accuracy_index(study) else f"objective {i}" for i in range(len(study.directions))]
        objectives = ", ".join(f"{'max' if d == StudyDirection.MAXIMIZE else 'min'} {n}" for d, n in zip(study.directions, names, strict=True))
        states = ", ".join(f"{n} {state}" for state, n in group["state"].value_counts().items()) or "none"
        best = _best(group) if len(group) else None
        if best is None:
            cells = ["none complete", "", "", "", ""]
        else:
            config = ", ".join(f"{k}={format_value(v)}" for k, v in _config(best).items())
            link = f' <a href="{html.escape(best["run_url"])}">MLflow run</a>' if best["run_url"] else ""
            cells = [f"{best['trial']}{link}", f"{best['val_accuracy']:.4f}", f"{best['test_accuracy']:.4f}", html.escape(config), html.escape(str(best["device"]))]
        time_spent = f"{_seconds(group['train_seconds'].sum())} training, {_seconds(group['wall_seconds'].sum())} wall"
        row = [html.escape(study.study_name), html.escape(str(study.user_attrs.get("preset", ""))), html.escape(objectives), states, *cells, time_spent]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    section.parts.append(f'<div class="scroll"><table class="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')
    return section


def cost_section(frame: pd.DataFrame, cost: str) -> Section:
    section = Section("cost", "Accuracy against training cost")
    finished = frame[frame["state"].isin(["COMPLETE", "PRUNED"])].dropna(subset=["val_accuracy"]) if not frame.empty else frame
    if finished.empty:
        return section.note("No complete or pruned trial yet, so nothing to plot.")
    section.parts.append("<p>The buttons above the plot switch the cost axis: training time, training FLOPs or peak memory. "
                         "One colour per architecture; with several studies, one marker symbol per study.</p>")
    section.parts.append(f"<p>Peak memory: {html.escape(figures.memory_measure(frame))}.</p>")
    section.parts.append(("plot-cost", figures.cost_figure(frame, cost)))
    return section


def alexnet_section(frame: pd.DataFrame) -> Section | None:
    """None, so that the report leaves the section out, when no study holds a complete trial of both architectures."""
    section = Section("alexnet", "")
    sizes: dict[str, set[int]] = {arch: set() for arch in ALEXNET_PAIR}  # the input sizes the compared trials trained at
    found = False
    for number, (study, group) in enumerate(frame.groupby("study", sort=False) if not frame.empty else []):
        original, variant = (_best(group[group["arch"] == arch]) for arch in ALEXNET_PAIR)
        if original is None or variant is None:
            continue
        found = True
        for arch, best in zip(ALEXNET_PAIR, (original, variant)):
            sizes[arch].add(int(best["resize"]))
        # (row, column, how to print it, higher is better)
        measures = [("validation accuracy", "val_accuracy", "{:.4f}", True), ("test accuracy", "test_accuracy", "{:.4f}", True),
                    ("seconds per epoch", "seconds_per_epoch", "{:.3g} s", False), ("forward FLOPs per example", "flops_per_example", "{:,.0f}", False),
                    ("parameters", "param_count", "{:,.0f}", False), ("peak memory", "peak_memory_bytes", None, False)]
        large, small = f"AlexNet at {original['resize']} px", f"the {variant['resize']}-px variant"
        head = f"<tr><th>measure</th><th>alexnet ({original['resize']} px), trial {original['trial']}</th>" \
               f"<th>alexnet_28 ({variant['resize']} px), trial {variant['trial']}</th><th>variant / original</th></tr>"
        body = []
        for name, column, pattern, _ in measures:
            a, b = original[column], variant[column]
            shown = [_bytes(v) if pattern is None else ("" if pd.isna(v) else pattern.format(v)) for v in (a, b)]
            ratio = f"{b / a:.2f}×" if pd.notna(a) and pd.notna(b) and a else ""
            body.append(f"<tr><td>{name}</td><td>{shown[0]}</td><td>{shown[1]}</td><td>{ratio}</td></tr>")
        for name, column in (("epochs trained", "epochs_run"), ("learning rate", "params_lr"), ("device", "device")):
            body.append(f"<tr><td>{name}</td><td>{html.escape(format_value(original.get(column)))}</td>"
                        f"<td>{html.escape(format_value(variant.get(column)))}</td><td></td></tr>")
        finding = (f"In {study}, {small} takes {variant['seconds_per_epoch'] / original['seconds_per_epoch']:.2f}× the seconds per epoch and "
                   f"{variant['flops_per_example'] / original['flops_per_example']:.2f}× the FLOPs per example of {large}, and reaches "
                   f"{variant['val_accuracy']:.4f} against {original['val_accuracy']:.4f} validation accuracy (best trial of each).")
        section.parts.append(f"<h3>{html.escape(study)}</h3><p>{html.escape(finding)}</p>")
        section.parts.append(f'<div class="scroll"><table class="compare">{head}{"".join(body)}</table></div>')
        section.note(f"Peak memory: {figures.memory_measure(group)}.")
        rows = [(name, original[column], variant[column], higher) for name, column, _, higher in measures]
        section.parts.append((f"plot-alexnet-{number}", figures.alexnet_figure(rows, small, large)))
    # The sizes that trained (the cpu preset runs AlexNet at 65 px, not the notes' 224).
    large, small = (" and ".join(map(str, sorted(sizes[arch]))) for arch in ALEXNET_PAIR)
    section.title = f"AlexNet at {large} px against the {small}-px variant"
    return section if found else None


def curves_section(frame: pd.DataFrame, mlflow: Mlflow) -> Section:
    section = Section("curves", "Learning curves")
    if frame.empty or not figures.has_curve(frame).any():
        return section.note("No trial has finished an epoch yet, so no learning curves.")
    wanted = []
    for _, group in frame.groupby("study", sort=False):
        wanted += [run_id for drawn in figures.curve_trials(group) for run_id in drawn["mlflow_run_id"]]
    wanted = [run_id for run_id in wanted if run_id]
    curves = mlflow.curves(wanted)
    kept = " and ".join(records.epoch_metric(name)["label"] for name in MLFLOW_CURVES)
    if mlflow.stopped:
        section.note(f"MLflow stopped answering while the report read the curves of {kept}, so {len(curves)} of {len(wanted)} "
                     f"drawn trials have theirs: {mlflow.stopped}")
    elif not curves:
        section.note(f"The curves of {kept} come from MLflow, which holds no runs for these trials; only validation accuracy is drawn.")
    section.parts.append(("plot-curves", figures.learning_curves_figure(frame, curves)))
    return section


def _importances(study: optuna.Study, target) -> dict[str, float] | str:
    """Optuna's parameter importances, or a sentence saying why there are none."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return f"{study.study_name}: parameter importance needs at least 2 complete trials; it has {len(complete)}."
    try:
        with warnings.catch_warnings():
            # With a target, Optuna's default evaluator asks for one to minimise, which -accuracy is; it warns regardless.
            warnings.filterwarnings("ignore", message=".*importances of params to achieve low `target` values")
            # Few trials: every trial falls in both quantiles, and the importances say so by being equal.
            warnings.filterwarnings("ignore", message="Target and region quantiles select the same set of trials")
            # A parameter of some architectures only (the zoo's resize) has a regime of few trials: the figure shows it.
            warnings.filterwarnings("ignore", message="Some regimes for parameter")
            values = optuna.importance.get_param_importances(study, target=target)
    except (ValueError, RuntimeError, ZeroDivisionError) as error:
        return f"{study.study_name}: Optuna could not compute parameter importances ({str(error).splitlines()[0]})."
    if not values:
        return f"{study.study_name}: no parameter varied between the complete trials, so none has an importance."
    return dict(values)


def search_section(studies: list[optuna.Study], frame: pd.DataFrame) -> Section:
    section = Section("search", "The search: history, parameter importance, parallel coordinates, slices")
    if frame.empty or not (frame["state"] == "COMPLETE").any():
        return section.note("No complete trial yet, so there is no search to show.")
    section.parts.append(("plot-history", figures.history_figure(frame)))
    importances = {}
    for study in studies:
        index = accuracy_index(study)
        found = _importances(study, None if len(study.directions) == 1 else (lambda t, index=index: -t.values[index]))
        if isinstance(found, str):
            section.note(found)
        else:
            importances[study.study_name] = found
    if importances:
        section.parts.append(("plot-importance", figures.importance_figure(importances)))
    for number, study in enumerate(studies):
        index = accuracy_index(study)
        target = None if len(study.directions) == 1 else (lambda t, index=index: t.values[index])
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete or not any(t.params for t in complete):
            section.note(f"{study.study_name}: no complete trial with parameters, so no parallel coordinates or slices.")
            continue
        parallel = optuna.visualization.plot_parallel_coordinate(study, target=target, target_name="validation accuracy")
        figures.recoloured(parallel, COLOUR_SCALE)
        section.parts.append((f"plot-parallel-{number}", figures.styled(
            parallel, f"Parallel coordinates of {study.study_name}'s complete trials (colour: validation accuracy)")))
        slices = optuna.visualization.plot_slice(study, target=target, target_name="validation accuracy (fraction)")
        figures.recoloured(slices, COLOUR_SCALE)
        section.parts.append((f"plot-slice-{number}", figures.styled(
            slices, f"Validation accuracy against each parameter in {study.study_name} (colour: trial number)", 440)))
    return section


def layers_section(frame: pd.DataFrame) -> Section:
    section = Section("layers", "Per-layer cost of the best configuration")
    if frame.empty or not (frame["state"] == "COMPLETE").any():
        return section.note("No complete trial yet, so no best configuration.")
    from objectives.inspect import layer_costs  # cost analysis only: builds the network on the CPU, trains nothing

    seen = set()
    for number, (study, group) in enumerate(frame.groupby("study", sort=False)):
        best = _best(group)
        if best is None:
            continue
        config = _config(best)
        if "arch" not in config:  # a study written by plain Optuna: params of its own, no network to measure
            section.note(f"{study}: best trial {best['trial']} records no architecture, so no per-layer cost.")
            continue
        arch, resize, ratio = config["arch"], config.get("resize"), config.get("ratio", 1)
        if (arch, resize, ratio) in seen:
            continue
        seen.add((arch, resize, ratio))
        try:
            rows = [dataclasses.asdict(row) for row in layer_costs(arch, resize, ratio)]
        except ValueError as error:
            section.note(f"{study}: cannot measure {arch} at {resize} px ({error}).")
            continue
        heaviest = max(rows, key=lambda r: r["flops"])
        share = heaviest["flops"] / sum(r["flops"] for r in rows)
        title = f"{study}, best trial {best['trial']}: {arch} at {resize} px, ratio {ratio} (forward pass of one example)"
        section.parts.append(f"<p>{html.escape(title)}: {sum(r['flops'] for r in rows):,} FLOPs in all; layer #{heaviest['index']} "
                             f"({heaviest['layer']}) does {share:.0%} of them.</p>")
        section.parts.append((f"plot-layers-{number}", figures.layers_figure(rows, title)))
    return section


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1e4:
        return f"{value:.4g}"
    return format_value(value)


def table_section(frame: pd.DataFrame) -> Section:
    section = Section("table", "All trials")
    if frame.empty:
        return section.note("No trials yet.")
    # arch and resize show once, as what ran (also when the spec fixes them or leaves resize to the architecture).
    params = sorted(c for c in frame.columns if c.startswith("params_") and c not in ("params_arch", "params_resize"))
    columns = ["study", "trial", "state", "arch", "resize", *params, *TABLE_METRICS, "test_accuracy",
               "train_seconds", "seconds_per_epoch", "train_flops", "flops_per_example", "param_count", "peak_memory_bytes", "epochs_run", "device", "fail_reason"]
    head = "".join(f"<th>{html.escape(c.removeprefix('params_'))}</th>" for c in columns) + "<th>MLflow</th>"
    body = []
    for _, row in frame.iterrows():
        cells = "".join(f"<td>{html.escape(_cell(row.get(c)))}</td>" for c in columns)
        link = f"<a href=\"{html.escape(row['run_url'])}\">run</a>" if row["run_url"] else ""
        body.append(f"<tr>{cells}<td>{link}</td></tr>")
    section.parts.append('<p><label>Filter: <input id="trial-filter" type="search" placeholder="e.g. COMPLETE alexnet" size="30"></label> '
                         f'<span id="trial-count">{len(frame)} of {len(frame)} trials</span>. Click a column header to sort.</p>')
    section.parts.append(f'<div class="scroll"><table id="trials"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')
    return section


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }}
nav a {{ margin-right: 1rem; }}
section {{ margin-bottom: 2rem; }}
.scroll {{ overflow: auto; max-height: 85vh; }}  /* its scroll bars on screen, not below the last of many rows */
table {{ border-collapse: collapse; font-size: 0.85rem; width: 100%; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; }}
table.summary td, table.compare td:first-child {{ text-align: left; }}
p.chance {{ background: #fff4e0; border-left: 4px solid #e69500; padding: .4em .7em; }}
th {{ background: #f4f4f4; position: sticky; top: 0; }}
#trials th {{ cursor: pointer; white-space: nowrap; }}
#trials th[data-order=asc]::after {{ content: " ▲"; }}
#trials th[data-order=desc]::after {{ content: " ▼"; }}
.note {{ color: #666; font-style: italic; }}
#trials td:nth-last-child(2) {{ text-align: left; min-width: 16rem; font-size: 0.75rem; }}  /* the fail reason */
</style></head><body>
<h1>{title}</h1>
<nav>{nav}</nav>
{sections}
<script>
// The MLflow UI the run links open: the one they were written for (the tracking server, or `study ui` at its default
// address), or the one `study ui` names when it prints this report's address with #mlflow=URL (it serves on --port).
var WRITTEN_FOR = {mlflow};
var SERVED_AT = ((location.hash.match(/^#mlflow=(https?:[^#\\s]+)$/) || [])[1] || '').replace(/\\/$/, '');
function runLink(url) {{
  return SERVED_AT && url.indexOf(WRITTEN_FOR + '/') === 0 ? decodeURIComponent(SERVED_AT) + url.slice(WRITTEN_FOR.length) : url;
}}
document.querySelectorAll('a[href]').forEach(function (a) {{ a.setAttribute('href', runLink(a.getAttribute('href'))); }});
// Click a point to open its MLflow run.
document.querySelectorAll('.plotly-graph-div').forEach(function (plot) {{
  plot.on && plot.on('plotly_click', function (event) {{
    var url = event.points[0].customdata; if (typeof url === 'string' && url) window.open(runLink(url), '_blank');
  }});
}});
// The trial table: click a header to sort (again to reverse); type in the filter to keep matching rows (all words must match).
(function () {{
  var table = document.getElementById('trials'); if (!table) return;
  var body = table.tBodies[0], rows = Array.from(body.rows);
  table.querySelectorAll('th').forEach(function (th, column) {{
    th.addEventListener('click', function () {{
      var ascending = th.dataset.order !== 'asc';
      table.querySelectorAll('th').forEach(function (other) {{ delete other.dataset.order; }});
      th.dataset.order = ascending ? 'asc' : 'desc';
      rows.sort(function (a, b) {{
        var x = a.cells[column].textContent, y = b.cells[column].textContent;
        if (x === '' || y === '') return (x === '') - (y === '');  // empty cells last, either way
        var nx = Number(x), ny = Number(y);
        var order = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return ascending ? order : -order;
      }});
      rows.forEach(function (row) {{ body.appendChild(row); }});
    }});
  }});
  var filter = document.getElementById('trial-filter'), count = document.getElementById('trial-count');
  filter.addEventListener('input', function () {{
    var words = filter.value.toLowerCase().split(/\\s+/).filter(Boolean), shown = 0;
    rows.forEach(function (row) {{
      var text = Array.from(row.cells).map(function (cell) {{ return cell.textContent; }}).join(' ').toLowerCase();
      var match = words.every(function (word) {{ return text.indexOf(word) >= 0; }});
      row.style.display = match ? '' : 'none'; shown += match;
    }});
    count.textContent = shown + ' of ' + rows.length + ' trials';
  }});
}})();
</script>
</body></html>
"""


def find_browser() -> str:
    """The Chrome or Chromium that kaleido drives for --png: $BROWSER_PATH, else the first found on PATH."""
    found = os.environ.get("BROWSER_PATH") or next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if not found or not Path(found).exists():
        raise ValueError("--png needs Chromium or Chrome to draw the figures: install chromium (apt-get install chromium) or set BROWSER_PATH")
    return found


def write_pngs(named: list[tuple[str, go.Figure]], directory: Path) -> list[Path]:
    """Every figure as a PNG at 1200 px width and twice the pixel density, for slides and papers.

    Kaleido writes files in place as it draws: it draws into a temporary directory beside them, from which each
    PNG is written whole (dashboards.files); the temporary directory goes whatever happens."""
    import kaleido

    try:
        drawn = Path(tempfile.mkdtemp(dir=directory, prefix=".png-", suffix=".tmp"))
    except OSError as error:
        raise WriteError(f"cannot write the PNGs in {directory}: {error.strerror or error}") from None
    try:
        specs = []
        for name, figure in named:
            still = go.Figure(figure).update_layout(updatemenus=[])  # buttons do nothing in a picture
            specs.append({"fig": still.to_dict(), "path": drawn / f"{name.removeprefix('plot-')}.png",
                          "opts": {"format": "png", "width": 1200, "height": figure.layout.height or figures.HEIGHT, "scale": 2}})
        # No MathJax: kaleido would fetch it from a CDN, and the figures use no LaTeX. Kaleido returns the errors of
        # the figures it could not write rather than raising them.
        errors = kaleido.write_fig_from_object_sync(specs, kopts={"mathjax": False, "path": find_browser()})
        for error in errors or ():
            if isinstance(error, OSError):
                raise WriteError(f"cannot write the PNGs in {directory}: {error.strerror or error}") from None
            raise error
        return [write_whole(directory / spec["path"].name, lambda out, spec=spec: out.write(spec["path"].read_bytes())) for spec in specs]
    finally:
        shutil.rmtree(drawn, ignore_errors=True)


def write_report(studies: list[optuna.Study], path: Path, tracking_uri: str | None = None, ui_url: str = "http://127.0.0.1:5000",
                 cost: str = "train_seconds", png_dir: Path | None = None) -> Path:
    """Write the HTML report for `studies` to `path` (and every figure to `png_dir` as PNG); return the path."""
    if cost not in COST_AXES:
        raise ValueError(f"cost axis {cost!r} is not one of {', '.join(COST_AXES)}")
    mlflow = Mlflow(tracking_uri, ui_url, studies)
    frame = trials_frame(studies)
    if not frame.empty:
        frame["mlflow_run_id"] = frame.apply(mlflow.run_id, axis=1)
        frame["run_url"] = frame.apply(mlflow.run_url, axis=1)
    sections = [summary_section(studies, frame), confirmed_section(studies), cost_section(frame, cost), cost_model_section(frame),
                alexnet_section(frame), curves_section(frame, mlflow), search_section(studies, frame), layers_section(frame), table_section(frame)]
    sections = [section for section in sections if section is not None]
    named = [part for section in sections for part in section.parts if isinstance(part, tuple)]
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
        write_pngs(named, png_dir)
    rendered, first = [], True
    for section in sections:
        parts = []
        for part in section.parts:
            if isinstance(part, tuple):
                # plotly.js is inlined once, with the first figure, so the file opens offline.
                part = part[1].to_html(full_html=False, include_plotlyjs=first, div_id=part[0], config={"responsive": True, "displaylogo": False})
                first = False
            parts.append(part)
        rendered.append(f'<section id="{section.id}"><h2>{html.escape(section.title)}</h2>\n{"".join(parts)}</section>')
    title = f"Study report: {', '.join(s.study_name for s in studies)}"
    nav = "".join(f'<a href="#{s.id}">{html.escape(s.title.split(":")[0])}</a>' for s in sections)
    page = PAGE.format(title=html.escape(title), nav=nav, sections="\n".join(rendered), mlflow=json.dumps(ui_url.rstrip("/")).replace("<", "\\u003c"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_whole(path, lambda out: out.write(page.encode("utf-8")))  # never a half-written report
