"""`python tests/hooked_study.py ARGS` is `python -m study ARGS` with the trainer and the report writer wrapped, so
that a test can stop a launch at the phase it means to interrupt, or make one trial run out of device memory,
with no test hook in the product. The orders are environment variables, read at every call:

    HOOKED_HOLD_DIR  a process that reaches the phase writes `<pid>-<n>.json` here (pid, phase, arch, lr, seed,
                     epoch), then waits until the test creates `<pid>-<n>.json.release`, or for ever
    HOOKED_HOLD_AT   the phase: `start` (the trainer was called: the trial and its MLflow run exist, no epoch
                     has run), `epoch:E` (epoch E was reported, the trial is still training), `inside:E` (the
                     first batch of epoch E is being prepared), `checkpoint:N` (the N-th checkpoint the process
                     writes is in its temporary file, not yet under its name), `report` (every
                     trial is done, the report is about to be written), `store` (a first launch's MLflow store is
                     built under its temporary name, not yet in place)
    HOOKED_HOLD_LR   hold only the trials with this learning rate (default: every trial)
    HOOKED_OOM       `LR:EPOCH`: the trial with learning rate LR runs out of device memory in epoch EPOCH
    HOOKED_EPOCH_LOG a file to which every epoch trained is appended as a JSON line (lr, epoch, resumed)
    HOOKED_RAY_OOM   a file path (launch --ray): the first trial actor to create it fails as an actor that Ray's memory
                     monitor killed fails (the driver's ray.get raises ray.exceptions.OutOfMemoryError); read at import

The wrapping happens at import, not under `__main__`, and before any `study` module is imported, since those bind
`train` then. The trainer's wrapping lives in tests/hooked_trainer.py, which trial workers import alone; a worker
spawned by `python tests/hooked_study.py` imports this file again (as `__mp_main__`) and wraps only the trainer.
The fork server of the tests (tests/forkserver.py) imports this module for the same reasons.
"""

from __future__ import annotations

import os
import sys

import hooked_trainer  # first: it wraps the trainer

if __name__ != "__mp_main__":  # a spawned trial worker only trains
    import dashboards
    import dashboards.report

    _write_report = dashboards.report.write_report

    def hooked_write_report(*args, **kwargs):
        if hooked_trainer.held_phase() == "report":
            hooked_trainer.hold("report")
        return _write_report(*args, **kwargs)

    dashboards.report.write_report = dashboards.write_report = hooked_write_report

    import study.tracking  # after the trainer is wrapped: study modules bind `train` on import

    _copy_empty_store = study.tracking._copy_empty_store

    def hooked_copy_empty_store(path):
        _copy_empty_store(path)
        if hooked_trainer.held_phase() == "store":
            hooked_trainer.hold("store")

    study.tracking._copy_empty_store = hooked_copy_empty_store

if __name__ == "__main__" and os.environ.get("HOOKED_RAY_OOM"):
    import ray
    import ray.exceptions

    import study.ray_slots

    class MemoryKilledActor(study.ray_slots.TrialActor.__ray_metadata__.modified_class.__mro__[1]):  # the class under @ray.remote
        marker = os.environ["HOOKED_RAY_OOM"]  # a class attribute: the actors' nodes do not have the variable

        def start(self, config, checkpoint, resume):
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))  # one actor of all the nodes' (they share this host)
                self.killed = True
            except FileExistsError:
                self.killed = False
                super().start(config, checkpoint, resume)

        def next(self):
            if self.killed:
                raise ray.exceptions.OutOfMemoryError("1 worker(s) were killed due to the node running low on memory (HOOKED_RAY_OOM)")
            return super().next()

    study.ray_slots.TrialActor = ray.remote(max_restarts=0, max_concurrency=4)(MemoryKilledActor)

if __name__ == "__main__":
    import signal

    import study.cli

    # Ctrl-C raises KeyboardInterrupt, as in a terminal, also when the tests run with SIGINT ignored (a shell's
    # background job), which Python would otherwise keep ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(study.cli.main(sys.argv[1:]))
