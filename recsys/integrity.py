"""Size and sha256 records of a folder's files, and their check against such a record.

Checkpoints (``recsys.checkpoint``) and export folders (``recsys.serving.manifest``) are verified alike:
every file present with its recorded size (cheap: one listing), and with ``checksums`` its sha256. Paths go
through fsspec, so a folder may be local or any fsspec URL.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
from typing import Iterator

import fsspec

from recsys.config import UserError


def sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    with fs.open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_sizes(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, int]:
    """{path relative to ``folder``: bytes} of every file under it, from one listing (a stat per file would be
    a request per file on object stores). ``folder`` as fsspec names it (local: absolute)."""
    prefix = folder.rstrip("/") + "/"
    return {path[len(prefix) :]: info["size"] for path, info in fs.find(folder, detail=True).items() if path.startswith(prefix)}


def file_records(fs: fsspec.AbstractFileSystem, folder: str, skip: str) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under ``folder`` but those named ``skip`` (the
    record's own file)."""
    return {
        name: {"bytes": size, "sha256": sha256(fs, posixpath.join(folder, name))}
        for name, size in sorted(file_sizes(fs, folder).items())
        if posixpath.basename(name) != skip
    }


def check_files(
    fs: fsspec.AbstractFileSystem,
    folder: str,
    expected: dict[str, tuple[int, str]],
    checksums: bool,
    shown: str,
    record: str,
    error: type[UserError],
) -> None:
    """Raises ``error`` naming the first file of ``expected`` ({relative path: (bytes, sha256)}) that is
    missing from ``folder``, has another size, or (``checksums``) another sha256. ``shown``: how the folder
    is named in messages (a URL rather than fsspec's stripped path); ``record``: the file the sizes come from."""
    sizes = file_sizes(fs, folder)
    for name, (size, digest) in expected.items():
        where = posixpath.join(shown, name)
        if name not in sizes:
            raise error(f"{where} is missing ({record} lists it)")
        if (actual := sizes[name]) != size:
            raise error(f"{where} holds {actual} bytes, {record} says {size}: truncated or overwritten")
        if checksums and sha256(fs, posixpath.join(folder, name)) != digest:
            raise error(f"{where}: sha256 differs from {record}: damaged or replaced")


# A full disk or quota, a read-only disk: the storage's errors, not the path's.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@contextlib.contextmanager
def naming_path(path: str | os.PathLike, over_temporary: bool = False) -> Iterator[None]:
    """Re-raises an OSError that names no file (a full disk, a read-only one) as one naming ``path``: writes
    through file objects (polars, pyarrow, torch.jit.save into a Python file) lose the name.
    ``over_temporary``: a storage error (``STORAGE_ERRNOS``) names ``path`` even when it named a file, one
    in a temporary folder that is gone by the time the user reads the message."""
    try:
        yield
    except OSError as e:
        if e.errno is not None and (e.filename is None or (over_temporary and e.errno in STORAGE_ERRNOS)):
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise
