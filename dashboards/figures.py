"""The report's Plotly figures, each built from the trials frame (`dashboards.report.trials_frame`).

Every figure has a title, axis labels with units, and a fixed height so the page reads at laptop
width. One colour per architecture and one marker symbol per study, the same in every figure.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

import records

# Cost axes the reader can switch between: column -> (axis title, unit in hover text).
COST_AXES = {
    "train_seconds": ("training time (s, log scale)", "s"),
    "train_flops": ("training FLOPs (forward + backward, log scale)", "FLOPs"),
    "peak_memory_bytes": ("peak memory (bytes, log scale)", "bytes"),
}
# How each recorded peak_memory_source measured, as the report says it (objectives.memory.SOURCES).
MEMORY_SOURCES = {"cuda_max_allocated": "each trial's peak CUDA allocation",
                  "cpu_rss_above_start": "the resident memory each trial added on the CPU at its peak (sampled every 10 ms)"}
LEARNING_CURVES = 5  # best complete trials per study drawn in colour in the learning curves
OTHER_CURVES = 100  # other trials per study drawn (grey) at most: beyond that a grey mass that slows the page
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "cross", "star")
PALETTE = plotly.colors.qualitative.Plotly + plotly.colors.qualitative.D3
HEIGHT = 520
LAYOUT = {"template": "plotly_white", "height": HEIGHT, "margin": {"l": 70, "r": 30, "t": 90, "b": 70}, "title": {"x": 0.01}}


def arch_colours(frame: pd.DataFrame) -> dict[str, str]:
    return {arch: PALETTE[i % len(PALETTE)] for i, arch in enumerate(sorted(frame["arch"].dropna().unique()))}


def memory_measure(frame: pd.DataFrame) -> str:
    """What the peak memory figures of these trials measured, in words."""
    sources = sorted(frame.loc[frame["peak_memory_bytes"].notna(), "peak_memory_source"].dropna().unique()) if not frame.empty else []
    if not sources:
        return "not measured for these trials (CPU trials recorded only the process's all-time peak, which is not shown)"
    return " or ".join(MEMORY_SOURCES.get(source, source) for source in sources)


def axis_titles(frame: pd.DataFrame) -> dict[str, str]:
    """The cost axes' titles; the memory axis says what was measured."""
    titles = {axis: title for axis, (title, _) in COST_AXES.items()}
    sources = set(frame.loc[frame["peak_memory_bytes"].notna(), "peak_memory_source"].dropna()) if not frame.empty else set()
    if sources == {"cuda_max_allocated"}:
        titles["peak_memory_bytes"] = "peak CUDA allocation per trial (bytes, log scale)"
    elif sources == {"cpu_rss_above_start"}:
        titles["peak_memory_bytes"] = "peak resident memory added per trial, CPU (bytes, log scale)"
    elif sources:
        titles["peak_memory_bytes"] = "peak memory per trial: CUDA allocation or CPU resident memory added (bytes, log scale)"
    else:
        titles["peak_memory_bytes"] = "peak memory: not measured per trial here"
    return titles


def format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _nulls(values) -> list:
    """A column as a JSON-ready list: NaN and None become null, which Plotly leaves out."""
    return [None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values]


def pareto_front(frame: pd.DataFrame, cost: str) -> pd.DataFrame:
    """Trials no other trial beats on both accuracy (higher) and cost (lower), by increasing cost."""
    points = frame.dropna(subset=["val_accuracy", cost]).sort_values([cost, "val_accuracy"], ascending=[True, False])
    front, best = [], -1.0
    for index, row in points.iterrows():
        if row["val_accuracy"] > best:
            front.append(index)
            best = row["val_accuracy"]
    return points.loc[front]


def _hover(row) -> str:
    params = [f"{c.removeprefix('params_')}={format_value(row[c])}" for c in row.index if c.startswith("params_") and pd.notna(row[c])]
    costs = [f"{c}={row[c]:.3g} {unit}" for c, (_, unit) in COST_AXES.items() if pd.notna(row[c])]
    test = f", test {row['test_accuracy']:.4f}" if pd.notna(row["test_accuracy"]) else ""
    return "<br>".join([f"<b>{row['study']} trial {row['trial']}</b> ({row['state']}, {row['arch']} at {format_value(row['resize'])} px)",
                        ", ".join(params), f"val_accuracy {row['val_accuracy']:.4f}{test}", ", ".join(costs)])


def cost_figure(frame: pd.DataFrame, cost: str = "train_seconds") -> go.Figure:
    """Validation accuracy against a training cost, with buttons that switch the cost axis in the page."""
    finished = frame[frame["state"].isin(["COMPLETE", "PRUNED"])].dropna(subset=["val_accuracy"])
    colours, studies = arch_colours(frame), list(frame["study"].unique())
    several = len(studies) > 1
    fig = go.Figure()
    # Per trace, its points on each cost axis, for the buttons that switch the axis.
    xs, ys = {axis: [] for axis in COST_AXES}, {axis: [] for axis in COST_AXES}
    for (study, arch), group in finished.groupby(["study", "arch"], sort=True):
        fig.add_trace(go.Scatter(
            x=_nulls(group[cost]), y=group["val_accuracy"].tolist(), mode="markers",
            name=f"{arch} ({study})" if several else str(arch), legendgroup=str(arch),
            marker={"size": 10, "color": colours[arch], "symbol": SYMBOLS[studies.index(study) % len(SYMBOLS)],
                    "opacity": [1.0 if s == "COMPLETE" else 0.35 for s in group["state"]], "line": {"width": 1, "color": "white"}},
            text=group.apply(_hover, axis=1).tolist(), customdata=group["run_url"].tolist(), hovertemplate="%{text}<extra></extra>",
        ))
        for axis in COST_AXES:
            xs[axis].append(_nulls(group[axis]))
            ys[axis].append(group["val_accuracy"].tolist())
    # One front per study: studies may use different data subsets, so their points do not compete.
    complete = finished[finished["state"] == "COMPLETE"]
    for index, study in enumerate(studies):
        fronts = {axis: pareto_front(complete[complete["study"] == study], axis) for axis in COST_AXES}
        if not any(len(f) for f in fronts.values()):
            continue
        # Markers too: a front of one trial draws no line, in the plot or in its legend entry.
        fig.add_trace(go.Scatter(x=_nulls(fronts[cost][cost]), y=fronts[cost]["val_accuracy"].tolist(), mode="lines+markers",
                                 line={"dash": ("dash", "dot", "dashdot")[index % 3], "color": "#333", "shape": "hv"},
                                 marker={"symbol": "circle-open", "size": 14, "color": "#333"},
                                 name=f"Pareto front ({study})" if several else "Pareto front", hoverinfo="skip"))
        for axis in COST_AXES:
            xs[axis].append(_nulls(fronts[axis][axis]))
            ys[axis].append(fronts[axis]["val_accuracy"].tolist())
    titles = axis_titles(frame)
    buttons = [{"label": label.split(" (")[0], "method": "update", "args": [{"x": xs[axis], "y": ys[axis]}, {"xaxis.title.text": titles[axis]}]}
               for axis, (label, _) in COST_AXES.items()]
    fig.update_layout(
        **LAYOUT,
        title_text="Validation accuracy against training cost<br><sup>faded: pruned trials (accuracy when stopped); "
                   "dashed, ringed: Pareto front of complete trials; click a point to open its MLflow run</sup>",
        xaxis={"title": {"text": titles[cost]}, "type": "log"}, yaxis={"title": {"text": "validation accuracy (fraction)"}, "range": [0, 1.02]},
        updatemenus=[{"type": "buttons", "direction": "right", "buttons": buttons, "active": list(COST_AXES).index(cost),
                      "x": 1.0, "xanchor": "right", "y": 1.12, "yanchor": "bottom", "pad": {"r": 0, "t": 0}}],
        legend={"title": {"text": "architecture"}},
    )
    return fig


def history_figure(frame: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for (study, group), colour in zip(frame.groupby("study", sort=False), PALETTE, strict=False):
        done = group[group["state"] == "COMPLETE"].sort_values("trial")
        pruned = group[group["state"] == "PRUNED"]
        fig.add_trace(go.Scatter(x=done["trial"], y=done["val_accuracy"], mode="markers", marker={"color": colour}, name=f"{study}: complete trial"))
        fig.add_trace(go.Scatter(x=pruned["trial"], y=pruned["val_accuracy"], mode="markers", marker={"symbol": "x", "opacity": 0.5, "color": colour},
                                 name=f"{study}: pruned (when stopped)"))
        fig.add_trace(go.Scatter(x=done["trial"], y=done["val_accuracy"].cummax(), mode="lines", line={"shape": "hv", "color": colour},
                                 name=f"{study}: best so far"))
    fig.update_layout(**LAYOUT, title_text="Optimisation history", xaxis_title="trial number", yaxis_title="validation accuracy (fraction)",
                      yaxis_range=[0, 1.02], xaxis_dtick=1 if frame["trial"].max() < 20 else None)
    return fig


def has_curve(frame: pd.DataFrame) -> pd.Series:
    """Which trials ran at least one epoch, so have a learning curve (the frame's `intermediate`)."""
    return frame["intermediate"].map(len) > 0


def curve_trials(group: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The trials of one study whose learning curves are drawn: its best complete trials, and every other trial that
    ran an epoch (pruned, failed or complete), or an even sample of OTHER_CURVES of them."""
    best = group[group["state"] == "COMPLETE"].nlargest(LEARNING_CURVES, "val_accuracy")
    others = group[has_curve(group) & ~group.index.isin(best.index)]
    return best, others if len(others) <= OTHER_CURVES else others.sample(OTHER_CURVES, random_state=0).sort_values("trial")


def learning_curves_figure(frame: pd.DataFrame, curves: dict[str, dict[str, list[tuple[int, float]]]]) -> go.Figure:
    """Validation accuracy and each curve MLflow holds, per epoch: the best complete trials in colour, every other trial faded.

    `curves` maps an MLflow run id to each metric's (epoch, value) points; the accuracies come from Optuna.
    """
    names = ["val_accuracy", *dict.fromkeys(name for points in curves.values() for name in points)]  # the others come from MLflow only
    metrics = [records.epoch_metric(name) for name in names]
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[m["label"] for m in metrics], horizontal_spacing=0.08)
    shown, drawn, sampled = set(), 0, False  # the legend names one entry per kind of grey curve
    for study, group in frame.groupby("study", sort=False):
        best, others = curve_trials(group)
        sampled = sampled or len(others) < has_curve(group).sum() - has_curve(best).sum()
        for _, row in best.iterrows():
            label = f"{study} trial {row['trial']} ({row['arch']})"
            _curves(fig, row, names, curves, label, label, {"color": PALETTE[drawn % len(PALETTE)]}, 1.0, True)
            drawn += 1
        for _, row in others.iterrows():
            name = "pruned trials" if row["state"] == "PRUNED" else "other trials"
            _curves(fig, row, names, curves, name, f"{study} trial {row['trial']} ({row['state'].lower()})", {"color": "#999", "width": 1}, 0.35,
                    name not in shown)
            shown.add(name)
    fig.update_layout(**{**LAYOUT, "height": 480}, title_text=f"Learning curves of the {LEARNING_CURVES} best trials per study (grey: pruned and other trials"
                      + (f", {OTHER_CURVES} per study drawn of more)" if sampled else ")"),
                      legend={"orientation": "h", "y": -0.2})
    fig.update_xaxes(title_text="epoch", dtick=1)
    for col, metric in enumerate(metrics, start=1):
        fig.update_yaxes(title_text=f"{metric['label']} ({metric['unit']})", row=1, col=col)
    fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    return fig


def _curves(fig: go.Figure, row, names: list[str], curves: dict, name: str, label: str, line: dict, opacity: float, legend: bool) -> None:
    """One trial's curves, one per panel (`names`): `name` its legend entry, `label` the trial in its hover text (and the trace's meta)."""
    epochs = sorted(row["intermediate"])
    common = {"mode": "lines+markers", "line": line, "opacity": opacity, "legendgroup": name, "name": name,
              "meta": {"study": row["study"], "trial": int(row["trial"])}}
    fig.add_trace(go.Scatter(x=epochs, y=[row["intermediate"][e] for e in epochs], showlegend=legend, **common,
                             hovertemplate=f"{label}<br>epoch %{{x}}: val_accuracy %{{y:.4f}}<extra></extra>"), row=1, col=1)
    held = curves.get(row["mlflow_run_id"] or "", {})
    for col, metric in enumerate(names[1:], start=2):
        points = held.get(metric, [])
        fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], showlegend=False, **common,
                                 hovertemplate=f"{label}<br>epoch %{{x}}: {metric} %{{y:.4f}}<extra></extra>"), row=1, col=col)


def importance_figure(importances: dict[str, dict[str, float]]) -> go.Figure:
    """Horizontal bars: each study's parameter importances (fractions summing to 1)."""
    fig = go.Figure()
    for study, values in importances.items():
        names = list(values)[::-1]  # most important on top
        fig.add_trace(go.Bar(x=[values[n] for n in names], y=names, orientation="h", name=study,
                             hovertemplate=f"{study}: %{{y}} %{{x:.2f}}<extra></extra>"))
    fig.update_layout(**{**LAYOUT, "height": 200 + 40 * max(len(v) for v in importances.values()), "margin": {**LAYOUT["margin"], "l": 120}},
                      title_text="Parameter importance for validation accuracy (Optuna's importance evaluator)",
                      xaxis_title="importance (fraction of the total)", yaxis_title="parameter", barmode="group")
    return fig


def alexnet_figure(rows: list[tuple[str, float, float, bool]], small: str, large: str) -> go.Figure:
    """The 28-px variant's numbers relative to the original's: `rows` are (measure, original, variant, higher is better)."""
    ratios = [(name, variant / original, higher) for name, original, variant, higher in rows
              if original and variant is not None and not math.isnan(original) and not math.isnan(variant)]
    better = ["#2ca02c" if (ratio > 1) == higher else "#d62728" for _, ratio, higher in ratios]
    fig = go.Figure(go.Bar(x=[r[0] for r in ratios], y=[r[1] for r in ratios], text=[f"{r[1]:.2f}×" for r in ratios], textposition="outside",
                           marker={"color": better}, cliponaxis=False,
                           hovertemplate="%{x}: %{y:.3f} × the original<extra></extra>"))
    fig.add_hline(y=1, line={"dash": "dash", "color": "#333"})
    fig.update_layout(**{**LAYOUT, "height": 420}, title_text=f"{small[0].upper()}{small[1:]} relative to {large} (1 = the same; best trial of each)<br>"
                                 "<sup>green: the variant does better on that measure, red: worse</sup>",
                      xaxis_title="measure", yaxis_title="ratio (variant / original)", yaxis_rangemode="tozero")
    return fig


def layers_figure(rows: list[dict], title: str) -> go.Figure:
    """Forward FLOPs and activation memory per layer, from `objectives.inspect.layer_costs` rows."""
    labels = [f"#{r['index']} {r['layer']}" for r in rows]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("forward FLOPs per example", "activation memory per example (fp32)"))
    fig.add_trace(go.Bar(x=labels, y=[r["flops"] for r in rows], name="FLOPs", marker_color="#1f77b4",
                         hovertemplate="%{x}: %{y:.3s} FLOPs<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=labels, y=[r["activation_bytes"] / 1024 for r in rows], name="activation memory", marker_color="#ff7f0e",
                         hovertemplate="%{x}: %{y:,.1f} KiB<extra></extra>"), row=2, col=1)
    fig.update_layout(**{**LAYOUT, "height": 560}, title_text=title, showlegend=False)
    fig.update_yaxes(title_text="FLOPs", row=1, col=1)
    fig.update_yaxes(title_text="KiB", row=2, col=1)
    fig.update_xaxes(title_text="layer (index and type)", row=2, col=1)
    return fig


def recoloured(fig: go.Figure, scale: str, source: str = "Blues") -> go.Figure:
    """An Optuna figure drawn in colour scale `source` moved to `scale`: colour bars and marker scales, and the
    lines Optuna colours one by one (parallel coordinates), each at the same position on the new scale."""
    positions = [i / 500 for i in range(501)]
    source_colours = [plotly.colors.unlabel_rgb(c) for c in plotly.colors.sample_colorscale(source, positions)]

    def moved(colour: str) -> str:
        rgb = plotly.colors.unlabel_rgb(colour)
        nearest = min(range(len(positions)), key=lambda i: sum((a - b) ** 2 for a, b in zip(source_colours[i], rgb, strict=True)))
        return plotly.colors.sample_colorscale(scale, [positions[nearest]])[0]

    for trace in fig.data:
        if getattr(trace, "marker", None) is not None and trace.marker.colorscale is not None:
            trace.marker.colorscale = scale
        line = getattr(trace, "line", None)
        if line is not None and isinstance(line.color, str) and line.color.startswith("rgb"):
            line.color = moved(line.color)
    return fig


def styled(fig: go.Figure, title: str, height: int = HEIGHT) -> go.Figure:
    """An Optuna visualization figure in the report's look, with our title."""
    fig.update_layout(template="plotly_white", height=height, title={"text": title, "x": 0.01}, margin=LAYOUT["margin"])
    return fig
