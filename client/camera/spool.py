"""A bounded on-disk FIFO of events, one file per event, that survives restarts.

Network sinks put every event here first and deliver from the head, removing an event only
once the other side acknowledged it: an outage, or a restart during one, loses nothing and
keeps the order. Each event is on disk (fsync) before `append` returns, so a power cut loses
no accepted event either. When the spool is full the oldest event is dropped and counted.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from pathlib import Path

SUFFIX = ".event"


class Spool:
    def __init__(self, directory: Path, max_events: int) -> None:
        self._directory = directory
        self._max_events = max_events
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob(".*.tmp"):
            leftover.unlink()
        self._queue: deque[int] = deque(sorted(int(p.stem) for p in directory.glob(f"*{SUFFIX}")))
        self._next = self._queue[-1] + 1 if self._queue else 0
        self._lock = threading.Lock()
        self._available = threading.Condition(self._lock)
        self.dropped = 0

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
        with temporary.open("wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
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
            return None

    def remove(self, sequence: int) -> None:
        """Remove a delivered event (a no-op if it was dropped meanwhile)."""
        with self._lock:
            if self._queue and self._queue[0] == sequence:
                self._queue.popleft()
                self._remove(sequence)

    def _remove(self, sequence: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(sequence).unlink()

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)
