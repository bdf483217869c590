"""The messages between the launcher and a trial slot that trains apart from it (study.pool's worker processes over
a pipe, study.ray_slots' actors through Ray calls): the one protocol of both, whatever carries it.

    launcher -> slot   (TrainConfig, checkpoint, resume)   train this (objectives.train's checkpoint and resume)
    slot -> launcher   ("epoch", EpochMetrics)     after every epoch; the launcher answers True to stop (pruning)
    slot -> launcher   ("result", TrainResult)     or ("error", kind, message)

`train_trial` runs on the slot's side, `follow_trial` on the launcher's. Only torch and `objectives` are imported:
trial worker processes import this module and need no Optuna.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import objectives
from objectives import DeviceOutOfMemoryError, DivergedError, EpochMetrics, FashionMNIST, TrainConfig, TrainResult

EPOCH, RESULT, ERROR = "epoch", "result", "error"

# The errors that end one trial with a reason of their own (objectives.train's contract), by the kind that names them
# in an error message and in the trial's recorded reason. Any other error travels as the name of its class.
ERRORS = {"diverged": DivergedError, "out of memory": DeviceOutOfMemoryError}
TRIAL_ERRORS = tuple(ERRORS.values())


def error_kind(error: BaseException) -> str:
    """The kind that names `error`: its key in ERRORS, else the name of its class."""
    return next((kind for kind, known in ERRORS.items() if isinstance(error, known)), type(error).__name__)


def train_trial(config: TrainConfig, data: FashionMNIST, checkpoint: Path | None, resume: bool, send: Callable[[tuple], None],
                receive: Callable[[], bool], passes: tuple[type[BaseException], ...] = ()) -> None:
    """Train one trial in a slot, sending its messages: ("epoch", metrics) after each epoch, whose answer `receive()`
    gives (True: stop), then ("result", TrainResult) or ("error", kind, message). An error of a class in `passes` is
    raised instead of sent (a worker process's pipe that broke: the launcher is gone)."""

    def on_epoch(metrics: EpochMetrics) -> bool:
        send((EPOCH, metrics))
        return receive()

    try:
        resumed = objectives.read_checkpoint(checkpoint, config) if resume else None  # on the slot's node: --checkpoint-dir is shared
        result = objectives.train(config, data, on_epoch, checkpoint, resumed)  # looked up at each call, so a wrapped trainer runs
    except passes:
        raise
    except Exception as error:  # noqa: BLE001 -- sent back so the launcher records it on the trial
        send((ERROR, error_kind(error), str(error)))
        return
    if result.model is not None:
        result.model = result.model.to("cpu")  # a CUDA tensor cannot be unpickled by another process (or a driver with no GPU) as it is
    send((RESULT, result))


def follow_trial(receive: Callable[[], Any], answer: Callable[[bool], None], on_epoch: Callable[[EpochMetrics], bool],
                 end: Callable[[], None]) -> TrainResult:
    """The launcher's side of one trial: hand each epoch to `on_epoch` and `answer` whether to stop, until the result,
    which it returns, or the error, which it raises (one of ERRORS by its kind, else RuntimeError naming it). Should
    `on_epoch` raise, `end()` ends the slot's process or actor first: it waits for an answer that will not come."""
    while True:
        message = receive()
        if message[0] == EPOCH:
            try:
                stop = bool(on_epoch(message[1]))
            except BaseException:
                end()  # the next trial gets a fresh process or actor
                raise
            answer(stop)
        elif message[0] == RESULT:
            return message[1]
        else:
            _, kind, text = message
            raise ERRORS.get(kind, RuntimeError)(text if kind in ERRORS else f"{kind}: {text}")
