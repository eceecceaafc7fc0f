"""The review API in-process over HTTP: ids validated, nothing written outside the review
folder, the manifest replaced whole or not at all."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lookout_edge.client.camera.config import DashboardConfig
from lookout_edge.client.camera.dashboard import review as review_module
from lookout_edge.client.camera.dashboard.api import Api, ModelStates
from lookout_edge.client.camera.dashboard.feed import Feed
from lookout_edge.client.camera.dashboard.metrics import Metrics
from lookout_edge.client.camera.dashboard.review import ReviewStore
from lookout_edge.client.camera.dashboard.server import Dashboard
from lookout_edge.trainer.groundtruth import parse_manifest
from tests.camera.conftest import http


def status() -> dict[str, Any]:
    return {"cameras": {}, "sinks": {}}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Feed, Path]]:
    config = DashboardConfig("127.0.0.1", 0, review_random=0.0)
    feed = Feed([("line1", "seg")], config)
    review = tmp_path / "state" / "review"
    api = Api(feed, ReviewStore(review), status, ModelStates("unix:///nowhere"))
    dashboard = Dashboard(config, feed, api, Metrics(status))
    dashboard.start()
    try:
        yield f"http://127.0.0.1:{dashboard.port}", feed, review
    finally:
        dashboard.stop()


def record(feed: Feed, score: float, seed: int) -> tuple[str, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(64, 80, 3), dtype=np.uint8)
    event = {
        "event_id": uuid.uuid4().hex,
        "camera": "line1",
        "model": "seg",
        "time": "2026-01-01T12:00:00.000+00:00",
        "is_anomalous": score >= 0.5,
        "anomaly_score": score,
        "threshold": 0.5,
        "confidence": 1.0,
    }
    feed.cameras["line1"].record(event, pixels, None)
    return event["event_id"], pixels


def post(url: str, event_id: str, body: object) -> tuple[int, dict[str, Any]]:
    status, reply = http(f"{url}/api/events/{event_id}/review", json.dumps(body).encode())
    return status, json.loads(reply)


def test_review_writes_a_manifest_the_trainer_reads(served: tuple[str, Feed, Path]) -> None:
    url, feed, review = served
    bad, bad_pixels = record(feed, 0.9, 1)
    good, _ = record(feed, 0.45, 2)  # in the review band
    assert [r.event_id for r in feed.cameras["line1"].review_queue()] == [good, bad]
    assert post(url, bad, {"label": "normal"})[0] == 200
    assert post(url, bad, {"label": "anomaly", "note": "scratch"})[0] == 200  # replaces its line
    assert post(url, good, {"label": "normal"})[0] == 200
    lines = (review / "review.manifest").read_text().splitlines()
    assert len(lines) == 2
    parsed = parse_manifest(review / "review.manifest")
    assert parsed.problems == ()
    assert {(e.image.name, e.is_anomalous) for e in parsed.entries} == {
        (f"{bad}.png", True),
        (f"{good}.png", False),
    }
    assert np.array_equal(np.asarray(Image.open(review / "images" / f"{bad}.png")), bad_pixels)
    assert feed.cameras["line1"].review_queue() == []
    assert json.loads(lines[0])["lookout-edge-review"]["note"] == "scratch"


def test_requests_cannot_write_elsewhere_or_half_a_manifest(
    served: tuple[str, Feed, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, feed, review = served
    event_id, _ = record(feed, 0.9, 1)
    for wrong in ("..%2F..%2Fescape", "..", event_id.upper(), event_id + "0", "%2Ftmp%2Fx"):
        assert post(url, wrong, {"label": "anomaly"})[0] == 400
    assert post(url, uuid.uuid4().hex, {"label": "anomaly"})[0] == 404  # not held
    for body in ({"label": "maybe"}, {}, [], {"label": "normal", "note": 3}):
        assert post(url, event_id, body)[0] == 400
    status, _ = http(f"{url}/api/events/{event_id}/review", b"{not json")
    assert status == 400
    form = {"Content-Type": "text/plain"}  # what a cross-site form could send
    assert http(f"{url}/api/events/{event_id}/review", b'{"label": "anomaly"}', form)[0] == 415
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []

    assert post(url, event_id, {"label": "anomaly"})[0] == 200
    before = (review / "review.manifest").read_bytes()
    other, _ = record(feed, 0.9, 2)

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(review_module.os, "fsync", fail)
    status, reply = post(url, other, {"label": "normal"})
    assert status == 500 and "No space left" in reply["error"]
    monkeypatch.setattr(review_module.os, "fsync", os.fsync)
    assert (review / "review.manifest").read_bytes() == before
    assert not [p for p in review.iterdir() if p.name.startswith(".")]
