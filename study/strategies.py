"""The samplers and pruners a study may name, in its spec's [sampler] / [pruner] or with --sampler / --pruner.

The one list of them: the spec check (study.specs), the flags' check and help (study.session, study.cli), the
study's construction (study.session.make_sampler, make_pruner) and the docs' tests read it. Adding a sampler is one
entry here. It imports no Optuna, so `python -m study --help` can list the names: each entry names its class,
imported only when a study is built.
"""

from __future__ import annotations

import importlib

SAMPLERS = {
    "tpe": "optuna.samplers.TPESampler",
    "gp": "optuna.samplers.GPSampler",
    "random": "optuna.samplers.RandomSampler",
    "grid": "study.session.GridSampler",  # Optuna's, less its study.stop(); built from the spec's grid
}
PRUNERS = {
    "median": "optuna.pruners.MedianPruner",
    "hyperband": "optuna.pruners.HyperbandPruner",
    "none": "optuna.pruners.NopPruner",
}


def strategy_class(table: dict[str, str], name: str) -> type:
    """The class `name` stands for in SAMPLERS or PRUNERS."""
    module, _, attribute = table[name].rpartition(".")
    return getattr(importlib.import_module(module), attribute)
