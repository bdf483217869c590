"""A trial's predicted cost, and `launch --budget`: stop the study when the next trial would not fit.

The cost model, in two numbers per configuration:
    predicted FLOPs   = 3 × forward FLOPs per example × training examples × epochs
                        (forward FLOPs: objectives.inspect.layer_costs, torch's own counter; a training step
                        costs about 3 forwards: the forward pass and a backward pass of about twice its work)
    predicted seconds = predicted FLOPs / the throughput this study has measured on this device: the training
                        FLOPs its finished trials did (TrainResult.train_flops) per second of their wall time
                        (TrainResult.wall_seconds, so model building and evaluation are in it too).
Before the first trial on a device finishes, the throughput is a stated prior (PRIOR_FLOPS_PER_SECOND).

Every trial records both predictions before it trains (records.PREDICTED_FLOPS, PREDICTED_SECONDS) beside
what it measured (train_flops, wall_seconds), so `show` and the report can show the model's error.

A launch (and confirm, finalize) says at its start how long its trials are predicted to take here (`Forecast`: the
mean predicted FLOPs of the configurations they may train, at the throughput measured on the device, else by
earlier trials of the same architectures in the storage, else the prior), and at its end what they took.

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

import records
from objectives.data import VAL_SIZE
from objectives.train import TrainConfig
from study.progress import Training, seconds_left
from study.specs import Plan
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
    done = [t.user_attrs for t in trials if t.user_attrs.get(records.DEVICE) == device and t.user_attrs.get("wall_seconds")]
    seconds = sum(attrs["wall_seconds"] for attrs in done)
    return sum(attrs["train_flops"] for attrs in done) / seconds if seconds > 0 else None


def predict(config: TrainConfig, trials: list[optuna.trial.FrozenTrial]) -> Prediction:
    flops = predicted_flops(config)
    device = device_name(config.device)
    measured = throughput(trials, device)
    rate = measured or PRIOR_FLOPS_PER_SECOND["cpu" if device == "cpu" else "cuda"]
    return Prediction(flops, flops / rate, rate, measured is not None)


def assumed_rate(trials: list[optuna.trial.FrozenTrial], earlier: list[optuna.trial.FrozenTrial], device: str, archs: tuple) -> tuple[float, str]:
    """The throughput a study's prediction assumes on `device`, and where it comes from: what the study measured there, else
    what `earlier` trials (other studies) of the same architectures measured there, else the prior."""
    if (rate := throughput(trials, device)) is not None:
        return rate, f"measured by this study's trials on {device}"
    same = [t for t in earlier if records.config(t).get("arch") in archs]
    if (rate := throughput(same, device)) is not None:
        count = sum(t.user_attrs.get(records.DEVICE) == device and bool(t.user_attrs.get("wall_seconds")) for t in same)
        return rate, f"measured on {device} by {count} earlier trials of {', '.join(archs)} in this storage"
    prior = PRIOR_FLOPS_PER_SECOND["cpu" if device == "cpu" else "cuda"]
    return prior, f"a prior for {device}, where no trial of {', '.join(archs)} has run yet"


FORECAST_DRAWS = 16  # configurations drawn from a study's ranges to predict the mean cost of its trials


def likely_configs(plan: Plan) -> list[TrainConfig]:
    """What the study's trials may train: its first trials, and draws from its ranges (a seeded random sampler's, so
    every launch predicts alike). Its own sampler goes where the good trials are, which is not known at the start."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the in-memory study below announces itself at INFO
    try:
        draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        return [plan.config(row) for row in plan.enqueue] + [plan.trial_config(draws.ask()) for _ in range(FORECAST_DRAWS)]
    finally:
        optuna.logging.set_verbosity(verbosity)


def mean_flops(configs: list[TrainConfig]) -> float:
    return statistics.fmean(predicted_flops(config) for config in configs)


@dataclass(frozen=True)
class Forecast:
    """A launch's prediction at its start, from the cost model: how long the trials it still has to run take here."""

    trials: int    # trials still to run
    flops: float   # predicted training FLOPs of one of them
    rate: float    # training FLOP/s assumed
    source: str    # where `rate` comes from
    slots: int     # trials run side by side
    unit: str = "trial"  # what a trial is called: "training" for confirm and finalize

    def seconds(self, trials: int | None = None) -> float:
        """Wall seconds of `trials` trials (default: all still to run), in rounds of `slots` side by side."""
        return math.ceil((self.trials if trials is None else trials) / self.slots) * self.flops / self.rate

    def describe(self, budget: Budget | None, trials: list[optuna.trial.FrozenTrial]) -> str:
        """The launch's first line about time: the prediction, and how much of it `budget` holds."""
        side_by_side = f", {self.slots} at a time" if self.slots > 1 else ""
        line = (f"predicted time: {self._count(self.trials)} in about {describe_seconds(self.seconds())}{side_by_side} "
                f"({self.flops:.3g} training FLOPs each at {self.rate:.3g} FLOP/s, {self.source})")
        if budget is None:
            return line
        each = self.flops / self.rate if budget.unit == "seconds" else self.flops
        fits = min(self.trials, int(max(budget.amount - budget.used(trials), 0.0) // each))
        return line + f"; --budget {budget.describe(budget.amount)} holds {'all of them' if fits == self.trials else f'about {fits} of them'}"

    def time_left(self, trials: list[optuna.trial.FrozenTrial], total: int, budget: Budget | None = None,
                  history: list[optuna.trial.FrozenTrial] | None = None) -> list[str]:
        """The progress display's time fields (progress_fields) for `trials` of `total`: at the throughput measured so far on
        the device they train on, by them or by `history` (the study a confirm repeats), else at the forecast's."""
        device = next((t.user_attrs[records.DEVICE] for t in reversed(trials) if records.DEVICE in t.user_attrs), None)
        measured = throughput([*trials, *(history or [])], device) if device is not None else None
        return progress_fields(trials, total, budget, measured or self.rate, self.flops, self.slots)

    def compare(self, ran: int, seconds: float) -> str:
        """The launch's last line about time: what `ran` trials took against what was predicted for them."""
        predicted = self.seconds(ran)
        return (f"time: {self._count(ran)} took {describe_seconds(seconds)}, predicted {describe_seconds(predicted)} "
                f"at the start ({seconds / predicted:.2f}× the prediction)")

    def _count(self, n: int) -> str:
        return records.count(n, self.unit)


def prediction_errors(trials: list[optuna.trial.FrozenTrial]) -> dict[str, list[float]]:
    """Relative errors (predicted / measured - 1) of the trials that ran to their end, for FLOPs and seconds."""
    errors: dict[str, list[float]] = {"flops": [], "seconds": []}
    for t in trials:
        attrs = t.user_attrs
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        for key, predicted, measured in (("flops", records.PREDICTED_FLOPS, "train_flops"), ("seconds", records.PREDICTED_SECONDS, "wall_seconds")):
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
        return f"{value:.3g} FLOPs" if self.unit == "flops" else describe_seconds(value)

    def refusal(self, prediction: Prediction, trials: list[optuna.trial.FrozenTrial], running: float) -> str | None:
        """Why a trial with this prediction does not fit (None: it fits). `running`: the predicted cost of the trials in flight."""
        used = self.used(trials) + running
        needed = self.cost(prediction)
        if used + needed <= self.amount:
            return None
        return (f"over budget: predicted {self.describe(needed)} does not fit in the {self.describe(max(self.amount - used, 0.0))} "
                f"left of --budget {self.describe(self.amount)}")


def describe_seconds(value: float) -> str:
    if value < 10:
        return f"{value:.1f} s"
    return f"{value / 3600:.2f} h" if value >= 3600 else f"{value / 60:.1f} min" if value >= 120 else f"{value:.0f} s"


def progress_fields(trials: list[optuna.trial.FrozenTrial], total: int, budget: Budget | None, rate: float, flops_per_trial: float,
                    slots: int = 1) -> list:
    """The predicted time left of the study and the budget used, for the progress display (study.progress).

    A trial still to run costs the mean predicted FLOPs of the study's trials so far (`flops_per_trial`, the launch's
    forecast, before any), at `rate` FLOP/s, `slots` of them side by side. The time left is a function of the trainings
    in progress (progress.seconds_left), so that it grows while one runs over its prediction."""
    done = records.count_done(trials)
    predicted = [t.user_attrs[records.PREDICTED_FLOPS] for t in trials if records.PREDICTED_FLOPS in t.user_attrs]
    each = (statistics.fmean(predicted) if predicted else flops_per_trial) / rate
    cap = None
    if budget is not None:
        used = budget.used(trials)
        left = max(budget.amount - used, 0.0)
        cap = (left if budget.unit == "seconds" else left / rate) / slots

    def time_left(running: list[Training]) -> str:
        seconds = seconds_left(running, max(total - done - len(running), 0), each, slots)
        return time_left_field(seconds if cap is None else min(seconds, cap))

    if budget is None:
        return [time_left]
    return [time_left, f"budget {budget.describe(used)} of {budget.describe(budget.amount)} used"]


def time_left_field(seconds: float) -> str:
    return f"~{describe_seconds(seconds)} left (predicted)"
