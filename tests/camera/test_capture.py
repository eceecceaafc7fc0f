"""Capture rules: which frames are saved, the rate caps, the size and age bounds, the pixels."""

from __future__ import annotations

import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lookout_edge.client.camera.capture import Capture, RateCap
from lookout_edge.client.camera.config import CaptureConfig, CaptureRule, ConfigError, parse_config
from tests.camera.conftest import folder_camera_config

THRESHOLD = 0.5


def event(score: float, frame_id: int = 1) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4().hex,
        "camera": "line1",
        "time": "2026-01-01T12:00:00.123+00:00",
        "frame_id": frame_id,
        "is_anomalous": score >= THRESHOLD,
        "anomaly_score": score,
        "threshold": THRESHOLD,
    }


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(64, 80, 3), dtype=np.uint8)


def run(capture: Capture, items: list[tuple[dict[str, Any], np.ndarray]]) -> list[str | None]:
    capture.start()
    try:
        return [capture.offer(e, p) for e, p in items]
    finally:
        capture.close()


def test_the_rate_cap_is_a_sliding_minute() -> None:
    cap = RateCap(2)
    assert [cap.take(t) for t in (0.0, 1.0, 30.0, 59.9)] == [True, True, False, False]
    assert cap.take(60.0) and not cap.take(60.5)  # the first take left the window
    assert cap.take(61.0)


def test_rules_band_and_caps_and_the_frames_saved_as_they_were(tmp_path: Path) -> None:
    config = CaptureConfig(anomalous=CaptureRule(3), near_threshold=CaptureRule(100, band=0.1))
    capture = Capture(tmp_path, {"line1": config})
    scores = [0.9] * 5 + [0.45, 0.41, 0.39, 0.1, 0.0]
    items = [(event(s, i), pixels(i)) for i, s in enumerate(scores)]
    chosen = run(capture, items)
    # Three anomalous frames (the cap); 0.45 and 0.41 are in the band, 0.39 and below are not.
    assert chosen == ["anomalous"] * 3 + [None, None] + ["near_threshold"] * 2 + [None] * 3
    files = sorted((tmp_path / "line1").glob("*.png"))
    assert len(files) == 5
    by_id = {e["event_id"]: p for e, p in items}
    for path in files:
        assert np.array_equal(np.asarray(Image.open(path)), by_id[path.stem.rsplit("-", 1)[1]])
    stats = capture.stats()["line1"]
    assert stats["saved"] == 5 and stats["rate_limited"] == 2
    assert not list((tmp_path / "line1").glob(".*"))  # no temporary file left


def test_a_random_fraction(tmp_path: Path) -> None:
    config = CaptureConfig(random=CaptureRule(1000, fraction=0.25))
    capture = Capture(tmp_path, {"line1": config}, random.Random(1))
    run(capture, [(event(0.0, i), pixels(0)) for i in range(400)])
    stats = capture.stats()["line1"]
    # Frames the writer could not keep up with are dropped, not waited for.
    assert 70 <= stats["saved"] + stats["dropped"] <= 130
    never = Capture(tmp_path / "never", {"line1": CaptureConfig(random=CaptureRule(1000, fraction=0.0))})
    assert set(run(never, [(event(0.0), pixels(0))] * 50)) == {None}


def test_the_size_and_age_bounds(tmp_path: Path) -> None:
    folder = tmp_path / "line1"
    folder.mkdir()
    old = folder / "old.png"
    Image.fromarray(pixels(0)).save(old)
    os.utime(old, (time.time() - 3 * 86400, time.time() - 3 * 86400))
    one = len((folder / "old.png").read_bytes())
    config = CaptureConfig(anomalous=CaptureRule(100), max_bytes=int(one * 3.5), max_age_s=86400.0)
    capture = Capture(tmp_path, {"line1": config})
    run(capture, [(event(0.9, i), pixels(i)) for i in range(6)])
    kept = sorted(folder.glob("*.png"))
    assert not old.exists()  # older than max_age_days
    assert sum(p.stat().st_size for p in kept) <= config.max_bytes
    assert [p.name.split("-")[1] for p in kept] == ["00000003", "00000004", "00000005"]  # the newest


def test_capture_keys_are_checked(tmp_path: Path) -> None:
    def camera_capture(capture: object) -> object:
        config = folder_camera_config(
            "unix:///x", "line1", tmp_path, [{"type": "jsonl", "path": str(tmp_path / "events.jsonl")}]
        )
        config["cameras"][0]["capture"] = capture
        return parse_config(config).cameras[0].capture

    parsed = camera_capture(
        {"anomalous": True, "random": {"fraction": 0.1, "max_per_minute": 2}, "max_mb": 1}
    )
    assert parsed == CaptureConfig(
        anomalous=CaptureRule(10), random=CaptureRule(2, fraction=0.1), max_bytes=1 << 20
    )
    for bad, message in (
        ({}, "give at least one of"),
        ({"near_threshold": {}}, "near_threshold.band: required"),
        ({"random": {"fraction": 2}}, "random.fraction: from 0 to 1"),
        ({"anomalous": {"max_per_minute": 0}}, "max_per_minute: must be greater than 0"),
        ({"anomalous": True, "size": 1}, "unknown key"),
    ):
        with pytest.raises(ConfigError, match=message):
            camera_capture(bad)
