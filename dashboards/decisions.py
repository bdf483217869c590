"""Report sections for the decisions after a search: the confirmed ranking, and the cost model against what trials measured."""

from __future__ import annotations

import html
import statistics

import optuna
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

import records
from dashboards.confirmed import NOISE_LEVEL, TEST_NAME, confirmed, load_companion, verdict
from dashboards.figures import LAYOUT, PALETTE
from dashboards.section import Section


def confirmed_section(studies: list[optuna.Study]) -> Section:
    section = Section("confirmed", "Confirmed ranking: the best configurations over several seeds")
    found = False
    for number, study in enumerate(studies):
        rows = confirmed(study, load_companion(study))
        if not rows:
            continue
        found = True
        section.parts.append(f"<h3>{html.escape(study.study_name)}</h3><p class=\"verdict\">{html.escape(verdict(rows))}</p>")
        head = "".join(f"<th>{h}</th>" for h in ("confirmed rank", "trial", "search rank", "seeds", "validation accuracy (mean ± sd)",
                                                  "test accuracy (mean ± sd)", "p (Welch)", "against the best"))
        body = []
        for rank, row in enumerate(rows, 1):
            noise = "best" if rank == 1 else f"within noise (p ≥ {NOISE_LEVEL})" if row.within_noise else "worse (p < 0.05)"
            cells = [rank, row.trial, row.search_rank, ", ".join(map(str, row.seeds)), f"{row.val_mean:.4f} ± {row.val_std:.4f}",
                     f"{row.test_mean:.4f} ± {row.test_std:.4f}", "" if row.p_value is None else f"{row.p_value:.3f}", noise]
            body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        section.parts.append(f'<div class="scroll"><table class="confirmed" id="confirmed-{number}"><thead><tr>{head}</tr></thead>'
                             f'<tbody>{"".join(body)}</tbody></table></div>')
        section.note(f"Ranked by the mean validation accuracy over the search's own run and the confirm runs (other seeds: weight "
                     f"initialisation and batch order; the same split). Test: {TEST_NAME}.")
        section.parts.append((f"plot-confirmed-{number}", confirmed_figure(study.study_name, rows)))
    if not found:
        section.note("No confirmed configurations: run `python -m study confirm NAME` to train the best ones again with other seeds.")
    return section


def confirmed_figure(study_name: str, rows) -> go.Figure:
    """Each configuration's seeds as points, its mean ± one standard deviation as a bar, validation and test side by side."""
    labels = [f"trial {row.trial}" for row in rows]
    fig = go.Figure()
    for name, means, stds, values, colour, shift in (
            ("validation", [r.val_mean for r in rows], [r.val_std for r in rows], [r.val for r in rows], PALETTE[0], -0.15),
            ("test", [r.test_mean for r in rows], [r.test_std for r in rows], [r.test for r in rows], PALETTE[1], 0.15)):
        fig.add_trace(go.Scatter(x=[i + shift for i in range(len(rows))], y=means, mode="markers", name=f"{name}: mean ± sd",
                                 marker={"size": 12, "symbol": "diamond", "color": colour},
                                 error_y={"type": "data", "array": stds, "visible": True, "thickness": 2, "width": 8}))
        fig.add_trace(go.Scatter(x=[i + shift for i, seeds in enumerate(values) for _ in seeds], y=[v for seeds in values for v in seeds],
                                 mode="markers", name=f"{name}: one seed", marker={"size": 6, "color": colour, "opacity": 0.45}))
    fig.update_layout(**LAYOUT, title_text=f"{study_name}: accuracy over seeds, best confirmed mean first",
                      xaxis={"tickvals": list(range(len(rows))), "ticktext": labels, "title": {"text": "configuration (the search's trial)"}},
                      yaxis_title="accuracy (fraction)")
    return fig


def cost_model_section(frame: pd.DataFrame) -> Section:
    section = Section("cost-model", "Cost model: predicted against measured cost per trial")
    if frame.empty or records.PREDICTED_FLOPS not in frame:
        return section.note("No trial records a predicted cost yet.")
    done = frame.dropna(subset=[records.PREDICTED_FLOPS, "train_flops", records.PREDICTED_SECONDS, "wall_seconds"])
    if done.empty:
        return section.note("No trial with both a predicted and a measured cost yet.")
    complete = done[done["state"] == "COMPLETE"]
    errors = [(abs(p / m - 1) for p, m in zip(complete[a], complete[b], strict=True)) for a, b in
              ((records.PREDICTED_FLOPS, "train_flops"), (records.PREDICTED_SECONDS, "wall_seconds"))]
    medians = [statistics.median(e) if len(complete) else float("nan") for e in map(list, errors)]
    section.parts.append(f'<p id="cost-model-error">Median absolute error over {len(complete)} complete trials: '
                         f'training FLOPs {medians[0]:.0%}, device seconds {medians[1]:.0%}.</p>')
    section.note("Predicted before each trial: 3 × forward FLOPs per example (torch's counter) × training examples × epochs, "
                 "and seconds from training steps timed on its machine before the first trial, scaled by what the study's trials had measured "
                 "there by then. "
                 "Measured: the trainer's training FLOPs and the trial's wall seconds. Pruned trials stop early, so they sit below the diagonal.")
    section.parts.append(("plot-cost-model", cost_model_figure(done)))
    return section


def cost_model_figure(done: pd.DataFrame) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training FLOPs", "device seconds (wall)"), horizontal_spacing=0.1)
    for column, (predicted, measured, unit) in enumerate(((records.PREDICTED_FLOPS, "train_flops", "training FLOPs"),
                                                          (records.PREDICTED_SECONDS, "wall_seconds", "seconds (wall)")), 1):
        for state, colour in (("COMPLETE", PALETTE[0]), ("PRUNED", PALETTE[2])):
            part = done[done["state"] == state]
            if part.empty:
                continue
            fig.add_trace(go.Scatter(x=part[predicted].tolist(), y=part[measured].tolist(), mode="markers", name=f"{state.lower()} trials",
                                     legendgroup=state, showlegend=column == 1, marker={"size": 9, "color": colour},
                                     text=[f"{s} trial {t}" for s, t in zip(part["study"], part["trial"], strict=True)],
                                     hovertemplate="%{text}<br>predicted %{x:.3g}<br>measured %{y:.3g}<extra></extra>"), row=1, col=column)
        low = min(done[predicted].min(), done[measured].min())
        high = max(done[predicted].max(), done[measured].max())
        fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", line={"dash": "dash", "color": "#555"}, name="predicted = measured",
                                 legendgroup="diagonal", showlegend=column == 1, hoverinfo="skip"), row=1, col=column)
        fig.update_xaxes(type="log", title_text=f"predicted {unit}", row=1, col=column)
        fig.update_yaxes(type="log", title_text=f"measured {unit}", row=1, col=column)
    fig.update_layout(**LAYOUT, title_text="Predicted against measured cost per trial<br><sup>on the dashed line the prediction was exact</sup>")
    return fig
