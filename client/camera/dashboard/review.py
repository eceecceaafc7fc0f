"""Reviewed frames as a Lookout for Vision classification dataset under `<state_dir>/review/`.

`images/<event_id>.png` holds the frame the model saw and `review.manifest` one Ground Truth
line per reviewed frame, in the format `lookout-edge train` and `evaluate` read
(trainer/groundtruth.py). The manifest is rewritten whole to a temporary file, fsynced and
renamed over the old one, so that a reader never sees half a review. Reviewing a frame again
replaces its line. Paths are built from validated event ids, never taken from a request.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from PIL import Image

from .feed import FrameRecord

MANIFEST = "review.manifest"
LABELS = {"normal": 0, "anomaly": 1}
EVENT_ID = re.compile(r"^[0-9a-f]{32}$")  # uuid4().hex, as the daemon makes them
MAX_NOTE = 1000
JOB_NAME = "labeling-job/lookout-edge-review"
REVIEW_KEY = "lookout-edge-review"  # not a label attribute: the trainer ignores it


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.tmp")
    try:
        with open(partial, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    _fsync_dir(path.parent)


class ReviewStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.manifest = directory / MANIFEST
        self._images = directory / "images"
        self._images.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._lines: dict[str, dict[str, Any]] = {}  # by event id, in review order
        if self.manifest.exists():
            for raw in self.manifest.read_text().splitlines():
                line = json.loads(raw)
                self._lines[line[REVIEW_KEY]["event_id"]] = line

    def save(self, record: FrameRecord, label: str, note: str) -> dict[str, Any]:
        """Write the frame and its manifest line; the line written."""
        event = record.event
        event_id = record.event_id
        if not EVENT_ID.match(event_id) or label not in LABELS:
            raise ValueError(f"cannot review {event_id!r} as {label!r}")
        image = self._images / f"{event_id}.png"
        note = note[:MAX_NOTE]
        line: dict[str, Any] = {
            "source-ref": f"images/{image.name}",
            "anomaly-label": LABELS[label],
            "anomaly-label-metadata": {
                "confidence": 1,
                "job-name": JOB_NAME,
                "class-name": label,
                "human-annotated": "yes",
                "creation-date": datetime.datetime.now(datetime.timezone.utc).strftime(
                    "%Y-%m-%dT%H:%M:%S.%f"
                ),
                "type": "groundtruth/image-classification",
            },
            REVIEW_KEY: {
                "event_id": event_id,
                "camera": event["camera"],
                "model": event["model"],
                "time": event["time"],
                "anomaly_score": event["anomaly_score"],
                "threshold": event["threshold"],
                "is_anomalous": event["is_anomalous"],
                "note": note,
            },
        }
        with self._lock:
            if not image.exists():
                encoded = io.BytesIO()
                Image.fromarray(record.pixels).save(encoded, "PNG")
                _write_atomically(image, encoded.getvalue())  # durable before the manifest names it
            lines = {**self._lines, event_id: line}
            text = "".join(json.dumps(item, sort_keys=True) + "\n" for item in lines.values())
            _write_atomically(self.manifest, text.encode())
            self._lines = lines
        record.review = {"label": label, "note": note}
        return line

    def count(self) -> dict[str, int]:
        with self._lock:
            labels = [line["anomaly-label-metadata"]["class-name"] for line in self._lines.values()]
        return {label: labels.count(label) for label in LABELS}
