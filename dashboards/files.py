"""Files the project writes itself (exports, reports, figures): whole or not at all, and named safely.

A file is written under a unique temporary name in its own directory (two writers of one path never share a
temporary, and the rename stays on one file system), flushed to the disk, then renamed over the target in one
step: a reader sees the previous file or the new one, never a part of it. On any failure the temporary is
removed, the previous file stays as it was, and the error names the file.

A file named after a study or a model (`named_file`) takes a slug of that name: the name is data (a study in a
shared storage may be named anything, `../x` or `/etc/x` included), never a path.
"""

from __future__ import annotations

import hashlib
import os
import re
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


SLUG_BYTES = 100  # a slug's bound in UTF-8 bytes: room for a suffix and the temporary's affixes under a file system's 255
_UNSAFE = re.compile(r"[^\w+.-]")  # \w: Unicode letters and digits, and "_", which stands for each character replaced
_HASHED = re.compile(r"-[0-9a-f]{10}$")  # what a slug ends with when it carries its name's hash


def slug(name: str) -> str:
    """A safe file name made from `name`: one path component (no separator, no `..`, no leading dot, no control
    character) of at most SLUG_BYTES bytes. A name that is already such a component is its own slug; any other
    ends with a hash of the whole name, so that distinct names never share a slug (`a/b` and `a:b` both read `a_b`)."""
    kept = _UNSAFE.sub("_", name)
    kept = re.sub(r"\.\.+", lambda dots: "_" * len(dots.group()), kept)  # no `..` anywhere, not only as a whole
    kept = re.sub(r"^\.", "_", kept)  # no hidden file, nor a name like the temporaries of write_whole
    if kept == name and kept and len(name.encode()) <= SLUG_BYTES and not _HASHED.search(name):
        return name
    digest = "-" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    room = SLUG_BYTES - len(digest)
    return (kept.encode()[:room].decode(errors="ignore") or "_") + digest  # cut on a character boundary


def named_file(folder: Path, name: str, suffix: str) -> Path:
    """The file named after `name` (a study or model name; see slug) with `suffix` in `folder`, and nowhere else."""
    path = Path(folder) / f"{slug(name)}{suffix}"
    inside = Path(folder).resolve()
    if (inside / path.name).parent != inside:  # by construction; checked, since a file outside would be written over
        raise ValueError(f"{name!r}: its file {path} would not be in {folder}")
    return path
