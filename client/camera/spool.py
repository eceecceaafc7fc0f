"""A bounded on-disk FIFO of events, one file per event, that survives restarts.

Network sinks put every event here first and deliver from the head, removing an event only
once the other side acknowledged it: an outage, or a restart during one, loses nothing and
keeps the order. Each event is on disk (fsync) before `append` returns, so a power cut loses
no accepted event either. When the spool is full the oldest event is dropped and counted.

A file that can never be delivered (a name the spool did not write, an unreadable file, or a
payload the sink cannot decode) is moved into the quarantine folder beside the spool,
`<spool>.quarantine/`, logged and counted, so that it neither disables the sink nor blocks the
events behind it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import threading
import time
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".event"
_NAME = re.compile(r"[0-9]{16}\.event")  # what `_path` writes


class Spool:
    def __init__(self, directory: Path, max_events: int) -> None:
        self._directory = directory
        self._max_events = max_events
        self.quarantine_dir = directory.with_name(f"{directory.name}.quarantine")
        self.dropped = 0
        self.quarantined = 0
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob(".*.tmp"):
            leftover.unlink()
        sequences = []
        for path in directory.glob(f"*{SUFFIX}"):
            if _NAME.fullmatch(path.name) and stat.S_ISREG(path.lstat().st_mode):
                sequences.append(int(path.stem))
            else:
                self._quarantine(path, "not an event file this spool wrote")
        self._queue: deque[int] = deque(sorted(sequences))
        self._next = self._queue[-1] + 1 if self._queue else 0
        self._lock = threading.Lock()
        self._available = threading.Condition(self._lock)

    def _path(self, sequence: int) -> Path:
        return self._directory / f"{sequence:016d}{SUFFIX}"

    def append(self, payload: bytes) -> None:
        with self._lock:
            sequence = self._next
            self._next += 1
            self._write_durably(sequence, payload)
            self._queue.append(sequence)
            while len(self._queue) > self._max_events:
                self._remove(self._queue.popleft())
                self.dropped += 1
            self._available.notify_all()

    def _write_durably(self, sequence: int, payload: bytes) -> None:
        """Write, flush to disk, then rename: after a power cut an event is whole or absent."""
        temporary = self._directory / f".{sequence}.tmp"
        try:
            with temporary.open("wb") as file:
                file.write(payload)
                file.flush()
                os.fsync(file.fileno())
        except OSError:  # a full disk: leave no partial file to take more room
            temporary.unlink(missing_ok=True)
            raise
        os.replace(temporary, self._path(sequence))
        directory = os.open(self._directory, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself
        finally:
            os.close(directory)

    def wait(self, timeout: float) -> None:
        """Return when an event is there, `wake` was called or `timeout` passed."""
        with self._lock:
            if not self._queue:
                self._available.wait(timeout)

    def wake(self) -> None:
        with self._lock:
            self._available.notify_all()

    def head(self) -> tuple[int, bytes] | None:
        """The oldest event, left in place."""
        with self._lock:
            while self._queue:
                sequence = self._queue[0]
                try:
                    return sequence, self._path(sequence).read_bytes()
                except FileNotFoundError:  # removed by hand; go on with the next
                    self._queue.popleft()
                except OSError as exc:
                    self._queue.popleft()
                    self._quarantine(self._path(sequence), f"cannot read it: {exc.strerror}")
            return None

    def remove(self, sequence: int) -> None:
        """Remove a delivered event (a no-op if it was dropped meanwhile)."""
        with self._lock:
            if self._queue and self._queue[0] == sequence:
                self._queue.popleft()
                self._remove(sequence)

    def quarantine(self, sequence: int, reason: str) -> None:
        """Move an event that can never be delivered out of the way (a no-op if it is not the head)."""
        with self._lock:
            if self._queue and self._queue[0] == sequence:
                self._queue.popleft()
                self._quarantine(self._path(sequence), reason)

    def _quarantine(self, path: Path, reason: str) -> None:
        self.quarantined += 1
        target = self.quarantine_dir / f"{time.time_ns()}-{path.name}"
        try:
            self.quarantine_dir.mkdir(exist_ok=True)
            os.replace(path, target)
        except OSError as exc:
            log.error("%s: %s; cannot move it to %s: %s", path, reason, self.quarantine_dir, exc.strerror)
            return
        log.error("%s: %s; quarantined as %s", path, reason, target)

    def _remove(self, sequence: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(sequence).unlink()

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)
