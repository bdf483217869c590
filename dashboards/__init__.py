"""Plotly reports built from the Optuna storage and MLflow runs. Imports no training code (objectives.inspect is cost analysis)."""

from dashboards.report import pareto_front, trials_frame, write_report

__all__ = ["pareto_front", "trials_frame", "write_report"]
