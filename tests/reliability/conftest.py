"""Fixtures of the reliability suite (defined in checks.py, beside the checker they serve)."""

from reliability.checks import figures, lenet_spec, other_host, postgres_db, small_tmpfs  # noqa: F401 -- fixtures
