"""The JSON API: `GET /api/status`, `GET /api/events`, `POST /api/events/{event_id}/review`.

Handlers return (HTTP status, JSON body); the server does the HTTP. The status adds to the
daemon's status file what only the dashboard has: model states, OK/NG over the last hour and
day, the review queue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from lookout_edge.client.edge_client import EdgeAgentClient, EdgeAgentError

from .feed import CameraFeed, Feed, FrameRecord
from .review import EVENT_ID, LABELS, ReviewStore

MODEL_STATE_TTL_S = 2.0
MODEL_CALL_TIMEOUT_S = 2.0
MAX_EVENTS = 1000

Reply = tuple[int, dict[str, Any]]


class ModelStates:
    """The agent's model states, asked at most every 2 s whatever the number of page views."""

    def __init__(self, socket: str) -> None:
        self._socket = socket
        self._lock = threading.Lock()
        self._states: dict[str, dict[str, str]] = {}
        self._error: str | None = None
        self._asked = 0.0

    def get(self, model: str) -> dict[str, str]:
        with self._lock:
            if time.monotonic() - self._asked > MODEL_STATE_TTL_S:
                self._refresh()
            if model in self._states:
                return self._states[model]
            if self._error is not None:
                return {"status": "UNKNOWN", "message": f"agent unreachable: {self._error}"}
            return {"status": "MISSING", "message": "the agent has no such model"}

    def _refresh(self) -> None:
        self._asked = time.monotonic()
        try:
            with EdgeAgentClient(self._socket, timeout=MODEL_CALL_TIMEOUT_S) as client:
                models = client.list_models()
        except EdgeAgentError as exc:
            self._error, self._states = exc.message or exc.code.name, {}
            return
        self._error = None
        self._states = {m.name: {"status": m.status, "message": m.status_message} for m in models}


def _period(camera: CameraFeed, seconds: float) -> dict[str, Any]:
    ok, ng = camera.counts(seconds)
    return {"ok": ok, "ng": ng, "yield": round(ok / (ok + ng), 4) if ok + ng else None}


def describe(record: FrameRecord) -> dict[str, Any]:
    """An event with the links to its frame and the review, for the API and the pages."""
    event_id = record.event_id
    return {
        **record.event,
        "review": record.review,
        "frame_url": f"/frames/{event_id}.jpg",
        "overlay_url": f"/frames/{event_id}/overlay.jpg",
    }


class Api:
    def __init__(
        self,
        feed: Feed,
        store: ReviewStore,
        daemon_status: Callable[[], dict[str, Any]],
        models: ModelStates,
    ) -> None:
        self.feed = feed
        self.store = store
        self._daemon_status = daemon_status
        self._models = models

    def status(self) -> dict[str, Any]:
        status = self._daemon_status()
        for name, counts in status["cameras"].items():
            camera = self.feed.cameras[name]
            model = self._models.get(camera.model)
            counts.update(
                model=camera.model,
                model_status=model["status"],
                model_message=model["message"],
                last_hour=_period(camera, 3600),
                last_day=_period(camera, 86400),
                review_pending=len(camera.review_queue()),
                capture=status.get("capture", {}).get(name),
            )
        status["review"] = {"manifest": str(self.store.manifest), **self.store.count()}
        return status

    def events(self, query: dict[str, str]) -> Reply:
        camera = query.get("camera")
        verdict = query.get("verdict")
        if camera is not None and camera not in self.feed.cameras:
            return 404, {"error": f"no camera {camera!r}"}
        if verdict not in (None, *LABELS):
            return 400, {"error": "verdict: normal or anomaly"}
        try:
            limit = int(query.get("limit", "100"))
        except ValueError:
            limit = -1
        if not 0 < limit <= MAX_EVENTS:
            return 400, {"error": f"limit: from 1 to {MAX_EVENTS}"}
        cameras = [self.feed.cameras[camera]] if camera else list(self.feed.cameras.values())
        events = sorted((e for c in cameras for e in c.events()), key=lambda e: e["time"], reverse=True)
        if verdict is not None:
            events = [e for e in events if e["is_anomalous"] == (verdict == "anomaly")]
        return 200, {"events": events[:limit]}

    def review(self, event_id: str, body: Any) -> Reply:
        if not EVENT_ID.match(event_id):
            return 400, {"error": "not an event id"}
        if not isinstance(body, dict) or body.get("label") not in LABELS:
            return 400, {"error": 'expected {"label": "normal" or "anomaly", "note": "..."}'}
        note = body.get("note", "")
        if not isinstance(note, str):
            return 400, {"error": "note: a string"}
        record = self.feed.find(event_id)
        if record is None:
            return 404, {"error": "this frame is no longer held in memory"}
        try:
            line = self.store.save(record, body["label"], note)
        except OSError as exc:  # the manifest and the images stay as they were
            return 500, {"error": f"cannot write the review: {exc.strerror or exc}"}
        return 200, {"event_id": event_id, "manifest": str(self.store.manifest), "line": line}
