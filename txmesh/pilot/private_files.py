"""
Writing secrets (the CA's keys, the join-token keys) to files only their
owner can read, so that a reader never sees a partial file.
"""

from __future__ import annotations

import os
import secrets


def write_temporary(path: str, data: bytes) -> str:
    """
    Write C{data} to a new owner-only (0600) file beside C{path}, synced to
    disk.

    @return: the new file's name, for the caller to rename or link to
        C{path}.
    @raise OSError: it could not be written (nothing is left behind).
    """
    tmp = f"{path}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    except OSError:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def write_private(path: str, data: bytes) -> None:
    """
    Replace C{path} with an owner-only file holding C{data}, atomically.

    @raise OSError: it could not be written; C{path} is unchanged.
    """
    tmp = write_temporary(path, data)
    try:
        os.replace(tmp, path)
    except OSError:
        os.unlink(tmp)
        raise
