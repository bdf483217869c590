"""Start `python -m study` commands fast: one interpreter imports torch, Optuna, MLflow, the project and what
a command loads on first use (MLflow's model flavour and store, matplotlib, Optuna's importance, plotly's
validators, the data) once, then forks
a process per command (one JSON request per stdin line, its pid on stdout).

Each child is a real process running `study.cli.main(argv)` with its own environment, standard output and
error files and exit status, so kill -9 and signals hit it as they hit a user's launch; only the 4-8 s of
imports and first uses are skipped. This process computes with torch only on the meta device and on one thread
(the data's split), so the forked children start with fresh thread pools. Its commands run with the trainer wrapped by
tests/hooked_study.py (imported before any `study` module), so a test can hold one at a phase. It reaps its
children at once (a zombie would still look alive to the launcher's dead-process check) and writes each exit
code to `<stdout>.rc`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

import hooked_study  # noqa: F401 -- wraps the trainer before `study` imports it
import matplotlib
import mlflow
import mlflow.pytorch
import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
import optuna
import optuna.importance  # noqa: F401
import plotly.graph_objects
import torch
from mlflow.utils.requirements_utils import _init_packages_to_modules_map

import dashboards  # noqa: F401 -- imported once here, for every forked command
import objectives.data
import study.cli
import study.launch
import study.reconcile
import study.session
from objectives.inspect import layer_costs

matplotlib.use("Agg")
import matplotlib.pyplot

layer_costs("lenet")  # torch's meta kernels register on first use: once here, not in every command
plotly.graph_objects.Figure(layout={"template": "plotly_white"})  # plotly reads its validators on a first figure
_init_packages_to_modules_map()  # MLflow maps modules to installed packages on a first model saved (0.7 s)
# The data, read and verified once: objectives.data keeps it while the files are as they are. One torch thread,
# so that no thread pool exists to be forked.
threads = torch.get_num_threads()
torch.set_num_threads(1)
objectives.data.verify()
torch.set_num_threads(threads)

logs: dict[int, str] = {}


def reap(signum, frame) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        rc = logs.pop(pid, f"/tmp/forkserver-{pid}.log") + ".rc"
        with open(f"{rc}.tmp", "w") as out:
            out.write(str(code))
        os.replace(f"{rc}.tmp", rc)  # whole or absent: the test reads it as soon as the process is gone


def run(request: dict) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # Ctrl-C raises KeyboardInterrupt, as in a terminal, also when this server was started with SIGINT ignored
    # (by a shell that runs the tests in the background), which Python would otherwise keep.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the request pipe
    stdout = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(stdout, 1)
    os.dup2(stdout if request["stderr"] == request["stdout"] else os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    os.environ.clear()
    os.environ.update(request["env"])
    # A worker process this command spawns imports the main module again: the hooked trainer alone
    # (tests/hooked_trainer.py), rather than this server's imports.
    sys.modules["__main__"] = sys.modules["hooked_trainer"]
    try:
        code = study.cli.main(request["argv"])
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    except BaseException:  # noqa: BLE001 -- shown in the log, which the tests search for tracebacks
        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    signal.signal(signal.SIGCHLD, reap)
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # record the log before the child can end
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            run(request)
        logs[pid] = request["stdout"]
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        print(pid, flush=True)


if __name__ == "__main__":
    main()
