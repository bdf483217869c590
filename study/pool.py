"""Trial slots on this machine: each holds the data on its device, trains one config at a time, and streams
per-epoch metrics back to the launcher, which reports, prunes and logs.

A trial slot is any object with `device` (None or "cuda:N"), `node` (where it trains), `elsewhere` (whether that
may be another machine than the launcher's), `threads` (torch's CPU threads it trains with), `ready(timeout)` (True
once it can train), `train(config, on_epoch, checkpoint, resume) -> TrainResult` and `stop()`: `checkpoint`, a path
where the slot's trainer keeps the trial's checkpoint (None: none), from which it resumes when `resume`. Two kinds
live here: `InProcess` (one slot, in the launcher's process) and `Worker` (a process of its own); study.ray_slots
adds Ray actors.

So locally the launcher stays the only writer of the Optuna storage and the MLflow store, and the
trainer stays free of Optuna and MLflow. A worker is a spawned process (CUDA cannot be forked); the launcher
talks to it over a pipe, in the messages of study.messages, after the worker's ("ready",) once it holds the data.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import torch

import objectives
from objectives import EpochMetrics, FashionMNIST, TrainConfig, TrainResult
from study.messages import follow_trial, train_trial


class WorkerDied(RuntimeError):
    """The worker process ended in the middle of a trial (killed, out of host memory)."""


def _serve(conn, data_dir: str | None, threads: int) -> None:
    """The worker process: load the data once, then train whatever the launcher sends until it hangs up."""
    import torch

    from objectives import load_fashion_mnist

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle; it stops us
    torch.set_num_threads(threads)
    data = load_fashion_mnist(data_dir)
    conn.send(("ready",))
    while True:
        try:
            config, checkpoint, resume = conn.recv()
            train_trial(config, data, checkpoint, resume, conn.send, conn.recv, passes=(EOFError, OSError))
        except (EOFError, OSError):
            return  # the launcher is gone; an OSError of the trial's own ends this process too, which the launcher sees


class InProcess:
    """The one trial slot of a single-device launch: trains in the launcher's process, on the data it holds."""

    retiring = False  # only a Ray slot retires (study.ray_slots.RaySlot)
    elsewhere = False  # it trains on this machine; a Ray slot wherever Ray places it

    def __init__(self, device: str, data: FashionMNIST):
        self.device = None if device == "auto" else device
        self.data = data
        self.node = socket.gethostname()
        self.threads = torch.get_num_threads()  # the launcher's own: it trains here

    def ready(self, timeout: float) -> bool:
        return True

    def train(self, config: TrainConfig, on_epoch: Callable[[EpochMetrics], bool], checkpoint: Path | None = None, resume: bool = False) -> TrainResult:
        resumed = objectives.read_checkpoint(checkpoint, config) if resume else None
        return objectives.train(config, self.data, on_epoch, checkpoint, resumed)  # looked up at each call, so a wrapped trainer is the one that runs

    def stop(self) -> None:
        pass  # Ctrl-C reaches the training in this process directly


class Worker:
    """One trial slot: a process pinned to one device."""

    retiring = False  # a worker process that died is started again; only a Ray slot retires (study.ray_slots.RaySlot)
    elsewhere = False

    def __init__(self, device: str, data_dir: str | None, threads: int):
        self.device = None if device == "auto" else device  # None: the CPU here
        self.data_dir, self.threads = data_dir, threads
        self.node = socket.gethostname()
        self.process = None
        self.stopping = False
        self.starting = threading.Lock()  # stop() from another thread never meets a process half-started

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        with self.starting:
            if self.stopping:
                raise KeyboardInterrupt  # stopped before this slot's process began: none is started
            self.conn, child = context.Pipe()
            process = context.Process(target=_serve, args=(child, self.data_dir, self.threads), daemon=True)
            process.start()
            self.process = process
        child.close()
        self._recv()  # ("ready",): the data is loaded

    def _recv(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            if self.stopping:
                raise KeyboardInterrupt from None
            self.process.join(5)
            code = self.process.exitcode
            self.process = None
            raise WorkerDied(f"worker process died (exit code {code})") from None

    def ready(self, timeout: float) -> bool:
        if self.process is None and not self.stopping:
            self.start()  # returns once the process holds the data
        return not self.stopping

    def train(self, config: TrainConfig, on_epoch: Callable[[EpochMetrics], bool], checkpoint: Path | None = None, resume: bool = False) -> TrainResult:
        if self.stopping:
            raise KeyboardInterrupt
        if self.process is None:
            self.start()
        self.conn.send((config, checkpoint, resume))
        return follow_trial(self._recv, self.conn.send, on_epoch, self._end)

    def stop(self) -> None:
        """End the process now, also in the middle of a trial (Ctrl-C); that trial then sees KeyboardInterrupt. Quiet in
        every state: not started yet, starting, training, or already gone."""
        with self.starting:
            self.stopping = True
            process = self.process  # the slot's thread may drop it meanwhile (the process died)
        if process is not None:
            process.kill()  # SIGKILL; multiprocessing ignores a process that has already ended

    def _end(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.join(5)


def local_slots(devices: list[str], data_dir: str | None) -> Callable[[FashionMNIST], list]:
    """The launch's trial slots on this machine, one per device entry, made once the launcher holds the data."""

    def make(data: FashionMNIST) -> list:
        if len(devices) == 1:
            return [InProcess(devices[0], data)]
        return [Worker(device, data_dir, cpu_threads(len(devices))) for device in devices]

    return make


def cpu_cores() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads(workers: int) -> int:
    """Torch threads per worker so that the workers together use each core once."""
    return max(1, cpu_cores() // workers)


def cap_workers(devices: list[str], to_run: int) -> tuple[list[str], str]:
    """The trial slots a launch starts: no more than the trials still to run, and on the CPU no more than its cores
    (more would only share them). Returns the slots and why they are fewer than asked ("" when they are not)."""
    import records  # here, not at the top: trial worker processes import this module and need no Optuna

    reasons = []
    if to_run < len(devices):
        reasons.append(f"{records.count(to_run, 'trial')} still to run")
    cores = cpu_cores()
    if devices[0] == "auto" and cores < len(devices):
        reasons.append(f"{records.count(cores, 'CPU core')} here")
    limit = min(to_run, cores) if devices[0] == "auto" else to_run
    return devices[:max(1, limit)], " and ".join(reasons)  # one slot also for a study already full: it finds nothing to run


def devices(workers: int | None, gpus: str | None, trials_per_gpu: int) -> list[str]:
    """One device per trial slot, from --workers, --gpus and --trials-per-gpu, checked against this machine.

    Default: every visible GPU, `trials_per_gpu` slots each; without a GPU, one slot on the CPU.
    """
    import torch

    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1; got {workers}")
    if trials_per_gpu < 1:
        raise ValueError(f"--trials-per-gpu must be >= 1; got {trials_per_gpu}")
    count = torch.cuda.device_count()
    if gpus is None:
        indices = list(range(count))
    else:
        try:
            indices = [int(part) for part in gpus.split(",")]
        except ValueError:
            raise ValueError(f"--gpus {gpus}: give GPU indices separated by commas, e.g. --gpus 0,1") from None
        missing = [i for i in indices if not 0 <= i < count]
        if missing:
            have = f"GPUs 0..{count - 1}" if count else "no CUDA GPU"
            raise ValueError(f"--gpus {gpus}: GPU {missing[0]} is not there; this machine has {have} (torch.cuda.device_count() is {count})")
        if len(set(indices)) != len(indices):
            raise ValueError(f"--gpus {gpus}: a GPU is named twice; use --trials-per-gpu to share one")
    if not indices:
        return ["auto"] * (workers or 1)
    slots = [f"cuda:{i}" for i in indices for _ in range(trials_per_gpu)]
    if workers is not None:
        slots = [slots[i % len(slots)] for i in range(workers)]  # round robin over the GPUs
    return slots
