"""Original frames saved for retraining, by per-camera rules, under `<state_dir>/capture/<camera>/`.

The camera thread only decides (`offer`: a few comparisons and a rate check) and queues the
frame; a background thread at a lower scheduling priority encodes the PNG and keeps each
camera's folder under its size and age bounds. The frame is the array the model saw (after
crop and resize), never the overlay, so that it can be labelled and trained on as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .config import CaptureConfig, CaptureRule

log = logging.getLogger(__name__)

QUEUE_SIZE = 32  # frames waiting to be written; beyond it frames are dropped (counted)
AGE_CHECK_S = 60.0
LOW_PRIORITY = 10  # nice increment of the writer thread


class RateCap:
    """At most `per_minute` takes in any sliding minute."""

    def __init__(self, per_minute: float) -> None:
        self._limit = per_minute
        self._taken: deque[float] = deque()

    def take(self, now: float) -> bool:
        while self._taken and self._taken[0] <= now - 60.0:
            self._taken.popleft()
        if len(self._taken) >= self._limit:
            return False
        self._taken.append(now)
        return True


class CameraCapture:
    """One camera's rules and the files it keeps (oldest first)."""

    def __init__(self, directory: Path, config: CaptureConfig, rng: random.Random) -> None:
        self.directory = directory
        self.config = config
        self._rng = rng
        rules: list[tuple[str, CaptureRule | None]] = [
            ("anomalous", config.anomalous),
            ("near_threshold", config.near_threshold),
            ("random", config.random),
        ]
        self._rules = [(name, rule, RateCap(rule.max_per_minute)) for name, rule in rules if rule is not None]
        self.counts = {"saved": 0, "rate_limited": 0, "dropped": 0, "failures": 0, "removed": 0}
        directory.mkdir(parents=True, exist_ok=True)
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in directory.glob("*.png") if p.is_file()]
        self._kept: deque[tuple[float, int, Path]] = deque(sorted(files))
        self._bytes = sum(size for _, size, _ in self._kept)

    def choose(self, event: dict[str, Any], now: float) -> str | None:
        """The first rule that matches the event and is under its cap."""
        score, threshold = float(event["anomaly_score"]), float(event["threshold"])
        for name, rule, cap in self._rules:
            matches = (
                (name == "anomalous" and bool(event["is_anomalous"]))
                or (name == "near_threshold" and abs(score - threshold) <= rule.band)
                or (name == "random" and self._rng.random() < rule.fraction)
            )
            if matches:
                if cap.take(now):
                    return name
                self.counts["rate_limited"] += 1
        return None

    def keep(self, path: Path) -> None:
        size = path.stat().st_size
        self._kept.append((time.time(), size, path))
        self._bytes += size
        self.enforce()

    def enforce(self) -> None:
        oldest = time.time() - self.config.max_age_s
        while self._kept and (self._bytes > self.config.max_bytes or self._kept[0][0] < oldest):
            _, size, path = self._kept.popleft()
            self._bytes -= size
            self.counts["removed"] += 1
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "files": len(self._kept), "bytes": self._bytes}


class Capture:
    """Every camera's capture rules and the writer thread."""

    def __init__(
        self, root: Path, cameras: dict[str, CaptureConfig], rng: random.Random | None = None
    ) -> None:
        rng = rng or random.Random()
        self._cameras = {name: CameraCapture(root / name, config, rng) for name, config in cameras.items()}
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, str, dict[str, Any], np.ndarray] | None] = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(target=self._run, name="camera-capture", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, event: dict[str, Any], pixels: np.ndarray) -> str | None:
        """Queue the frame if a rule takes it; the rule's name, or None. Called per frame."""
        camera = self._cameras.get(event["camera"])
        if camera is None:
            return None
        with self._lock:
            rule = camera.choose(event, time.monotonic())
        if rule is None:
            return None
        try:
            self._queue.put_nowait((event["camera"], rule, event, pixels))
        except queue.Full:
            with self._lock:
                camera.counts["dropped"] += 1
            return None
        return rule

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # per thread on Linux: the camera threads keep theirs
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOW_PRIORITY)
        while True:
            try:
                item = self._queue.get(timeout=AGE_CHECK_S)
            except queue.Empty:
                with self._lock:
                    for camera in self._cameras.values():
                        camera.enforce()
                continue
            if item is None:
                return
            self._write(*item)

    def _write(self, name: str, rule: str, event: dict[str, Any], pixels: np.ndarray) -> None:
        camera = self._cameras[name]
        stamp = event["time"].replace("-", "").replace(":", "").split("+")[0]
        path = camera.directory / f"{stamp}Z-{event['frame_id']:08d}-{rule}-{event['event_id']}.png"
        partial = path.with_name(f".{path.name}.tmp")
        try:
            Image.fromarray(pixels).save(partial, "PNG")
            os.replace(partial, path)
        except OSError as exc:  # a full disk: leave no partial file
            partial.unlink(missing_ok=True)
            log.warning("camera %s: cannot capture a frame: %s", name, exc)
            with self._lock:
                camera.counts["failures"] += 1
            return
        with self._lock:
            camera.counts["saved"] += 1
            camera.keep(path)

    def stats(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: camera.stats() for name, camera in self._cameras.items()}

    def close(self) -> None:
        """Write what is queued, then stop."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
