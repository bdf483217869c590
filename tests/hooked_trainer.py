"""The trainer of tests/hooked_study.py, wrapped so that a test can hold a trial at a phase or make it run out of device
memory (the orders are described there). Only torch and `objectives` are imported: trial workers import this and
nothing more (a worker spawned by a forked command, whose main module it is, and Ray's workers and the
test Slurm's `python -m study` through tests/ray_hook/sitecustomize.py), so that they start as fast as they would without the hook.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

import objectives
import objectives.checkpoint
import objectives.train

_train = sys.modules["objectives.train"].train
_prepare = sys.modules["objectives.train"]._prepare
_write_whole = sys.modules["objectives.checkpoint"].write_whole
_holds = 0  # holds of this process, for unique file names
_inside: dict = {}  # the epoch a trial of `inside:E` is in once it has started it: {"config": ..., "epoch": E}
_checkpoints = 0  # checkpoints this process began to write


def _lr_matches(config) -> bool:
    wanted = os.environ.get("HOOKED_HOLD_LR")
    return wanted is None or float(wanted) == config.lr


def hold(phase: str, config=None, epoch: int | None = None) -> None:
    """Tell the test where this process is, then wait for its release (a signal may end the wait)."""
    global _holds
    _holds += 1
    ready = Path(os.environ["HOOKED_HOLD_DIR"]) / f"{os.getpid()}-{_holds}.json"
    info = {"pid": os.getpid(), "phase": phase, "epoch": epoch, "arch": getattr(config, "arch", None), "lr": getattr(config, "lr", None),
            "seed": getattr(config, "seed", None)}
    ready.with_suffix(".tmp").write_text(json.dumps(info))
    ready.with_suffix(".tmp").replace(ready)  # whole or absent
    release = Path(f"{ready}.release")
    while not release.exists():
        time.sleep(0.02)


def held_phase() -> str | None:
    """The phase the test orders this process held at (HOOKED_HOLD_AT), if it gives a place to tell it (HOOKED_HOLD_DIR)."""
    return os.environ.get("HOOKED_HOLD_AT") if os.environ.get("HOOKED_HOLD_DIR") else None


def hooked_train(config, data, on_epoch=None, checkpoint=None, resume=None):
    if config.lr == sys.modules["objectives.train"].TIMING_LR:  # a command timing this machine (objectives.train.time_training), not a trial
        return _train(config, data, on_epoch, checkpoint, resume)
    hold_at = held_phase()
    oom_lr, _, oom_epoch = os.environ.get("HOOKED_OOM", "").partition(":")
    if hold_at == "start" and _lr_matches(config):
        hold("start", config)

    if hold_at and hold_at.startswith("inside:") and _lr_matches(config):
        _inside.update(config=config, epoch=None)

    def watched(metrics):
        if os.environ.get("HOOKED_EPOCH_LOG"):  # every epoch this process trained, for tests that count them
            with open(os.environ["HOOKED_EPOCH_LOG"], "a") as log:
                log.write(json.dumps({"lr": config.lr, "epoch": metrics.epoch, "resumed": resume is not None}) + "\n")
        if oom_lr and float(oom_lr) == config.lr and metrics.epoch == int(oom_epoch):
            # Raised inside the trainer's epoch loop, as a real CUDA out-of-memory error is.
            raise torch.OutOfMemoryError(f"HOOKED_OOM={oom_lr}:{oom_epoch}: out of memory injected in epoch {metrics.epoch}")
        stop = on_epoch(metrics) if on_epoch is not None else None
        if hold_at == f"epoch:{metrics.epoch}" and _lr_matches(config):
            hold(hold_at, config, metrics.epoch)
        if hold_at == f"inside:{metrics.epoch + 1}" and _lr_matches(config):
            _inside["epoch"] = metrics.epoch + 1  # the next batch prepared is the first of that epoch
        return stop

    return _train(config, data, watched, checkpoint, resume)


sys.modules["objectives.train"].train = objectives.train = hooked_train


def hooked_prepare(*args, **kwargs):
    """The trainer's batch preparation: `inside:E` holds at the first batch of epoch E, which is then provably under way."""
    if _inside.get("epoch") is not None:
        epoch, _inside["epoch"] = _inside["epoch"], None
        hold(f"inside:{epoch}", _inside["config"], epoch)
    return _prepare(*args, **kwargs)


def hooked_write_whole(path, write):
    """The checkpoint writer: `checkpoint:N` holds the N-th checkpoint this process writes once its content is in its
    temporary file and before that takes the checkpoint's name."""
    global _checkpoints
    _checkpoints += 1
    count = _checkpoints

    def written(out):
        write(out)
        if held_phase() == f"checkpoint:{count}":
            out.flush()
            hold(f"checkpoint:{count}")

    return _write_whole(path, written)


sys.modules["objectives.train"]._prepare = hooked_prepare
sys.modules["objectives.checkpoint"].write_whole = hooked_write_whole
