"""A trial's predicted cost, and `launch --budget`: stop the study when the next trial would not fit.

The cost model, in two numbers per configuration:
    predicted FLOPs   = 3 × forward FLOPs per example × training examples × epochs
                        (forward FLOPs: objectives.inspect.layer_costs, torch's own counter; a training step
                        costs about 3 forwards: the forward pass and a backward pass of about twice its work)
    predicted seconds = predicted FLOPs / the throughput this study has measured on this device: the training
                        FLOPs its finished trials did (TrainResult.train_flops) per second of their wall time
                        (TrainResult.wall_seconds, so model building and evaluation are in it too).
Before the first trial on a device finishes, the throughput is a stated prior (PRIOR_FLOPS_PER_SECOND).

Every trial records both predictions before it trains (record.PREDICTED_FLOPS, PREDICTED_SECONDS) beside
what it measured (train_flops, wall_seconds), so `show` and the report can show the model's error.

`--budget 2h`, `30m`, `90s` is device time (the trials' wall seconds); a plain number such as `5e15` is
training FLOPs (the trials' measured train_flops). What the study's finished trials used counts against
it, plus the predictions of the trials still running; a trial whose prediction does not fit is not run.
"""

from __future__ import annotations

import functools
import math
import re
import statistics
from dataclasses import dataclass

import optuna

from dashboards import record
from objectives.data import VAL_SIZE
from objectives.train import TrainConfig
from study.tracking import device_name

TRAIN_OVER_FORWARD = 3.0  # FLOPs of one training step per FLOP of a forward pass
TRAIN_SPLIT = 60_000 - VAL_SIZE  # examples of a whole training split
# Training FLOPs per second of device time assumed before a trial has measured it: a conservative
# 2-core CPU, and a fraction of a data-centre GPU (small networks leave most of it idle).
PRIOR_FLOPS_PER_SECOND = {"cpu": 2e10, "cuda": 2e13}
UNITS = {"s": 1, "m": 60, "h": 3600}


@functools.lru_cache(maxsize=256)
def forward_flops(arch: str, resize: int | None, ratio: int) -> int:
    """Forward FLOPs of one example (built on the CPU once per network; nothing is trained)."""
    from objectives.inspect import layer_costs

    return sum(row.flops for row in layer_costs(arch, resize, ratio))


def predicted_flops(config: TrainConfig) -> float:
    examples = config.n_train or TRAIN_SPLIT
    return TRAIN_OVER_FORWARD * forward_flops(config.arch, config.resize, config.ratio) * examples * config.epochs


@dataclass(frozen=True)
class Prediction:
    flops: float
    seconds: float
    throughput: float  # FLOP/s it assumed
    measured: bool     # False: the prior


def throughput(trials: list[optuna.trial.FrozenTrial], device: str) -> float | None:
    """Training FLOPs per wall second of the finished trials on `device` (a device name); None before any."""
    done = [t.user_attrs for t in trials if t.user_attrs.get(record.DEVICE) == device and t.user_attrs.get("wall_seconds")]
    seconds = sum(attrs["wall_seconds"] for attrs in done)
    return sum(attrs["train_flops"] for attrs in done) / seconds if seconds > 0 else None


def predict(config: TrainConfig, trials: list[optuna.trial.FrozenTrial]) -> Prediction:
    flops = predicted_flops(config)
    device = device_name(config.device)
    measured = throughput(trials, device)
    rate = measured or PRIOR_FLOPS_PER_SECOND["cpu" if device == "cpu" else "cuda"]
    return Prediction(flops, flops / rate, rate, measured is not None)


def prediction_errors(trials: list[optuna.trial.FrozenTrial]) -> dict[str, list[float]]:
    """Relative errors (predicted / measured - 1) of the trials that ran to their end, for FLOPs and seconds."""
    errors: dict[str, list[float]] = {"flops": [], "seconds": []}
    for t in trials:
        attrs = t.user_attrs
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        for key, predicted, measured in (("flops", record.PREDICTED_FLOPS, "train_flops"), ("seconds", record.PREDICTED_SECONDS, "wall_seconds")):
            if attrs.get(predicted) and attrs.get(measured):
                errors[key].append(attrs[predicted] / attrs[measured] - 1.0)
    return errors


def median_abs(values: list[float]) -> float | None:
    return statistics.median(abs(v) for v in values) if values else None


@dataclass(frozen=True)
class Budget:
    """`--budget`: device seconds or training FLOPs for the whole study."""

    amount: float
    unit: str  # "seconds" or "flops"

    @classmethod
    def parse(cls, text: str) -> Budget:
        """`2h`, `30m`, `90s` (device time) or a plain number of training FLOPs such as `5e15`."""
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh])\s*", text)
        if match:
            amount, unit = float(match[1]) * UNITS[match[2]], "seconds"
        else:
            try:
                amount, unit = float(text), "flops"
            except ValueError:
                raise ValueError(f"--budget {text}: give device time such as 2h, 30m or 90s, or training FLOPs such as 5e15") from None
        if not (amount > 0 and math.isfinite(amount)):
            raise ValueError(f"--budget {text}: the budget must be a positive, finite amount")
        return cls(amount, unit)

    def cost(self, prediction: Prediction) -> float:
        return prediction.seconds if self.unit == "seconds" else prediction.flops

    def used(self, trials: list[optuna.trial.FrozenTrial]) -> float:
        """What the study's trials measured: wall seconds or training FLOPs."""
        key = "wall_seconds" if self.unit == "seconds" else "train_flops"
        return float(sum(t.user_attrs.get(key, 0) for t in trials))

    def describe(self, value: float) -> str:
        if self.unit == "flops":
            return f"{value:.3g} FLOPs"
        return f"{value / 3600:.2f} h" if value >= 3600 else f"{value / 60:.1f} min" if value >= 120 else f"{value:.0f} s"

    def refusal(self, prediction: Prediction, trials: list[optuna.trial.FrozenTrial], running: float) -> str | None:
        """Why a trial with this prediction does not fit (None: it fits). `running`: the predicted cost of the trials in flight."""
        used = self.used(trials) + running
        needed = self.cost(prediction)
        if used + needed <= self.amount:
            return None
        return (f"over budget: predicted {self.describe(needed)} does not fit in the {self.describe(max(self.amount - used, 0.0))} "
                f"left of --budget {self.describe(self.amount)}")


def progress_line(trials: list[optuna.trial.FrozenTrial], total: int, budget: Budget | None, rate: float | None) -> str:
    """Budget used and the predicted time left of the study, from the trials' predicted costs."""
    done = record.count_done(trials)
    predicted = [t.user_attrs[record.PREDICTED_FLOPS] for t in trials if record.PREDICTED_FLOPS in t.user_attrs]
    if not predicted or not rate:
        return "cost: -"
    flops_left = max(total - done, 0) * statistics.fmean(predicted)
    seconds_left = flops_left / rate
    line = ""
    if budget is not None:
        used = budget.used(trials)
        left = max(budget.amount - used, 0.0)
        seconds_left = min(seconds_left, left if budget.unit == "seconds" else left / rate)
        line = f"budget {budget.describe(used)} of {budget.describe(budget.amount)}, "
    return line + f"~{seconds_left / 60:.1f} min left (predicted)"
