"""The daemon over real streams on loopback: RTSP from GStreamer, HTTP MJPEG, against a real agent."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np

from tests.camera.conftest import MjpegServer, read_events, wait_for
from tests.conftest import HEIGHT, WIDTH, make_image

READ_TIMEOUT_S = 2.0


def test_rtsp_events_reconnect_after_a_drop_and_stall_detection(
    tmp_path: Path, agent_process, rtsp_server, camera_daemon, models_dir: Path
) -> None:
    agent = agent_process()
    agent.wait_ready()
    stream = rtsp_server("red")
    events_path = tmp_path / "events.jsonl"
    daemon = camera_daemon(
        {
            "agent": {"socket": agent.address, "models_dir": str(models_dir)},
            "cameras": [
                {
                    "name": "line1",
                    "source": stream.url,
                    "model": "seg",
                    "max_fps": 5,
                    "read_timeout": READ_TIMEOUT_S,
                    "open_timeout": 5,
                    "reconnect_initial": 0.2,
                    "reconnect_max": 1.0,
                }
            ],
            "sinks": [{"type": "jsonl", "path": str(events_path)}],
        }
    )
    wait_for(lambda: len(read_events(events_path)) >= 3, 30, "events from the RTSP stream")
    event = read_events(events_path)[0]
    # Red frames, decoded as RGB (not BGR: a BGR frame would read as blue-paint), resized to 128x96.
    assert event["is_anomalous"] and event["camera"] == "line1" and event["model"] == "seg"
    areas = {a["name"]: a["area"] for a in event["anomalies"]}
    assert areas["red-paint"] > 0.9 and areas["blue-paint"] == 0.0
    assert event["threshold"] == 0.05 and event["latency_ms"]["detect"] > 0

    # Drop the stream: the daemon notices, then reconnects once it is back.
    stream.stop()
    wait_for(lambda: not daemon.camera("line1").get("connected", True), 15, "the drop to be noticed")
    time.sleep(1.5)  # a few failed reopen attempts with back-off
    count = len(read_events(events_path))
    stream.start()
    wait_for(lambda: len(read_events(events_path)) >= count + 3, 30, "events after the stream came back")
    assert daemon.camera("line1")["reconnects"] >= 1

    # Stall it: the server keeps its socket open but sends nothing.
    assert stream.process is not None
    wait_for(lambda: daemon.camera("line1").get("connected"), 10, "the camera to be connected")
    os.kill(stream.process.pid, signal.SIGSTOP)
    try:
        stalled_at = time.monotonic()
        wait_for(
            lambda: not daemon.camera("line1").get("connected", True), 4 * READ_TIMEOUT_S, "stall detection"
        )
        detected_after = time.monotonic() - stalled_at
    finally:
        os.kill(stream.process.pid, signal.SIGCONT)
    assert detected_after < 4 * READ_TIMEOUT_S
    assert daemon.stop() == 0
    frame_ids = [e["frame_id"] for e in read_events(events_path)]
    assert frame_ids == sorted(frame_ids) and len(set(frame_ids)) == len(frame_ids)


def test_mjpeg_over_http_two_cameras_with_and_without_crop(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path
) -> None:
    agent = agent_process()
    agent.wait_ready()
    # 256x192 frames, grey with red paint over the top quarter.
    frame = np.asarray(make_image(red=0, width=2 * WIDTH, height=2 * HEIGHT))
    frame = frame.copy()
    frame[: HEIGHT // 2] = (250, 10, 10)
    server = MjpegServer(frame)
    events_path = tmp_path / "events.jsonl"
    try:
        camera_daemon(
            {
                "agent": {"socket": agent.address},
                "cameras": [
                    {"name": "whole", "source": server.url, "model": "seg", "width": WIDTH, "height": HEIGHT},
                    {
                        "name": "bottom",
                        "source": server.url,
                        "model": "seg",
                        "width": WIDTH,
                        "height": HEIGHT,
                        "crop": {"x": 0, "y": HEIGHT, "width": 2 * WIDTH, "height": HEIGHT},
                        "interval": 0.2,
                    },
                ],
                "sinks": [{"type": "jsonl", "path": str(events_path)}],
                "images": {"directory": str(tmp_path / "images"), "max_count": 2},
            }
        )

        def both() -> bool:
            cameras = {e["camera"] for e in read_events(events_path)}
            return cameras == {"whole", "bottom"}

        wait_for(both, 30, "events from both cameras")
        wait_for(lambda: len(read_events(events_path)) >= 8, 30, "more events")
    finally:
        server.close()
    events = read_events(events_path)
    whole = [e for e in events if e["camera"] == "whole"]
    bottom = [e for e in events if e["camera"] == "bottom"]
    assert all(e["is_anomalous"] for e in whole)
    assert not any(e["is_anomalous"] for e in bottom)
    red = [a["area"] for a in whole[0]["anomalies"] if a["name"] == "red-paint"]
    assert 0.2 < red[0] < 0.3  # a quarter of the frame
    # Anomalous frames are saved, the oldest removed past the count limit.
    saved = sorted((tmp_path / "images" / "whole").iterdir())
    assert 1 <= len(saved) <= 2
    assert all(isinstance(e["image"], str) for e in whole) and Path(whole[-1]["image"]).exists()
    assert all(e["image"] is None for e in bottom)


def test_a_corrupt_mjpeg_frame_is_skipped_and_only_a_failing_stream_reconnects(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path
) -> None:
    agent = agent_process()
    agent.wait_ready()
    frame = make_image(red=HEIGHT // 4)
    flaky = MjpegServer(frame, corrupt=lambda n: n % 2 == 0)  # every other frame does not decode
    broken = MjpegServer(frame, corrupt=lambda n: n > 3)  # three frames, then none decodes
    events_path = tmp_path / "events.jsonl"
    size = {"model": "seg", "width": WIDTH, "height": HEIGHT, "read_timeout": 1, "reconnect_initial": 0.2}
    try:
        daemon = camera_daemon(
            {
                "agent": {"socket": agent.address},
                "cameras": [
                    {"name": "flaky", "source": flaky.url, **size},
                    {"name": "broken", "source": broken.url, **size},
                ],
                "sinks": [{"type": "jsonl", "path": str(events_path)}],
            }
        )
        wait_for(lambda: daemon.camera("flaky").get("inferences", 0) >= 15, 30, "events between bad frames")
        wait_for(lambda: daemon.camera("broken").get("reconnects", 0) >= 1, 30, "the broken stream reopened")
        flaky_counts = daemon.camera("flaky")
        assert flaky_counts["reconnects"] == 0 and flaky_counts["errors"] >= 10, flaky_counts
    finally:
        flaky.close()
        broken.close()
    assert "no frame decoded for 1 s" in daemon.log()
    assert daemon.log().count("camera flaky: a frame does not decode") == 1  # the rest are counted


def test_stream_frames_larger_than_max_pixels_are_skipped_before_conversion(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path
) -> None:
    agent = agent_process()
    agent.wait_ready()
    server = MjpegServer(make_image(width=2 * WIDTH, height=2 * HEIGHT))  # 49,152 pixels a frame
    size = {"source": server.url, "model": "seg", "width": WIDTH, "height": HEIGHT}
    try:
        daemon = camera_daemon(
            {
                "agent": {"socket": agent.address},
                "cameras": [{"name": "bounded", "max_pixels": 40_000, **size}, {"name": "open", **size}],
                "sinks": [{"type": "jsonl", "path": str(tmp_path / "events.jsonl")}],
            }
        )
        wait_for(lambda: daemon.camera("open").get("inferences", 0) >= 5, 30, "events of the open camera")
        wait_for(lambda: daemon.camera("bounded").get("errors", 0) >= 5, 30, "skipped frames counted")
        bounded = daemon.camera("bounded")
    finally:
        server.close()
    assert bounded.get("inferences", 0) == 0 and bounded["reconnects"] == 0, bounded
    assert "256x192 frame is more than max_pixels" in bounded["last_error"]
