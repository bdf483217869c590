"""What must happen once per study: a claim in the study's storage that one process at a time holds.

`finalize` trains the final model and registers it once; two finalizes at once would train twice and register two
versions. So it first claims the study: a study user attribute (records.FINALIZE_CLAIM) naming the holder's host
and pid, a token of its own, and the time of its last heartbeat. The claim is read and written under setup_lock (a
file lock beside a journal or SQLite file, an advisory lock on PostgreSQL), so that checking it and taking it are
one step: two processes never both hold it. The holder writes its heartbeat every BEAT seconds and gives the claim
up when it ends, also on an error or a signal.

A claim whose holder died (kill -9, a lost machine) is taken over: on the holder's host when its pid no longer
exists, from any host when its heartbeat is older than LEASE seconds (hosts' clocks must agree to well within it).
A holder that finds its claim taken over (its heartbeats did not reach the storage for that long) stops before
it keeps anything. The gRPC proxy offers no lock to check and set under: there the claim is only checked, so start
one finalize at a time.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import optuna

from study.storage import open_storage, pid_alive, setup_lock

BEAT = 10    # seconds between a holder's heartbeats
LEASE = 60   # seconds after its last heartbeat that a holder on another host counts as dead


class ClaimTaken(ValueError):
    """Another live process holds the claim: one `error:` line, exit 1."""


def holder(claim: dict) -> str:
    """Who holds a claim, for messages."""
    return f"host {claim['host']}, pid {claim['pid']}"


def alive(claim: dict) -> bool:
    """Whether a claim's holder may still be running: its heartbeat is recent, and on this host its pid exists."""
    if time.time() - claim["beat"] > LEASE:
        return False
    return claim["host"] != socket.gethostname() or pid_alive(claim["pid"])


class Claim:
    """The claim `key` of study `study_name`, held by this process: `dead` is the claim of a dead holder it took over
    (None if there was none), `check` raises if another process took it over since."""

    def __init__(self, url: str | None, study_name: str, key: str, command: str):
        self.url, self.study_name, self.key, self.command = url, study_name, key, command
        self.storage = open_storage(url)
        self.study_id = self.storage.get_study_id_from_name(study_name)
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.dead: dict | None = None
        self._serial = threading.Lock()  # the heartbeat thread and the main one take setup_lock one at a time
        self._stop = threading.Event()

    @contextmanager
    def _locked(self) -> Iterator[dict | None]:
        """The claim as the storage holds it now (None: nobody holds it), with every other claimant waiting."""
        with self._serial, setup_lock(self.url, self.storage, self.study_name):
            yield self.storage.get_study_user_attrs(self.study_id).get(self.key)

    def _write(self, claim: dict | None) -> None:
        self.storage.set_study_user_attr(self.study_id, self.key, claim)

    def take(self) -> None:
        with self._locked() as current:
            if current and alive(current):
                raise ClaimTaken(f"{self.command} of study {self.study_name} is already running ({holder(current)}, heartbeat "
                                 f"{time.time() - current['beat']:.0f} s ago); this one did nothing: once that one has ended, "
                                 f"`python -m study {self.command} {self.study_name}` again shows its run")
            self.dead = current or None
            self._write({**self.mine, "beat": time.time()})

    def check(self) -> None:
        """Raises if the claim is no longer this process's: its heartbeats did not reach the storage within LEASE, and
        another process took it over; what this one made must not be kept."""
        with self._locked() as current:
            if not current or current.get("token") != self.mine["token"]:
                taker = f" by {holder(current)}" if current else ""
                raise ClaimTaken(f"{self.command} of study {self.study_name}: the claim was taken over{taker} while this one ran "
                                 f"(no heartbeat reached the storage for {LEASE} s); nothing of this run is kept")

    def _beat(self) -> None:
        while not self._stop.wait(BEAT):
            try:
                with self._locked() as current:
                    if not current or current.get("token") != self.mine["token"]:
                        return  # taken over: check() says so to the main thread
                    self._write({**current, "beat": time.time()})
            except Exception:  # noqa: BLE001, S112 -- a storage that does not answer now may answer at the next beat
                continue

    def release(self) -> None:
        with self._locked() as current:
            if current and current.get("token") == self.mine["token"]:
                self._write(None)


@contextmanager
def claimed(url: str | None, study_name: str, key: str, command: str) -> Iterator[Claim]:
    """Hold the claim `key` of the study for the block, with a heartbeat; ClaimTaken if a live process holds it."""
    claim = Claim(url, study_name, key, command)
    try:
        claim.take()
        beats = threading.Thread(target=claim._beat, name=f"{command}-claim-heartbeat", daemon=True)
        beats.start()
        try:
            yield claim
        finally:
            claim._stop.set()
            beats.join()
            claim.release()
    finally:
        if isinstance(claim.storage, optuna.storages.RDBStorage):
            claim.storage.engine.dispose()
