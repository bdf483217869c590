"""The CLI and everything Optuna: specs, storage, launch and the MLflow glue. `python -m study --help`."""
