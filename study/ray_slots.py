"""Trial slots as Ray actors: `launch NAME --ray ADDRESS` makes the launcher a Ray driver.

A `RaySlot` is the Ray implementation of a trial slot (study.pool holds the local ones, in this process and
in worker processes): the same `ready`, `train(config, on_epoch) -> TrainResult` and `stop`. Its actor holds
the data, trains one TrainConfig at a time in a thread of its own, and hands each ("epoch", EpochMetrics)
to the launcher, which answers prune or go on; so the launcher stays the only writer of the Optuna storage
and of MLflow, as with local workers. The messages are study.messages', carried by Ray calls:

    driver -> actor   start(config, checkpoint, resume)   train this
    driver -> actor   next()            the actor's next message: ("epoch", EpochMetrics), ("result", TrainResult)
                                        or ("error", kind, message)
    driver -> actor   answer(stop)      after an epoch: True stops the trial (pruning)

Ray places the actors: `num_gpus = 1 / trials_per_gpu` each on a cluster with GPUs, one CPU each on a CPU
cluster. The verified data goes into Ray's object store once; every actor, on whatever node, reads it from
there and checks its digest, so no node needs the files or the internet.
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, OutOfMemoryError, RayActorError

from objectives import DataError, EpochMetrics, FashionMNIST, TrainConfig, TrainResult
from study.messages import follow_trial, train_trial
from study.pool import WorkerDied

SPLITS = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels")
PROBE_TIMEOUT = 5  # seconds for a Ray address to accept a connection, and again to complete gRPC's handshake


def connect(address: str) -> None:
    """Join the Ray cluster at `address` (auto, ray://host:port, or a host:port GCS address) as its driver."""
    _check_answers(address)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConnectionError(f"--ray {address}: no Ray cluster there ({str(error).strip().splitlines()[0]}); "
                              "start one with `ray start --head`, or give its address") from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)  # ray.init takes SIGTERM; it stops the launch as Ctrl-C does


def _check_answers(address: str) -> None:
    """A cluster answers at `address`, each step bounded by PROBE_TIMEOUT: a TCP connection, then gRPC's handshake.

    ray.init waits minutes on an address with nothing behind it: 20 tries of about 41 s each for a GCS address,
    30 s for ray://; and for ever, in effect, on a port that accepts and never answers. It dials the address as
    Ray resolves it (auto read from RAY_ADDRESS or the last `ray start`, this machine's loopback as its IP), so
    that is what is tried here.
    """
    from ray._private.services import canonicalize_bootstrap_address

    try:
        target = address.removeprefix("ray://") if address.startswith("ray://") else canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError):
        return  # no cluster recorded for auto, or a malformed address: ray.init says so at once
    host, _, port = (target or "").rpartition(":")
    if not host or not port.isdigit():
        return  # "local" starts a cluster in this process; a malformed ray:// address fails in ray.init at once
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT).close()
    except OSError as error:
        raise ConnectionError(f"--ray {address}: no Ray cluster at {target} ({error.strerror or error}); "
                              "start one with `ray start --head`, or give its address") from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # a plain handshake would fail on a TLS cluster; ray.init makes its own with the certificates
    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=PROBE_TIMEOUT)
    except grpc.FutureTimeoutError:
        raise ConnectionError(f"--ray {address}: {target} accepts connections but does not answer as a Ray cluster within "
                              f"{PROBE_TIMEOUT} s; check the address (the head's GCS port, 6379 by default, or ray://HOST:10001)") from None
    finally:
        channel.close()


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """md5 over the arrays as they travel: what an actor received is what the driver verified and sent."""
    digest = hashlib.md5()
    for name in SPLITS:
        digest.update(np.ascontiguousarray(arrays[name]).data)
    return digest.hexdigest()


@ray.remote(max_restarts=0, max_concurrency=4)
class TrialActor:
    """One trial slot on a Ray node: the data in memory, one training at a time in a thread."""

    def __init__(self, arrays: dict, threads: int):
        self.arrays, self.threads = arrays, threads
        self.data: FashionMNIST | None = None
        self.outbox: queue.Queue = queue.Queue()
        self.inbox: queue.Queue = queue.Queue()

    def node(self) -> str:
        """Check and unpack the data (once), then say where this actor runs: hostname and Ray node id."""
        if self.data is None:
            if _arrays_digest(self.arrays) != self.arrays["digest"]:
                raise DataError("Fashion-MNIST arrays from Ray's object store do not match the digest the launcher sent")
            torch.set_num_threads(self.threads)
            tensors = {name: torch.from_numpy(self.arrays[name].copy()) for name in SPLITS}  # the store's arrays are read-only
            self.data = FashionMNIST(**tensors, source=self.arrays["source"], digest=self.arrays["files_digest"])
            self.arrays = None
        return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()}"

    def start(self, config: TrainConfig, checkpoint: Path | None, resume: bool) -> None:
        threading.Thread(target=self._train, args=(config, checkpoint, resume), daemon=True).start()

    def next(self):
        return self.outbox.get()

    def answer(self, stop: bool) -> None:
        self.inbox.put(stop)

    def _train(self, config: TrainConfig, checkpoint: Path | None, resume: bool) -> None:
        train_trial(config, self.data, checkpoint, resume, self.outbox.put, self.inbox.get)


class RaySlot:
    """One trial slot as a Ray actor, started (again) whenever it has none: after a lost node, Ray places the new one.
    An actor that Ray's memory monitor killed is not replaced: its slot retires (study.launch.Scheduler), so that the
    node's memory holds the actors that remain."""

    device = None  # the actor trains on what Ray gave it: "auto" finds its GPU (CUDA_VISIBLE_DEVICES) or the CPU
    elsewhere = True  # on the node Ray places it on: the launcher's timings stand for it until its trials finish (study.budget)

    def __init__(self, arrays_ref: ray.ObjectRef, options: dict, threads: int):
        self.arrays_ref, self.options, self.threads = arrays_ref, options, threads
        self.actor = None
        self.placed = None  # the ObjectRef of the actor's node(): ready once the data is unpacked
        self.node: str | None = None
        self.stopping = False
        self.retiring = False  # Ray's memory monitor killed its actor: the slot takes no more trials, unless it is the last

    def ready(self, timeout: float) -> bool:
        """True once the actor runs and holds the data; False while Ray has no room for it yet."""
        if self.stopping:
            return False
        if self.actor is None:
            self.actor = TrialActor.options(**self.options).remote(self.arrays_ref, self.threads)
            self.placed, self.node = self.actor.node.remote(), None
        if self.node is None:
            try:
                self.node = ray.get(self.placed, timeout=timeout)
            except GetTimeoutError:
                return False
            except RayActorError:
                self.actor = None  # its node went away before it started; the next call places a new one
                return False
            except OutOfMemoryError:
                self._end()
                self.retiring = True
                return False
        return True

    def train(self, config: TrainConfig, on_epoch: Callable[[EpochMetrics], bool], checkpoint: Path | None = None, resume: bool = False) -> TrainResult:
        while not self.ready(1.0):
            if self.stopping:
                raise KeyboardInterrupt
        self._call(self.actor.start.remote(config, checkpoint, resume))
        return follow_trial(lambda: self._call(self.actor.next.remote()), lambda stop: self._call(self.actor.answer.remote(stop)), on_epoch,
                            self._end)

    def _call(self, ref: ray.ObjectRef):
        try:
            return ray.get(ref)
        except (RayActorError, OutOfMemoryError) as error:
            if self.stopping:
                raise KeyboardInterrupt from None
            node, cause = self.node, (str(error).strip().splitlines() or [type(error).__name__])[0]
            if isinstance(error, OutOfMemoryError):
                self._end()  # the monitor killed its worker; killed here too, should only the call have failed
                self.retiring = True
                raise WorkerDied(f"Ray's memory monitor killed the actor on node {node} ({cause})") from None
            self.actor, self.node = None, None
            raise WorkerDied(f"Ray actor on node {node} died ({cause})") from None

    def stop(self) -> None:
        """End the actor now, also in the middle of a trial (Ctrl-C); that trial then sees KeyboardInterrupt."""
        self.stopping = True
        self._end()

    def _end(self) -> None:
        if self.actor is not None:
            ray.kill(self.actor, no_restart=True)
            self.actor, self.node = None, None


def capacity(trials_per_gpu: int) -> int:
    """Trial slots the cluster holds now: `trials_per_gpu` per GPU, else one per CPU."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    return gpus * trials_per_gpu if gpus else max(1, int(resources.get("CPU", 1)))


def ray_slots(workers: int | None, trials_per_gpu: int) -> Callable[[FashionMNIST], list[RaySlot]]:
    """The launch's trial slots, made once the driver holds the data: `workers` of them (default: the cluster's capacity)."""

    def make(data: FashionMNIST) -> list[RaySlot]:
        arrays = {name: getattr(data, name).numpy() for name in SPLITS}
        arrays |= {"digest": _arrays_digest(arrays), "source": data.source, "files_digest": data.digest}
        arrays_ref = ray.put(arrays)  # once; every actor reads it from the object store of its node
        gpus = int(ray.cluster_resources().get("GPU", 0))
        options = {"num_gpus": 1 / trials_per_gpu, "num_cpus": 0} if gpus else {"num_cpus": 1}
        count = workers or capacity(trials_per_gpu)
        return [RaySlot(arrays_ref, options, threads=1) for _ in range(count)]  # one CPU each; on a GPU the CPU only feeds it

    return make
