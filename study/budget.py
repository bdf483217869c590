"""A trial's predicted cost, and `launch --budget`: stop the study when the next trial would not fit.

The cost model, per configuration:
    predicted FLOPs   = 3 × forward FLOPs per example × training examples × epochs
                        (forward FLOPs: objectives.inspect.layer_costs, torch's own counter; a training step
                        costs about 3 forwards: the forward pass and a backward pass of about twice its work)
    predicted seconds = (fixed + training steps × seconds per step + evaluated examples × seconds per example) × scale
                        the three parts timed on this machine for the study's range ends (objectives.train.time_training:
                        a few training steps of the real training, in the precision the trials train in), interpolated
                        between them by a step's FLOPs; `scale`: the seconds the study's finished trials on this machine
                        measured (TrainResult.wall_seconds) over what the timings predict for them, 1 before any.
One rate of FLOP/s fits small networks badly (their steps are bound by overhead, not arithmetic), so each shape is timed.

A launch, worker, confirm or finalize times the shapes its study lacks for this machine at its start ("timing this
machine", a few seconds) and keeps them in the study (user attribute `step_timing <host>/<device>`), so that workers
and later launches reuse them. A timing holds for a count of torch's CPU threads: a launch with worker processes times
with each one's share of the cores (study.pool.cpu_threads), as they will train. Only those commands, which write the study, time or keep anything.

Every trial records both predictions before it trains (records.PREDICTED_FLOPS, PREDICTED_SECONDS) beside
what it measured (train_flops, wall_seconds), so `show` and the report can show the model's error.

A launch (and confirm, finalize) says at its start how long its trials are predicted to take here (`Forecast`: the
predicted seconds of the configurations they will train, from the same model: a launch's queued trials and its sampler's
next draws, `coming_configs`), its progress display the time left, and at its end what they took.

`--budget 2h`, `30m`, `90s` is device time (the trials' wall seconds); a plain number such as `5e15` is
training FLOPs (the trials' measured train_flops). What the study's finished trials used counts against
it, plus the predictions of the trials still running; a trial whose prediction does not fit is not run.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import socket
import statistics
from dataclasses import dataclass

import numpy
import optuna
import torch
from optuna.trial import TrialState
from rich.console import Console

import records
from objectives.data import TEST_SIZE, VAL_SIZE, FashionMNIST
from objectives.train import TrainConfig, bf16_autocast, time_training
from study.progress import Training, seconds_left
from study.specs import Plan
from study.tracking import device_name

TRAIN_OVER_FORWARD = 3.0  # FLOPs of one training step per FLOP of a forward pass
TRAIN_SPLIT = 60_000 - VAL_SIZE  # examples of a whole training split
UNITS = {"s": 1, "m": 60, "h": 3600}


@functools.lru_cache(maxsize=256)
def forward_flops(arch: str, resize: int | None, ratio: int) -> int:
    """Forward FLOPs of one example (built on the CPU once per network; nothing is trained)."""
    from objectives.inspect import layer_costs

    return sum(row.flops for row in layer_costs(arch, resize, ratio))


def predicted_flops(config: TrainConfig) -> float:
    examples = config.n_train or TRAIN_SPLIT
    return TRAIN_OVER_FORWARD * forward_flops(config.arch, config.resize, config.ratio) * examples * config.epochs


def step_flops(config: TrainConfig) -> float:
    """The forward FLOPs of one full batch: what the timings of an architecture are interpolated by."""
    return float(forward_flops(config.arch, config.resize, config.ratio) * config.batch_size)


def machine(device: str) -> str:
    """This machine as a study keys its timings: host/device name ("gpu7/NVIDIA H100 80GB HBM3", "laptop/cpu")."""
    return f"{socket.gethostname()}/{device_name(device)}"


def trained_on(trial: optuna.trial.FrozenTrial) -> str | None:
    """The machine a trial trained on (host/device name), None before it finished training."""
    attrs = trial.user_attrs
    return f"{attrs[records.HOST]}/{attrs[records.DEVICE]}" if records.HOST in attrs and records.DEVICE in attrs else None


def shape(config: TrainConfig, threads: int) -> tuple:
    """What a timing holds for: a training step's size, the precision it trains in, and torch's CPU threads."""
    return config.arch, config.resize, config.ratio, config.batch_size, "bf16" if bf16_autocast(config) else "fp32", threads


SHAPE_KEYS = ("arch", "resize", "ratio", "batch_size", "precision", "threads")


@dataclass(frozen=True)
class CostModel:
    """Predicted seconds of a training on one machine: its timed shapes, scaled by what its finished trials measured."""

    machine: str             # host/device name
    threads: int             # torch's CPU threads a training runs with (a worker process gets its share of the cores)
    timings: tuple           # one dict per timed shape: SHAPE_KEYS, step_flops, step_seconds, eval_seconds, fixed_seconds
    scale: float = 1.0       # measured / timed seconds of the trials finished on this machine
    measured: int = 0        # how many trials `scale` is from
    elsewhere: bool = False  # its trials train on other machines (Ray's nodes): the trials finished on any of them scale it

    def timed_seconds(self, config: TrainConfig) -> float:
        """The seconds the timings alone predict: fixed + steps × per step + evaluated examples × per example, each part
        interpolated between the architecture's timed shapes by a step's FLOPs (held at the ends beyond them)."""
        points = sorted((t for t in self.timings if t["arch"] == config.arch and t.get("threads") == self.threads), key=lambda t: t["step_flops"])
        if not points:
            raise ValueError(f"no timing of {config.arch} on {self.machine} with {records.count(self.threads, 'thread')}")
        x = step_flops(config)

        def part(name: str) -> float:
            return float(numpy.interp(x, [p["step_flops"] for p in points], [p[name] for p in points]))

        steps = config.epochs * math.ceil((config.n_train or TRAIN_SPLIT) / config.batch_size)
        evaluated = config.epochs * (config.n_val or VAL_SIZE) + (config.n_test or TEST_SIZE)
        return part("fixed_seconds") + steps * part("step_seconds") + evaluated * part("eval_seconds")

    def seconds(self, config: TrainConfig) -> float:
        return self.timed_seconds(config) * self.scale

    def refined(self, trials: list[optuna.trial.FrozenTrial]) -> CostModel:
        """This model scaled by the trials among `trials` that trained here (`elsewhere`: on any machine), with its threads,
        from their first epoch (a resumed one measured only its last part): their wall seconds over what the timings
        predict for the epochs they ran. A trial recorded without its threads (before they were) counts as trained with them."""
        archs = {t["arch"] for t in self.timings if t.get("threads") == self.threads}
        done = [(t.user_attrs, config) for t in trials if (trained_on(t) == self.machine or self.elsewhere and trained_on(t)) and t.user_attrs.get("wall_seconds")
                and t.user_attrs.get(records.CPU_THREADS, self.threads) == self.threads and records.RESUMED_FROM_EPOCH not in t.user_attrs
                and (config := records.train_config(t)) is not None and config.arch in archs]
        timed = sum(self.timed_seconds(dataclasses.replace(config, epochs=attrs["epochs_run"])) for attrs, config in done)
        if not timed > 0:
            return dataclasses.replace(self, scale=1.0, measured=0)
        return dataclasses.replace(self, scale=sum(attrs["wall_seconds"] for attrs, _ in done) / timed, measured=len(done))

    def basis(self) -> str:
        """What its predictions are based on, for the lines that state a time."""
        where = "on them" if self.elsewhere else "there"
        scaled = f", scaled by the {records.count(self.measured, 'trial')} measured {where} (×{self.scale:.2f})" if self.measured else ""
        timed = f"{self.machine}, the launcher, not on the Ray nodes that train" if self.elsewhere else self.machine
        return f"from training steps timed on {timed}{scaled}"


def timing_attr(key: str) -> str:
    """The study's user attribute that keeps the timings of machine `key`."""
    return f"{records.STEP_TIMING} {key}"


def machine_model(study: optuna.Study, configs: list[TrainConfig], data: FashionMNIST, console: Console,
                  trials: list[optuna.trial.FrozenTrial], threads: int | None = None, elsewhere: bool = False) -> CostModel:
    """The cost model of `configs` on this machine (their device), for trainings on `threads` CPU threads (default: this
    process's): the timings `study` keeps for it, the shapes it lacks timed now ("timing this machine") with that many
    threads and kept in it, refined by `trials`. `elsewhere`: the trials train on other machines (Ray's nodes), which
    this one stands for until their finished trials scale it. Only commands that write the study call it."""
    key, threads = machine(configs[0].device), threads or torch.get_num_threads()
    kept = study.user_attrs.get(timing_attr(key), [])
    timings = list(kept)
    known = {tuple(t.get(name) for name in SHAPE_KEYS) for t in timings}
    for config in configs:
        if (wanted := shape(config, threads)) in known:
            continue
        timing = time_training(config, data, threads=threads)
        timings.append({**dict(zip(SHAPE_KEYS, wanted)), "precision": timing.precision, "step_flops": step_flops(config),
                        "step_seconds": timing.step_seconds, "eval_seconds": timing.eval_seconds, "fixed_seconds": timing.fixed_seconds})
        known.add(wanted)
        console.print(f"timing this machine ({key}, {records.count(threads, 'thread')}): {config.arch} at {config.resize} px, ratio {config.ratio}, "
                      f"batch {config.batch_size}, {timing.precision}: {timing.step_seconds:.3g} s a training step, {timing.fixed_seconds:.1f} s to set up",
                      markup=False)
    if len(timings) > len(kept):
        study.set_user_attr(timing_attr(key), timings)
    return CostModel(key, threads, tuple(timings), elsewhere=elsewhere).refined(trials)


@dataclass(frozen=True)
class Prediction:
    flops: float
    seconds: float


def predict(config: TrainConfig, model: CostModel, trials: list[optuna.trial.FrozenTrial]) -> Prediction:
    """A trial's predicted cost, by `model` refined with the `trials` finished so far."""
    return Prediction(predicted_flops(config), model.refined(trials).seconds(config))


COMING_DRAWN = 200  # trials whose configurations a forecast draws one by one; later ones count at the drawn ones' mean


def coming_configs(study: optuna.Study, plan: Plan, trials: int) -> list[TrainConfig]:
    """What the study's next `trials` trials train (at most COMING_DRAWN of them), as far as a start can know it: its queued
    trials, then what a copy of its sampler, random state included, draws on an empty in-memory study. While the sampler
    draws at random (the random and grid samplers, TPE's and GP's first trials) those are the very configurations the
    trials will train; once the study's results steer it, draws from the same ranges. Nothing of `study` changes."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the in-memory study below announces itself at INFO
    try:
        draws = optuna.create_study(sampler=copy.deepcopy(study.sampler), directions=study.directions)
        for waiting in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            draws.enqueue_trial(waiting.system_attrs.get("fixed_params", {}), skip_if_exists=False)
        return [plan.trial_config(draws.ask()) for _ in range(min(trials, COMING_DRAWN))]
    finally:
        optuna.logging.set_verbosity(verbosity)


@dataclass(frozen=True)
class Forecast:
    """A launch's prediction at its start, from the cost model: how long the trials it still has to run take here.
    The start line, the progress display's time left and the end line all read it."""

    trials: int          # trials still to run
    configs: tuple       # what they train, in order (coming_configs; the first ones of a longer run)
    model: CostModel     # as refined at the start
    slots: int           # trials run side by side
    unit: str = "trial"  # what a trial is called: "training" for confirm and finalize

    @property
    def flops(self) -> float:
        """Predicted training FLOPs of one of them: the mean over `configs`."""
        return statistics.fmean(predicted_flops(config) for config in self.configs)

    def each(self, model: CostModel | None = None, trials: int | None = None) -> float:
        """Predicted seconds of one of the first `trials` of them (default: all) by `model` (default: the forecast's own):
        the mean over their configurations, or over all of `configs` for more trials than it holds."""
        configs = self.configs[:trials] if trials else self.configs
        return statistics.fmean((model or self.model).seconds(config) for config in configs)

    def seconds(self, trials: int | None = None) -> float:
        """Wall seconds of the first `trials` trials (default: all still to run), in rounds of `slots` side by side."""
        trials = self.trials if trials is None else trials
        return math.ceil(trials / self.slots) * self.each(trials=trials) if trials else 0.0

    def held(self, budget: Budget, trials: list[optuna.trial.FrozenTrial], model: CostModel | None = None) -> int:
        """How many of the trials still to run `budget` holds after what `trials` used and the running ones are predicted
        to use: the first ones, in order, at their predicted seconds by `model` (default: the forecast's) or FLOPs."""
        running = sum(budget.cost(Prediction(t.user_attrs.get(records.PREDICTED_FLOPS, 0.0), t.user_attrs.get(records.PREDICTED_SECONDS, 0.0)))
                      for t in trials if t.state == TrialState.RUNNING)
        left = budget.amount - budget.used(trials) - running
        costs = [budget.cost(Prediction(predicted_flops(config), (model or self.model).seconds(config))) for config in self.configs]
        held = 0
        for cost in costs[:self.trials]:
            if cost > left:
                return held
            left -= cost
            held += 1
        return min(self.trials, held + int(left // statistics.fmean(costs)))  # beyond the drawn ones, at their mean

    def describe(self, budget: Budget | None, trials: list[optuna.trial.FrozenTrial]) -> str:
        """The launch's first line about time: the prediction, what it is based on, and how much of it `budget` holds."""
        side_by_side = f", {self.slots} at a time" if self.slots > 1 else ""
        line = (f"predicted time: {self._count(self.trials)} in about {describe_seconds(self.seconds())}{side_by_side} "
                f"({describe_seconds(self.each())} and {self.flops:.3g} training FLOPs each, {self.model.basis()})")
        if budget is None:
            return line
        fits = self.held(budget, trials)
        held = "all of them" if fits == self.trials else f"about {fits} of them, {describe_seconds(self.seconds(fits))}"
        return line + f"; --budget {budget.describe(budget.amount)} holds {held}"

    def time_left(self, trials: list[optuna.trial.FrozenTrial], total: int, budget: Budget | None = None,
                  history: list[optuna.trial.FrozenTrial] | None = None) -> list:
        """The progress display's time fields for `trials` of `total`: the time left (a function of the trainings in
        progress, study.progress.seconds_left, so that it grows while one runs over its prediction), by the model refined
        with the trials finished so far here (and `history`: the study a confirm repeats); and the budget used. A trial
        still waiting counts only while the budget holds it, as at the start."""
        model = self.model.refined([*trials, *(history or [])])
        each = self.each(model)
        done = records.count_done(trials)
        fits = None if budget is None else self.held(budget, trials, model)

        def time_left(running: list[Training]) -> str:
            waiting = max(total - done - len(running), 0)
            return time_left_field(seconds_left(running, waiting if fits is None else min(waiting, fits), each, self.slots))

        if budget is None:
            return [time_left]
        return [time_left, f"budget {budget.describe(budget.used(trials))} of {budget.describe(budget.amount)} used"]

    def compare(self, ran: int, seconds: float) -> str:
        """The launch's last line about time: what `ran` trials took against what was predicted for them."""
        predicted = self.seconds(ran)
        return (f"time: {self._count(ran)} took {describe_seconds(seconds)}, predicted {describe_seconds(predicted)} "
                f"at the start ({seconds / predicted:.2f}× the prediction, {self.model.basis()})")

    def kept(self) -> dict:
        """What the study keeps of its latest start prediction (records.FORECAST)."""
        return {"machine": self.model.machine, "trials": self.trials, "seconds": self.seconds(), "based_on": self.model.basis()}

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


def time_left_field(seconds: float) -> str:
    return f"~{describe_seconds(seconds)} left (predicted)"
