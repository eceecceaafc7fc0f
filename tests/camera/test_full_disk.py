"""A full disk: the image store keeps its reserve free, the JSONL file holds exactly the events
its counter says, and SIGTERM still closes every sink and exits 0."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from tests.camera.conftest import agent_and_folder, folder_camera_config, read_events, save_image, wait_for
from tests.conftest import HEIGHT, make_image

MB = 1 << 20


def free_bytes(path: Path) -> int:
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


def fill(disk: Path, name: str, leave: int = 0) -> None:
    """Take the disk's free space, but for `leave` bytes; with 0, every last block."""
    with (disk / name).open("wb", buffering=0) as filler:
        chunk = bytes(64 << 10)
        while free_bytes(disk) > leave:
            try:
                filler.write(chunk[: max(4096, min(len(chunk), free_bytes(disk) - leave))])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return


def drop(folder: Path, first: int, count: int) -> None:
    for index in range(first, first + count):
        save_image(folder, f"{index:03d}.png", make_image(red=HEIGHT // 2, blue=index % 7))


def test_full_disk_keeps_the_reserve_counts_failed_writes_and_shuts_down_cleanly(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path, small_disk: Path
) -> None:
    agent, folder = agent_and_folder(agent_process, tmp_path)
    on_disk = small_disk / "events.jsonl"
    elsewhere = tmp_path / "events.jsonl"
    config = folder_camera_config(
        agent.address,
        "disk",
        folder,
        [{"type": "jsonl", "path": str(on_disk)}, {"type": "jsonl", "path": str(elsewhere)}],
    )
    config["images"] = {"directory": str(small_disk / "images"), "min_free_mb": 1}
    fill(small_disk, "filler", leave=MB + 150_000)
    daemon = camera_daemon(config)

    # The images take what is above the reserve, then are skipped; the events keep coming.
    drop(folder, 0, 40)
    wait_for(lambda: len(read_events(elsewhere)) == 40, 60, "40 events")
    assert len(read_events(on_disk)) == 40
    events = read_events(elsewhere)
    assert events[0]["image"] is not None and events[-1]["image"] is None
    wait_for(lambda: daemon.camera("disk").get("images_skipped", 0) >= 1, 5, "skipped images in the status")
    assert daemon.log().count("below images.min_free_mb") == 1  # once per episode
    assert free_bytes(small_disk) >= MB - (64 << 10)

    # Full: the events that do not fit are counted as failed and never land later (once the
    # last page's slack is used up); with room again, they go on.
    fill(small_disk, "filler2")
    drop(folder, 40, 15)
    wait_for(lambda: len(read_events(elsewhere)) == 55, 30, "the events while the disk is full")
    (small_disk / "filler2").unlink()
    drop(folder, 55, 5)
    wait_for(lambda: len(read_events(elsewhere)) == 60, 30, "the events once there is room")
    sink = f"jsonl:{on_disk}"
    wait_for(lambda: sum(daemon.sink(sink).get(k, 0) for k in ("delivered", "failures")) == 60, 5, "counters")
    failures = daemon.sink(sink)["failures"]
    assert failures >= 5
    assert_counters_match_the_file(daemon.sink(sink), on_disk)
    assert {f"{i:03d}.png" for i in range(55, 60)} <= {
        Path(e["source_file"]).name for e in read_events(on_disk)
    }

    # Full again at SIGTERM.
    fill(small_disk, "filler3")
    drop(folder, 60, 10)
    wait_for(lambda: len(read_events(elsewhere)) == 70, 30, "the events before the stop")
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log(), daemon.log()
    final = json.loads(daemon.status_path.read_text())["sinks"]  # written after every sink closed
    assert final[sink]["delivered"] + final[sink]["failures"] == 70 and final[sink]["failures"] > failures
    assert_counters_match_the_file(final[sink], on_disk)
    assert len(read_events(elsewhere)) == 70


def assert_counters_match_the_file(counters: dict[str, Any], path: Path) -> None:
    """The file holds exactly the events counted as delivered, whole, in order."""
    data = path.read_bytes()
    assert data.endswith(b"}\n")
    names = [Path(e["source_file"]).name for e in read_events(path)]
    assert len(data.splitlines()) == len(names) == counters["delivered"]
    assert names == sorted(set(names))
