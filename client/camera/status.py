"""Per-camera and per-sink counters, logged and written to a status JSON file periodically."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WINDOW_S = 10.0  # current fps and latency are over the last this many seconds


class CameraStats:
    """Counters of one camera; every method is thread-safe."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._counts = {
            "frames": 0,
            "inferences": 0,
            "anomalies": 0,
            "errors": 0,
            "reconnects": 0,
            "images_skipped": 0,
        }
        self._connected = False
        self._last_error: str | None = None
        self._recent: deque[tuple[float, float]] = deque()  # (monotonic end, latency ms)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                self._counts[key] += value

    def set_connected(self, connected: bool) -> None:
        with self._lock:
            self._connected = connected

    def error(self, message: str) -> None:
        with self._lock:
            self._counts["errors"] += 1
            self._last_error = message

    def inference(self, latency_ms: float, anomalous: bool) -> None:
        now = time.monotonic()
        with self._lock:
            self._counts["inferences"] += 1
            self._counts["anomalies"] += int(anomalous)
            self._recent.append((now, latency_ms))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - WINDOW_S:
            self._recent.popleft()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            self._trim(time.monotonic())
            latencies = sorted(latency for _, latency in self._recent)
            return {
                **self._counts,
                "connected": self._connected,
                "fps": round(len(latencies) / WINDOW_S, 2),
                "latency_ms_mean": round(sum(latencies) / len(latencies), 2) if latencies else None,
                "latency_ms_p95": round(latencies[int(0.95 * (len(latencies) - 1))], 2)
                if latencies
                else None,
                "last_error": self._last_error,
            }


def write_json_atomically(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(data, indent=2) + "\n")
    except OSError:  # a full disk: leave no partial file to take more room
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


class StatusReporter:
    """A thread that logs a line per camera and rewrites the status file every `interval` seconds."""

    def __init__(
        self,
        path: Path | None,
        interval: float,
        cameras: list[CameraStats],
        sinks: Callable[[], dict[str, dict[str, Any]]],
        capture: Callable[[], dict[str, dict[str, Any]]] | None = None,
    ) -> None:
        self._path = path
        self._capture = capture
        self._interval = interval
        self._cameras = cameras
        self._sinks = sinks
        self._started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="camera-status", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def status(self) -> dict[str, Any]:
        status = {
            "pid": os.getpid(),
            "started": self._started,
            "updated": time.time(),
            "cameras": {stats.name: stats.snapshot() for stats in self._cameras},
            "sinks": self._sinks(),
        }
        if self._capture is not None:
            status["capture"] = self._capture()
        return status

    def report(self, to_log: bool = True) -> None:
        status = self.status()
        if self._path is not None:
            try:
                write_json_atomically(self._path, status)
            except OSError as exc:
                log.error("cannot write the status file %s: %s", self._path, exc.strerror)
        if to_log:
            for name, counts in status["cameras"].items():
                log.info(
                    "camera %s: %s frames, %s inferences, %s anomalies, %s errors, %s reconnects, "
                    "%.1f fps, latency %s ms%s",
                    name,
                    counts["frames"],
                    counts["inferences"],
                    counts["anomalies"],
                    counts["errors"],
                    counts["reconnects"],
                    counts["fps"],
                    counts["latency_ms_mean"],
                    "" if counts["connected"] else " (not connected)",
                )

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.report()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.report(to_log=False)
