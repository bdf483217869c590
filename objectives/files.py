"""Files written whole or not at all: what the trainer's checkpoints and the project's exports and reports share.

A file is written under a unique temporary name in its own directory (two writers of one path never share a
temporary, and the rename stays on one file system), flushed to the disk, then renamed over the target in one
step: a reader sees the previous file or the new one, never a part of it. On any failure the temporary is
removed, the previous file stays as it was, and the error names the file. It lives here, with the trainer,
which may import nothing of dashboards/; dashboards.files re-exports it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class WriteError(OSError):
    """A file could not be written (its one line names it); the previous file, if any, is unchanged."""


def write_whole(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write `path` through `write(out)`, which writes the content to the binary file `out`; returns `path`."""
    path = Path(path)
    # O_EXCL: a name no one else holds. Not mkstemp: its files are private (0600), an export or report is not.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise _named(path, error) from None
    try:
        with os.fdopen(descriptor, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())  # on the disk before it takes the name: a crash leaves the old file or the new one
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _named(path, error) from None
        raise
    return path


def _named(path: Path, error: OSError) -> WriteError:
    return WriteError(f"cannot write {path}: {error.strerror or str(error).strip() or type(error).__name__}")
