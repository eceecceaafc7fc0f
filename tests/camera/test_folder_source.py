"""The folder source against hostile folders: oversized images, old modification times, FIFOs,
restarts; the camera keeps going and reports every file it refuses."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from tests.camera.conftest import agent_and_folder, folder_camera_config, read_events, save_image, wait_for
from tests.conftest import HEIGHT, make_image

OLD_MTIME = 1_600_000_000  # September 2020: what `cp -p`, `rsync -t` or `mv` from staging keep


def blank_png(path: Path, width: int, height: int) -> None:
    """A black 1-bit PNG of any size in a few kilobytes: what a decompression bomb looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the row's bits
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def sources(events_path: Path) -> list[str]:
    return [Path(e["source_file"]).name for e in read_events(events_path)]


def test_oversized_images_are_refused_before_decoding_and_the_camera_keeps_going(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path
) -> None:
    agent, folder = agent_and_folder(agent_process, tmp_path)
    blank_png(folder / "0-large.png", 12000, 12000)  # 144 megapixels: 432 MB once decoded as RGB
    blank_png(folder / "1-bomb.png", 20000, 20000)  # Pillow itself refuses it (DecompressionBombError)
    save_image(folder, "2-good.png", make_image(red=HEIGHT // 2))
    events_path = tmp_path / "events.jsonl"
    daemon = camera_daemon(
        folder_camera_config(agent.address, "bench", folder, [{"type": "jsonl", "path": str(events_path)}])
    )
    wait_for(lambda: "2-good.png" in sources(events_path), 30, "the image after the oversized ones")
    save_image(folder, "3-later.png", make_image())
    wait_for(lambda: "3-later.png" in sources(events_path), 15, "a later image")
    assert sources(events_path) == ["2-good.png", "3-later.png"]
    wait_for(lambda: daemon.camera("bench").get("inferences") == 2, 5, "the status")
    counts = daemon.camera("bench")
    assert counts["connected"] and counts["errors"] == 2, counts
    log = daemon.log()
    for name in ("0-large.png", "1-bomb.png"):
        assert any(name in line and "max_pixels 50000000" in line for line in log.splitlines()), log
    assert peak_rss_kb(daemon.pid) < 400_000  # nothing of the 144 or 400 megapixels was decoded
    assert daemon.stop() == 0


def test_files_older_than_the_last_one_are_processed_and_a_restart_repeats_none(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path
) -> None:
    agent = agent_process()
    agent.wait_ready()
    folder = tmp_path / "incoming"
    staging = tmp_path / "staging"
    folder.mkdir()
    staging.mkdir()
    events_path = tmp_path / "events.jsonl"
    config = folder_camera_config(
        agent.address, "bench", folder, [{"type": "jsonl", "path": str(events_path)}]
    )

    def move_in_old(name: str) -> None:
        """Written elsewhere long ago, then moved in: its mtime is older than every file here."""
        staged = save_image(staging, name, make_image(red=3))
        os.utime(staged, (OLD_MTIME, OLD_MTIME))
        staged.rename(folder / name)

    for name in ("a.png", "b.png"):
        save_image(folder, name, make_image())
    daemon = camera_daemon(config)
    wait_for(lambda: len(sources(events_path)) == 2, 30, "the first two images")
    move_in_old("c.png")
    wait_for(lambda: "c.png" in sources(events_path), 10, "an image with an old mtime")
    assert daemon.stop() == 0

    # While the daemon is down: one new image, one old one moved in.
    save_image(folder, "d.png", make_image())
    move_in_old("e.png")
    restarted = camera_daemon(config)
    wait_for(lambda: {"d.png", "e.png"} <= set(sources(events_path)), 30, "the images added while down")
    wait_for(lambda: restarted.camera("bench").get("frames") == 2, 5, "the status after the restart")
    assert sorted(sources(events_path)) == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert restarted.stop() == 0


def test_a_fifo_or_directory_named_like_an_image_is_skipped_and_sigterm_stops_the_daemon(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path
) -> None:
    agent, folder = agent_and_folder(agent_process, tmp_path)
    os.mkfifo(folder / "0-pipe.jpg")
    (folder / "1-directory.png").mkdir()
    events_path = tmp_path / "events.jsonl"
    daemon = camera_daemon(
        folder_camera_config(agent.address, "bench", folder, [{"type": "jsonl", "path": str(events_path)}])
    )
    save_image(folder, "2-good.png", make_image())
    wait_for(lambda: sources(events_path) == ["2-good.png"], 15, "the image after the FIFO")
    wait_for(lambda: daemon.camera("bench").get("errors") == 2, 5, "two refusals in the status")
    for name in ("0-pipe.jpg", "1-directory.png"):
        assert f"{folder / name}: not a regular file" in daemon.log()
    assert daemon.stop(timeout=10) == 0
