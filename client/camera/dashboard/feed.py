"""What the dashboard shows, kept in bounded in-memory rings the camera threads append to.

`CameraFeed.record` is the only call on the camera path: a few appends under a lock, O(1) per
frame. Frames are kept as the arrays the model saw (no copy, no encoding); JPEGs are made
when a page asks for them, once per frame.
"""

from __future__ import annotations

import io
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..config import DashboardConfig
from ..images import overlay

RECENT_EVENTS = 1000  # events (without frames) per camera, for /api/events
RECENT_SCORES = 1000  # scores per camera, for the histogram
ANOMALOUS_FRAMES = 8  # recent anomalous frames per camera, kept with their masks
MINUTES = 24 * 60  # OK/NG counts per minute over the last day
THUMBNAIL_WIDTH = 480


@dataclass
class FrameRecord:
    """One inference with the frame the model saw and its mask; JPEGs are encoded on demand."""

    event: dict[str, Any]
    pixels: np.ndarray
    mask: np.ndarray | None
    review: dict[str, Any] | None = None  # {"label", "note"} once reviewed
    _jpegs: dict[str, bytes] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def event_id(self) -> str:
        return str(self.event["event_id"])

    def jpeg(self, kind: str) -> bytes:
        """`frame` (as the model saw it) or `overlay` (the mask blended in), at most 480 px wide."""
        with self._lock:
            if kind not in self._jpegs:
                pixels = overlay(self.pixels, self.mask) if kind == "overlay" else self.pixels
                image = Image.fromarray(pixels)
                if image.width > THUMBNAIL_WIDTH:
                    image = image.resize(
                        (THUMBNAIL_WIDTH, round(image.height * THUMBNAIL_WIDTH / image.width))
                    )
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=85)
                self._jpegs[kind] = buffer.getvalue()
            return self._jpegs[kind]


class CameraFeed:
    """One camera's rings: the latest frame, recent anomalous frames, the review queue, scores,
    recent events and OK/NG counts per minute."""

    def __init__(
        self, name: str, model: str, config: DashboardConfig, rng: random.Random | None = None
    ) -> None:
        self.name = name
        self.model = model
        self._config = config
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self.latest: FrameRecord | None = None
        self._anomalous: deque[FrameRecord] = deque(maxlen=ANOMALOUS_FRAMES)
        self._review: deque[FrameRecord] = deque(maxlen=config.review_size)
        self._events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self._scores: deque[float] = deque(maxlen=RECENT_SCORES)
        self._threshold: float | None = None
        self._minutes: deque[list[int]] = deque(maxlen=MINUTES)  # [minute since epoch, ok, ng]

    def record(self, event: dict[str, Any], pixels: np.ndarray, mask: np.ndarray | None) -> None:
        record = FrameRecord(event, pixels, mask)
        anomalous = bool(event["is_anomalous"])
        score, threshold = float(event["anomaly_score"]), float(event["threshold"])
        to_review = (
            anomalous
            or abs(score - threshold) <= self._config.review_band
            or self._rng.random() < self._config.review_random
        )
        minute = int(time.time() // 60)
        with self._lock:
            self.latest = record
            self._events.append(event)
            self._scores.append(score)
            self._threshold = threshold
            if anomalous:
                self._anomalous.append(record)
            if to_review:
                self._review.append(record)
            if not self._minutes or self._minutes[-1][0] != minute:
                self._minutes.append([minute, 0, 0])
            self._minutes[-1][2 if anomalous else 1] += 1

    def anomalous(self) -> list[FrameRecord]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._anomalous))

    def review_queue(self) -> list[FrameRecord]:
        """Frames not reviewed yet, newest first."""
        with self._lock:
            return [record for record in reversed(self._review) if record.review is None]

    def events(self) -> list[dict[str, Any]]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._events))

    def scores(self) -> tuple[list[float], float | None]:
        with self._lock:
            return list(self._scores), self._threshold

    def counts(self, seconds: float, now: float | None = None) -> tuple[int, int]:
        """(OK, NG) over the last `seconds` (whole minutes)."""
        return _sum(self.per_minute(int(seconds // 60), now))

    def per_minute(self, minutes: int, now: float | None = None) -> list[tuple[int, int]]:
        """(OK, NG) for each of the last `minutes` minutes, oldest first."""
        current = int((time.time() if now is None else now) // 60)
        with self._lock:
            by_minute = {m: (ok, ng) for m, ok, ng in self._minutes if m > current - minutes}
        return [by_minute.get(m, (0, 0)) for m in range(current - minutes + 1, current + 1)]

    def find(self, event_id: str) -> FrameRecord | None:
        """A frame still held (latest, anomalous or in the review queue)."""
        with self._lock:
            held = [self.latest, *self._anomalous, *self._review]
        return next((r for r in held if r is not None and r.event_id == event_id), None)


def _sum(counts: list[tuple[int, int]]) -> tuple[int, int]:
    return sum(ok for ok, _ in counts), sum(ng for _, ng in counts)


class Feed:
    """Every camera's feed, by name."""

    def __init__(self, cameras: list[tuple[str, str]], config: DashboardConfig) -> None:
        self.cameras = {name: CameraFeed(name, model, config) for name, model in cameras}

    def find(self, event_id: str) -> FrameRecord | None:
        for camera in self.cameras.values():
            record = camera.find(event_id)
            if record is not None:
                return record
        return None
