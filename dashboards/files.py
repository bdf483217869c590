"""Files the project writes itself (exports, reports, figures): whole or not at all, and named safely.

Files are written whole or not at all (objectives.files.write_whole: temporary name, fsync, rename), the one
way the project writes a file, which the trainer's checkpoints use too.

A file named after a study or a model (`named_file`) takes a slug of that name: the name is data (a study in a
shared storage may be named anything, `../x` or `/etc/x` included), never a path.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from objectives.files import WriteError, write_whole

__all__ = ["SLUG_BYTES", "WriteError", "named_file", "slug", "write_whole"]


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
