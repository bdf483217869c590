"""Ctrl-C and SIGTERM (kill, systemd, a batch scheduler) in `launch`, `worker`, `confirm` and `finalize`: a stop that
leaves no record half-written.

A launch or worker stops wherever the first signal lands (`anywhere`): its trial runner records the running
trials as interrupted, closes their MLflow runs, and a relaunch runs them again. In `confirm` and `finalize`:

The first signal stops a network that is training at once (KeyboardInterrupt): the trial runner (study.launch)
and finalize record that training as interrupted and close its MLflow run KILLED. Anywhere else (an Optuna
write and its MLflow mirror, a trial being queued or closed, a model being logged or registered) the signal is
held and raised at the next safe point (`check`), so each of those finishes whole. Signals after the first are
ignored: they would cut that recording short. The command then exits 130, and running it again finishes the work.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupts:
    """The signals one command received; without `installed`, a plain Ctrl-C raises wherever it lands, as usual."""

    def __init__(self, anywhere: bool = False):
        self.anywhere = anywhere  # the first signal raises wherever it lands (launch, worker)
        self.stopping = False  # a signal arrived
        self.training = False  # a network is training: a signal stops it at once

    def _on_signal(self, signum, frame) -> None:
        if self.stopping:
            print("already stopping: recording what was running as interrupted", file=sys.stderr)
            return
        self.stopping = True
        if self.training or self.anywhere:
            raise KeyboardInterrupt

    def check(self) -> None:
        """A safe point: the signal held since, if any, stops the command here."""
        if self.stopping:
            raise KeyboardInterrupt

    @contextmanager
    def while_training(self) -> Iterator[None]:
        """Around a training only, which its caller records as interrupted when a signal ends it."""
        self.check()
        try:
            self.training = True
            yield
        finally:
            self.training = False

    @contextmanager
    def installed(self) -> Iterator[Interrupts]:
        """SIGINT and SIGTERM handled as above for the block (main thread only: Python handles no signals elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                # Once stopped, the process only exits: later signals of a burst must not kill it half-way out.
                signal.signal(signum, signal.SIG_IGN if self.stopping else handler)
