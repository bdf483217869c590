"""Errors that the storage and its gRPC proxy client share, kept apart so that neither module imports the other."""

from __future__ import annotations


class StudyFull(RuntimeError):
    """The storage proxy refused a new trial: finished and running trials already make up the study's total."""
