"""Plotly reports built from the Optuna storage and MLflow runs. Imports no training code (objectives.inspect is cost analysis)."""

from dashboards.figures import pareto_front
from dashboards.report import trials_frame, write_report

__all__ = ["pareto_front", "trials_frame", "write_report"]
