"""`python tests/hooked_study.py ARGS` is `python -m study ARGS` with the trainer and the report writer wrapped, so
that a test can stop a launch at the phase it means to interrupt, or make one trial run out of device memory,
with no test hook in the product. The orders are environment variables, read at every call:

    HOOKED_HOLD_DIR  a process that reaches the phase writes `<pid>-<n>.json` here (pid, phase, arch, lr, seed,
                     epoch), then waits until the test creates `<pid>-<n>.json.release`, or for ever
    HOOKED_HOLD_AT   the phase: `start` (the trainer was called: the trial and its MLflow run exist, no epoch
                     has run), `epoch:E` (epoch E was reported, the trial is still training), `report` (every
                     trial is done, the report is about to be written), `store` (a first launch's MLflow store is
                     built under its temporary name, not yet in place)
    HOOKED_HOLD_LR   hold only the trials with this learning rate (default: every trial)
    HOOKED_OOM       `LR:EPOCH`: the trial with learning rate LR runs out of device memory in epoch EPOCH

The wrapping happens at import, not under `__main__`: spawned worker processes import this file again (as
`__mp_main__`) and are wrapped too; and before any `study` module is imported, since those bind `train` then.
The fork server of the tests (tests/forkserver.py) imports this module for the same reasons, and makes it the main
module of the commands it forks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

import dashboards
import dashboards.report
import objectives
import objectives.train

_train = sys.modules["objectives.train"].train
_write_report = dashboards.report.write_report
_holds = 0  # holds of this process, for unique file names


def _lr_matches(config) -> bool:
    wanted = os.environ.get("HOOKED_HOLD_LR")
    return wanted is None or float(wanted) == config.lr


def _hold(phase: str, config=None, epoch: int | None = None) -> None:
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


def hooked_train(config, data, on_epoch=None):
    hold_at = os.environ.get("HOOKED_HOLD_AT") if os.environ.get("HOOKED_HOLD_DIR") else None
    oom_lr, _, oom_epoch = os.environ.get("HOOKED_OOM", "").partition(":")
    if hold_at == "start" and _lr_matches(config):
        _hold("start", config)

    def watched(metrics):
        if oom_lr and float(oom_lr) == config.lr and metrics.epoch == int(oom_epoch):
            # Raised inside the trainer's epoch loop, as a real CUDA out-of-memory error is.
            raise torch.OutOfMemoryError(f"HOOKED_OOM={oom_lr}:{oom_epoch}: out of memory injected in epoch {metrics.epoch}")
        stop = on_epoch(metrics) if on_epoch is not None else None
        if hold_at == f"epoch:{metrics.epoch}" and _lr_matches(config):
            _hold(hold_at, config, metrics.epoch)
        return stop

    return _train(config, data, watched)


def hooked_write_report(*args, **kwargs):
    if os.environ.get("HOOKED_HOLD_DIR") and os.environ.get("HOOKED_HOLD_AT") == "report":
        _hold("report")
    return _write_report(*args, **kwargs)


sys.modules["objectives.train"].train = objectives.train = hooked_train
dashboards.report.write_report = dashboards.write_report = hooked_write_report

import study.tracking  # after the trainer is wrapped: study modules bind `train` on import

_copy_empty_store = study.tracking._copy_empty_store


def hooked_copy_empty_store(path):
    _copy_empty_store(path)
    if os.environ.get("HOOKED_HOLD_DIR") and os.environ.get("HOOKED_HOLD_AT") == "store":
        _hold("store")


study.tracking._copy_empty_store = hooked_copy_empty_store

if __name__ == "__main__":
    import signal

    import study.cli

    # Ctrl-C raises KeyboardInterrupt, as in a terminal, also when the tests run with SIGINT ignored (a shell's
    # background job), which Python would otherwise keep ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(study.cli.main(sys.argv[1:]))
