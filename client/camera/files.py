"""Files that stay consistent on a full disk: whole lines or nothing, and logging per episode."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path


class LineFile:
    """An append-only file of lines that only ever holds whole lines.

    Writes are unbuffered: a line that cannot be written (a full disk) is cut off again and the
    error raised, so nothing of it is left half-written or lands later, out of order, with a
    later write. `sync` makes each line durable (fsync) before `append` returns.
    """

    def __init__(self, path: Path, sync: bool = False) -> None:
        self._sync = sync
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.size = os.fstat(self._fd).st_size

    def append(self, line: bytes) -> None:
        written = 0
        try:
            while written < len(line):
                written += os.write(self._fd, line[written:])
            if self._sync:
                os.fsync(self._fd)
        except OSError:
            if written:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self.size)
            raise
        self.size += written

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Episode:
    """A failure that can last (a full disk): logged when it starts and when it ends, not each time."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._lock = threading.Lock()
        self._count = 0

    def failed(self, message: str) -> None:
        with self._lock:
            self._count += 1
            first = self._count == 1
        if first:
            self._log.error("%s (logged once until it recovers)", message)

    def recovered(self, what: str) -> None:
        with self._lock:
            count, self._count = self._count, 0
        if count:
            self._log.info("%s again, after %d failure(s)", what, count)
