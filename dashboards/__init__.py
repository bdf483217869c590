"""Plotly reports built from the Optuna storage and MLflow runs. Imports no training code (objectives.inspect is cost analysis).

The report's names load on first use: the commands that only need `records` (show, the storage) start
without plotly and pandas."""

__all__ = ["pareto_front", "trials_frame", "write_report"]


def __getattr__(name: str):
    if name == "pareto_front":
        from dashboards.figures import pareto_front

        return pareto_front
    if name in ("trials_frame", "write_report"):
        import dashboards.report

        return getattr(dashboards.report, name)
    raise AttributeError(f"module 'dashboards' has no attribute {name!r}")
