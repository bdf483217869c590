"""On the test Ray cluster's nodes and in the test Slurm's jobs (this directory is on their PYTHONPATH): Ray's worker
processes and `python -m study` import tests/hooked_trainer.py, so that a test can hold a trial inside its actor or
its worker (HOOKED_HOLD_DIR, HOOKED_HOLD_AT)."""

import os
import sys

if os.environ.get("HOOKED_HOLD_DIR") and (sys.argv and sys.argv[0].endswith("default_worker.py") or sys.orig_argv[1:3] == ["-m", "study"]):
    import hooked_trainer  # noqa: F401 -- wraps objectives.train at import
