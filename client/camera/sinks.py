"""Where events go: rotating JSONL files, an MQTT broker, Greengrass IPC.

Network sinks are a `Transport` behind a `SpooledSink`: events are spooled to disk and a
delivery thread sends them from the head of the spool, in order, each removed once
acknowledged. While the other side is down the thread retries with exponential back-off.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from .config import SinkConfig
from .files import Episode, LineFile
from .spool import Spool

log = logging.getLogger(__name__)

RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0


class Sink:
    name = "sink"

    def submit(self, event: dict[str, Any]) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop; undelivered events stay in the spool for the next start."""


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()


def decode(payload: bytes) -> dict[str, Any]:
    """The event `encode` wrote; ValueError for anything else (an empty or a truncated file)."""
    event = json.loads(payload)
    if not isinstance(event, dict):
        raise ValueError(f"a JSON {type(event).__name__}, not an object")
    return event


class JsonlSink(Sink):
    """One JSON object per line, rotated at `max_bytes` into path.1 … path.<backups>.

    `delivered` is exactly the number of lines written since start: an event that cannot be
    written (a full disk) is counted in `failures` and is not in the file, then or later.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self._path = Path(settings["path"])
        self._max_bytes = int(settings.get("max_bytes", 100 << 20))
        self._backups = int(settings.get("backups", 5))
        self.name = f"jsonl:{self._path}"
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file: LineFile | None = LineFile(self._path)
        self._written = 0
        self._failures = 0
        self._last_error: str | None = None
        self._failing = Episode(log)

    def _rotate(self, file: LineFile) -> None:
        file.close()
        self._file = None
        for index in range(self._backups - 1, 0, -1):
            older = self._path.with_name(f"{self._path.name}.{index}")
            if older.exists():
                older.replace(self._path.with_name(f"{self._path.name}.{index + 1}"))
        if self._backups > 0:
            self._path.replace(self._path.with_name(f"{self._path.name}.1"))
        else:
            self._path.unlink()

    def _write(self, line: bytes) -> None:
        if self._file is not None and self._file.size and self._file.size + len(line) > self._max_bytes:
            self._rotate(self._file)
        if self._file is None:  # rotated, or a reopen that failed before
            self._file = LineFile(self._path)
        self._file.append(line)

    def submit(self, event: dict[str, Any]) -> None:
        line = encode(event) + b"\n"
        with self._lock:
            try:
                self._write(line)
            except OSError as exc:
                self._failures += 1
                self._last_error = exc.strerror or str(exc)
                self._failing.failed(f"{self.name}: cannot write an event: {self._last_error}")
                return
            self._written += 1
            self._failing.recovered(f"{self.name}: writing events")

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"delivered": self._written, "failures": self._failures, "last_error": self._last_error}

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()


class Transport:
    """Delivers one event and returns only once the other side has it; raises otherwise."""

    name = "transport"

    def deliver(self, event: dict[str, Any], payload: bytes) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Drop the connection after a failure; the next `deliver` reconnects."""

    def close(self) -> None:
        self.reset()


class SpooledSink(Sink):
    def __init__(self, transport: Transport, spool: Spool) -> None:
        self.name = transport.name
        self._transport = transport
        self._spool = spool
        self._stop = threading.Event()
        self._delivered = 0
        self._failures = 0
        self._connected = False
        self._last_error: str | None = None
        self._spooling = Episode(log)
        self._thread = threading.Thread(target=self._run, name=f"sink-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, event: dict[str, Any]) -> None:
        try:
            self._spool.append(encode(event))
        except OSError as exc:
            self._failures += 1
            self._spooling.failed(f"{self.name}: cannot spool an event: {exc.strerror}")
            return
        self._spooling.recovered(f"{self.name}: spooling events")

    def _run(self) -> None:
        delay = RETRY_INITIAL_S
        while not self._stop.is_set():
            self._spool.wait(0.5)
            head = self._spool.head()
            if head is None:
                continue
            sequence, payload = head
            try:
                event = decode(payload)
            except ValueError as exc:  # never deliverable: move it aside, go on with the next
                self._spool.quarantine(sequence, f"not an event ({exc})")
                continue
            try:
                self._transport.deliver(event, payload)
            except Exception as exc:  # any failure of the other side: keep the event, retry later
                self._failures += 1
                self._connected = False
                self._last_error = str(exc) or type(exc).__name__
                log.warning(
                    "%s: delivery failed (%s); retrying in %.1f s", self.name, self._last_error, delay
                )
                self._transport.reset()
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self._spool.remove(sequence)
            self._delivered += 1
            self._connected = True
            delay = RETRY_INITIAL_S

    def stats(self) -> dict[str, Any]:
        return {
            "delivered": self._delivered,
            "pending": len(self._spool),
            "dropped": self._spool.dropped,
            "quarantined": self._spool.quarantined,
            "failures": self._failures,
            "connected": self._connected,
            "last_error": self._last_error,
        }

    def close(self) -> None:
        self._stop.set()
        self._spool.wake()
        self._thread.join()
        self._transport.close()


def build_sink(config: SinkConfig) -> Sink:
    if config.type == "jsonl":
        return JsonlSink(config.settings)
    assert config.spool_dir is not None
    transport: Transport
    if config.type == "mqtt":
        from .mqtt import MqttTransport

        transport = MqttTransport(config.settings)
    else:
        from .greengrass import GreengrassTransport

        transport = GreengrassTransport(config.settings)
    return SpooledSink(transport, Spool(config.spool_dir, config.spool_max_events))
