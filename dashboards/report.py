"""Self-contained HTML reports from Optuna studies and their MLflow runs.

One file, plotly.js inlined, opens offline. Sections: summary, accuracy against
training cost with the Pareto front, optimisation history, learning curves of the
best trials, and a sortable table of every trial with a link to its MLflow run.
"""

from __future__ import annotations

import html
from pathlib import Path

import optuna
import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

COST_AXES = {
    "train_seconds": "training time (s, log scale)",
    "train_flops": "training FLOPs (log scale)",
    "peak_memory_bytes": "peak memory (bytes, log scale)",
}
LEARNING_CURVES = 5  # best trials drawn in the learning-curve section


def trials_frame(studies: list[optuna.Study]) -> pd.DataFrame:
    """One row per trial of every study: state, params, final metrics and the MLflow run id."""
    rows = []
    for study in studies:
        for trial in study.get_trials(deepcopy=False):
            attrs = trial.user_attrs
            rows.append({
                "study": study.study_name,
                "trial": trial.number,
                "state": trial.state.name,
                # A pruned trial's value is the last val_accuracy it reported.
                "val_accuracy": trial.values[0] if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) else None,
                "arch": attrs.get("arch"),
                **{f"param_{k}": v for k, v in trial.params.items()},
                "resize": attrs.get("resize"),
                **{k: attrs.get(k) for k in ("test_accuracy", "train_seconds", "train_flops", "peak_memory_bytes", "flops_per_example", "params", "epochs_run", "device")},
                "fail_reason": attrs.get("fail_reason"),
                "mlflow_run_id": attrs.get("mlflow_run_id"),
                "intermediate": dict(trial.intermediate_values),
            })
    return pd.DataFrame(rows)


def pareto_front(frame: pd.DataFrame, cost: str) -> pd.DataFrame:
    """Trials no other trial beats on both accuracy (higher) and cost (lower)."""
    points = frame.dropna(subset=["val_accuracy", cost]).sort_values([cost, "val_accuracy"], ascending=[True, False])
    front, best = [], -1.0
    for index, row in points.iterrows():
        if row["val_accuracy"] > best:
            front.append(index)
            best = row["val_accuracy"]
    return points.loc[front]


def _run_url(ui_url: str, experiment_ids: dict[str, str], row) -> str:
    if not row["mlflow_run_id"] or row["study"] not in experiment_ids:
        return ""
    return f"{ui_url}/#/experiments/{experiment_ids[row['study']]}/runs/{row['mlflow_run_id']}"


def cost_figure(frame: pd.DataFrame, cost: str = "train_seconds") -> go.Figure:
    finished = frame[frame["state"].isin(["COMPLETE", "PRUNED"])].dropna(subset=["val_accuracy", cost])
    fig = go.Figure()
    for (study, arch), group in finished.groupby(["study", "arch"], dropna=False):
        params = [c for c in group.columns if c.startswith("param_")]
        hover = group.apply(lambda r, params=params: "<br>".join([f"trial {r['trial']} ({r['state']})"] + [f"{p[6:]}={_format(r[p])}" for p in params if pd.notna(r[p])]), axis=1)
        fig.add_trace(go.Scatter(
            x=group[cost], y=group["val_accuracy"], mode="markers", name=f"{arch} ({study})" if frame["study"].nunique() > 1 else str(arch),
            marker={"size": 9, "opacity": [1.0 if s == "COMPLETE" else 0.35 for s in group["state"]]},
            text=hover, customdata=group["run_url"], hovertemplate="%{text}<br>val_accuracy=%{y:.4f}<br>%{x:.3g}<extra></extra>",
        ))
    front = pareto_front(finished[finished["state"] == "COMPLETE"], cost)
    if len(front):
        fig.add_trace(go.Scatter(x=front[cost], y=front["val_accuracy"], mode="lines", line={"dash": "dash", "color": "black", "shape": "hv"},
                                 name="Pareto front", hoverinfo="skip"))
    fig.update_layout(title="Validation accuracy against training cost (faded: pruned; click a point to open its MLflow run)",
                      xaxis_title=COST_AXES[cost], yaxis_title="validation accuracy", xaxis_type="log", yaxis_range=[0, 1.02], template="plotly_white")
    return fig


def history_figure(frame: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for study, group in frame.groupby("study"):
        done = group[group["state"] == "COMPLETE"].sort_values("trial")
        fig.add_trace(go.Scatter(x=done["trial"], y=done["val_accuracy"], mode="markers", name=f"{study}: trial"))
        fig.add_trace(go.Scatter(x=done["trial"], y=done["val_accuracy"].cummax(), mode="lines", name=f"{study}: best so far"))
    fig.update_layout(title="Optimisation history", xaxis_title="trial number", yaxis_title="validation accuracy", yaxis_range=[0, 1.02], template="plotly_white")
    return fig


def learning_curves_figure(frame: pd.DataFrame, client: MlflowClient | None) -> go.Figure:
    fig = go.Figure()
    best = frame[frame["state"] == "COMPLETE"].nlargest(LEARNING_CURVES, "val_accuracy")
    for (_, row), color in zip(best.iterrows(), plotly.colors.qualitative.Plotly, strict=False):
        epochs = sorted(row["intermediate"])
        label = f"{row['study']} trial {row['trial']}"
        fig.add_trace(go.Scatter(x=epochs, y=[row["intermediate"][e] for e in epochs], mode="lines+markers", line={"color": color},
                                 name=f"{label}: val_accuracy", legendgroup=label))
        if client is not None and row["mlflow_run_id"]:
            losses = sorted(client.get_metric_history(row["mlflow_run_id"], "train_loss"), key=lambda m: m.step)
            fig.add_trace(go.Scatter(x=[m.step for m in losses], y=[m.value for m in losses], mode="lines", line={"dash": "dot", "color": color},
                                     name=f"{label}: train_loss", yaxis="y2", legendgroup=label))
    fig.update_layout(title=f"Learning curves of the {LEARNING_CURVES} best trials", xaxis_title="epoch", yaxis_title="validation accuracy", yaxis_range=[0, 1.02],
                      xaxis_dtick=1, yaxis2={"title": "training loss (dotted)", "overlaying": "y", "side": "right"},
                      legend={"orientation": "h", "y": -0.25}, template="plotly_white")
    return fig


def _format(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(frame: pd.DataFrame) -> str:
    params = sorted(c for c in frame.columns if c.startswith("param_"))
    # resize shows once: as a param when searched, else as the resolved value.
    columns = ["study", "trial", "state", "arch", *params, *([] if "param_resize" in params else ["resize"]), "val_accuracy", "test_accuracy",
               "train_seconds", "train_flops", "peak_memory_bytes", "epochs_run", "fail_reason"]
    head = "".join(f"<th>{html.escape(c.removeprefix('param_'))}</th>" for c in columns) + "<th>MLflow</th>"
    body = []
    for _, row in frame.iterrows():
        cells = []
        for c in columns:
            value = row.get(c)
            text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else _format(value)
            cells.append(f"<td>{html.escape(text)}</td>")
        link = f"<a href=\"{html.escape(row['run_url'])}\">run</a>" if row["run_url"] else ""
        body.append(f"<tr>{''.join(cells)}<td>{link}</td></tr>")
    return f"<table id=\"trials\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _summary(frame: pd.DataFrame) -> str:
    items = []
    for study, group in frame.groupby("study"):
        counts = ", ".join(f"{n} {state}" for state, n in group["state"].value_counts().items())
        done = group[group["state"] == "COMPLETE"]
        best = ""
        if len(done):
            top = done.loc[done["val_accuracy"].idxmax()]
            params = ", ".join(f"{c[6:]}={_format(top[c])}" for c in done.columns if c.startswith("param_") and pd.notna(top[c]))
            best = f"; best trial {top['trial']}: val_accuracy {top['val_accuracy']:.4f}, test_accuracy {top['test_accuracy']:.4f} ({params}) on {top['device']}"
        seconds = group["train_seconds"].fillna(0).sum()
        items.append(f"<li><b>{html.escape(study)}</b>: {len(group)} trials ({counts}); {seconds:.0f} s of training{html.escape(best)}</li>")
    return f"<ul>{''.join(items)}</ul>"


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85rem; width: 100%; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; }}
th {{ cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }}
.empty {{ color: #777; font-style: italic; }}
</style></head><body>
<h1>{title}</h1>
<section id="summary"><h2>Summary</h2>{summary}</section>
{sections}
<section id="table"><h2>All trials</h2><p>Click a column header to sort.</p>{table}</section>
<script>
// Click a point to open its MLflow run; click a header to sort the table.
document.querySelectorAll('.plotly-graph-div').forEach(function (plot) {{
  plot.on && plot.on('plotly_click', function (event) {{
    var url = event.points[0].customdata; if (url) window.open(url, '_blank');
  }});
}});
document.querySelectorAll('#trials th').forEach(function (th, column) {{
  th.addEventListener('click', function () {{
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var ascending = th.dataset.order !== 'asc'; th.dataset.order = ascending ? 'asc' : 'desc';
    rows.sort(function (a, b) {{
      var x = a.cells[column].textContent, y = b.cells[column].textContent, nx = parseFloat(x), ny = parseFloat(y);
      var order = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return ascending ? order : -order;
    }});
    rows.forEach(function (row) {{ body.appendChild(row); }});
  }});
}});
</script>
</body></html>
"""


def write_report(studies: list[optuna.Study], path: Path, tracking_uri: str | None = None, ui_url: str = "http://127.0.0.1:5000") -> Path:
    """Write the HTML report for `studies` to `path` and return the path."""
    client = MlflowClient(tracking_uri=tracking_uri) if tracking_uri else None
    experiment_ids = {}
    if client is not None:
        for study in studies:
            experiment = client.get_experiment_by_name(study.study_name)
            if experiment is not None:
                experiment_ids[study.study_name] = experiment.experiment_id
    frame = trials_frame(studies)
    title = f"Study report: {', '.join(s.study_name for s in studies)}"
    if frame.empty:
        sections, table = '<p class="empty">No trials yet.</p>', ""
    else:
        frame["run_url"] = frame.apply(lambda row: _run_url(ui_url, experiment_ids, row), axis=1)
        figures = [("cost", cost_figure(frame)), ("history", history_figure(frame)), ("curves", learning_curves_figure(frame, client))]
        sections = ""
        for index, (name, figure) in enumerate(figures):
            # plotly.js is inlined once, with the first figure, so the file opens offline.
            div = figure.to_html(full_html=False, include_plotlyjs=index == 0, div_id=f"plot-{name}", config={"responsive": True})
            sections += f'<section id="{name}">{div}</section>\n'
        table = _table(frame)
    page = PAGE.format(title=html.escape(title), summary=_summary(frame) if not frame.empty else "", sections=sections, table=table)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".html.tmp")
    temporary.write_text(page, encoding="utf-8")
    temporary.replace(path)  # never leave a half-written report behind
    return path
