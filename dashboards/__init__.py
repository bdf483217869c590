"""Plotly reports built from the Optuna storage and MLflow runs. Imports no training code."""

from dashboards.report import pareto_front, trials_frame, write_report

__all__ = ["pareto_front", "trials_frame", "write_report"]
