"""`python tests/metric_study.py ARGS [--then ARGS ...]` is `python -m study ARGS`, each command in turn in this one
process, with EpochMetrics given one more field, `grad_norm` (always $GRAD_NORM), before any `study` module is imported:
tests/test_metric_flow.py's proof that a new epoch metric is one field added to EpochMetrics. The trainer is wrapped by
tests/hooked_trainer.py, so a launch can be held at a phase (tests/hooked_study.py's orders).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import objectives
import objectives.train  # the module, which `objectives.train` (the function) hides

train_module = sys.modules["objectives.train"]


@dataclasses.dataclass
class WithGradNorm(train_module.EpochMetrics):
    # Its value is not passed by train(), hence the default; its metadata is what objectives.train.metric gives.
    grad_norm: float = dataclasses.field(default=float(os.environ["GRAD_NORM"]), metadata=train_module.metric("gradient norm", "L2", curve=True, column=True).metadata)


train_module.EpochMetrics = objectives.EpochMetrics = WithGradNorm

import hooked_trainer  # noqa: F401 -- wraps the trainer, as tests/hooked_study.py does

if __name__ == "__main__":
    from study.cli import main

    commands, current = [], []
    for arg in sys.argv[1:]:
        if arg == "--then":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    for argv in [*commands, current]:
        code = main(argv)
        if code:
            sys.exit(code)
