"""Pruning for accuracy-and-cost studies, which Optuna cannot prune (its pruners read single-objective reports).

A trial is compared with trials of similar cost only: its cost bucket is its predicted training FLOPs per
epoch (study.budget) rounded down to a power of 4, so a cheap network is never stopped for being less
accurate than one 10 times its size, which the cost objective may well prefer. After each epoch, once
`n_startup_trials` complete trials of its bucket reached that epoch, a trial whose validation accuracy is
below their median at that epoch is pruned (the median rule of Optuna's MedianPruner, within the bucket).
Like Optuna's pruners it is not asked after a trial's last epoch (study.launch): a whole trial is COMPLETE.
Accuracy per epoch is kept on each trial as `records.VAL_CURVE`, since trial.report is single-objective.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

import records

BUCKET_FACTOR = 4.0  # costs per epoch within this factor of each other share a bucket


def bucket(predicted_flops: float, epochs: int) -> int:
    return math.floor(math.log(max(predicted_flops / epochs, 1.0), BUCKET_FACTOR))


def trial_bucket(trial: optuna.trial.FrozenTrial) -> int | None:
    attrs, config = trial.user_attrs, records.config(trial)
    if records.PREDICTED_FLOPS not in attrs or not config.get("epochs"):
        return None
    return bucket(attrs[records.PREDICTED_FLOPS], config["epochs"])


@dataclass(frozen=True)
class CostBucketPruner:
    """The median rule among complete trials in the same cost bucket, on validation accuracy alone."""

    n_startup_trials: int = 2  # complete trials of the bucket needed before any pruning in it
    n_warmup_steps: int = 0    # epochs that are never pruned

    @classmethod
    def from_settings(cls, settings: dict) -> CostBucketPruner | None:
        """From the study's [pruner] (its median-pruner arguments); None for `none`."""
        if settings.get("name", "median") == "none":
            return None
        return cls(int(settings.get("n_startup_trials", 2)), int(settings.get("n_warmup_steps", 0)))

    def should_prune(self, study: optuna.Study, own_bucket: int, epoch: int, val_accuracy: float) -> bool:
        if epoch <= self.n_warmup_steps:
            return False
        curves = [records.val_curve(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if trial_bucket(t) == own_bucket]
        at_epoch = [curve[epoch] for curve in curves if epoch in curve]
        return len(at_epoch) >= self.n_startup_trials and val_accuracy < statistics.median(at_epoch)
