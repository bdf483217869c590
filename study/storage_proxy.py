"""Optuna's gRPC storage proxy: `python -m study serve-storage --storage URL` and `--storage grpc://host:port`.

Many workers then share one process's connections to PostgreSQL (or one journal file) instead of holding
their own. The proxy also keeps a study within its total: PostgreSQL's advisory lock (study.storage.claim_lock)
cannot be taken through it, so the server counts and creates each new trial under one lock, and refuses a
trial beyond the study's recorded total (`StudyFull` at the worker). One proxy per study's storage.

    python -m study serve-storage --storage postgresql://db-host/studies --host 0.0.0.0 --port 13000
    python -m study worker vgg_ratio --storage grpc://proxy-host:13000
"""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import grpc
import optuna
from optuna.storages import GrpcStorageProxy
from optuna.storages._grpc.auto_generated import api_pb2_grpc
from optuna.storages._grpc.servicer import OptunaStorageProxyService
from optuna.trial import TrialState

import records
from study.errors import StudyFull

FULL = "the study holds its total of trials"


def study_full(storage: optuna.storages.BaseStorage, study_id: int) -> bool:
    """Counted as the launcher's claim does: finished trials that count, plus the running and queued ones."""
    total = storage.get_study_user_attrs(study_id).get("trials")
    if total is None:
        return False
    trials = storage.get_all_trials(study_id, deepcopy=False)
    pending = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    return records.count_done(trials) + pending >= total


class _Service(OptunaStorageProxyService):
    """Optuna's proxy service, with each new trial counted and created under one lock."""

    def __init__(self, storage: optuna.storages.BaseStorage):
        super().__init__(storage)
        self.claim = threading.Lock()

    def CreateNewTrial(self, request, context):  # the gRPC method's name
        if not request.template_trial_is_none:
            return super().CreateNewTrial(request, context)  # a queued trial (enqueue, retry): not a claim
        with self.claim:
            if study_full(self._backend, request.study_id):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, FULL)
            return super().CreateNewTrial(request, context)


def serve(storage: optuna.storages.BaseStorage, host: str, port: int, threads: int = 32) -> grpc.Server:
    """Start the proxy server on host:port; returns it running (`server.wait_for_termination()`)."""
    server = grpc.server(ThreadPoolExecutor(max_workers=threads))
    api_pb2_grpc.add_StorageServiceServicer_to_server(_Service(storage), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc raises or returns 0, by version
        bound = 0
    if bound == 0:
        raise OSError(f"serve-storage: cannot listen on {host}:{port} (in use, or not an address of this machine); choose another --port")
    server.start()
    return server


class GrpcStorage(GrpcStorageProxy):
    """Optuna's proxy client; a refused new trial is `StudyFull`."""

    def create_new_trial(self, study_id: int, template_trial=None) -> int:
        try:
            return super().create_new_trial(study_id, template_trial)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise StudyFull(FULL) from None
            raise


def connect(host: str, port: int, timeout: float = 10) -> GrpcStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = GrpcStorage(host=host, port=port)
    storage.wait_server_ready(timeout=timeout)
    return storage
