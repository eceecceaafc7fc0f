"""A longer run with repeated stream drops: descriptors, threads, memory and segments stay flat;
after SIGKILL a restart removes the dead daemon's segment."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from lookout_edge.shm import SHM_DIR
from tests.camera.conftest import MjpegServer, read_events, wait_for
from tests.conftest import HEIGHT, WIDTH, make_image, open_fds

CAMERA = f"leakcheck-{os.getpid()}"  # its own segment names, even beside another test run


def segments() -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"lookout_edge_camera_{CAMERA}_*"))


def process_figures(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as status:
        rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return {"fds": open_fds(pid), "threads": len(os.listdir(f"/proc/{pid}/task")), "rss_kb": rss_kb}


def test_flat_resources_over_reconnects_and_no_stale_segment_after_sigkill(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path
) -> None:
    agent = agent_process()
    agent.wait_ready()
    # Every connection ends after 15 frames (1.5 s): the camera reconnects again and again.
    server = MjpegServer(make_image(red=HEIGHT // 4), frames_per_connection=15)
    events_path = tmp_path / "events.jsonl"
    config = {
        "agent": {"socket": agent.address},
        "cameras": [
            {
                "name": CAMERA,
                "source": server.url,
                "model": "seg",
                "width": WIDTH,
                "height": HEIGHT,
                "reconnect_initial": 0.1,
            }
        ],
        "sinks": [{"type": "jsonl", "path": str(events_path)}],
        "images": {"directory": str(tmp_path / "images"), "max_count": 5},
    }
    try:
        daemon = camera_daemon(config)
        wait_for(lambda: daemon.camera(CAMERA).get("reconnects", 0) >= 2, 30, "the first reconnects")
        time.sleep(2.0)  # warm-up: allocator pools, gRPC threads
        before = process_figures(daemon.pid)
        reconnects_before = daemon.camera(CAMERA)["reconnects"]
        time.sleep(15.0)
        after = process_figures(daemon.pid)
        counts = daemon.camera(CAMERA)
        assert counts["reconnects"] >= reconnects_before + 5
        assert counts["inferences"] >= 50
        assert after["fds"] <= before["fds"] + 2, (before, after)
        assert after["threads"] <= before["threads"] + 1, (before, after)
        assert after["rss_kb"] <= before["rss_kb"] + 20_000, (before, after)
        assert len(segments()) == 1  # one reused segment, not one per frame
        assert len(list((tmp_path / "images" / CAMERA).iterdir())) <= 5

        # SIGKILL leaves the segment behind; the next daemon removes it at start.
        stale = segments()
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.process.wait()  # type: ignore[union-attr]
        assert segments() == stale
        count = len(read_events(events_path))
        restarted = camera_daemon(config)
        wait_for(lambda: len(read_events(events_path)) > count + 3, 30, "events after the restart")
        assert stale[0] not in segments() and len(segments()) == 1
        assert restarted.stop() == 0
        assert segments() == []
    finally:
        server.close()
