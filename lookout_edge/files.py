"""Opening files that a peer controls: never block, and only regular files.

A FIFO under a file's name makes a plain `open` wait for a writer forever; a directory or a
device would be read as something it is not. The agent's manifests and shared-memory segments
and the camera's folder images all go through `open_regular`.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["NotRegularFile", "open_regular"]


class NotRegularFile(OSError):
    """The name is a FIFO, a directory, a device or a socket, not a regular file."""


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY) -> tuple[int, os.stat_result]:
    """A descriptor of `path` opened with `flags`, non-blocking, and its status. Raises OSError
    as `os.open` does, and NotRegularFile (the descriptor closed) for what is not a regular file."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd, info
