"""Fixtures for the camera daemon: real stream servers on loopback and the daemon as a process."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import AgentProcess, lookout_edge_command

HERE = Path(__file__).resolve().parent
SYSTEM_PYTHON = "/usr/bin/python3"
SCREENSHOTS = HERE.parents[1] / "build" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def agent_and_folder(agent_process: Callable[..., AgentProcess], tmp_path: Path) -> tuple[AgentProcess, Path]:
    """An agent process that answers, and an empty folder for a folder camera to watch."""
    agent = agent_process()
    agent.wait_ready()
    folder = tmp_path / "incoming"
    folder.mkdir()
    return agent, folder


def folder_camera_config(
    agent_address: str, name: str, folder: Path, sinks: list[dict[str, Any]]
) -> dict[str, Any]:
    """A daemon configuration with one camera watching `folder` (model "seg") and `sinks`."""
    return {
        "agent": {"socket": agent_address},
        "cameras": [{"name": name, "source": str(folder), "model": "seg", "poll_interval": 0.1}],
        "sinks": sinks,
    }


class RtspServer:
    """Debian's GStreamer RTSP server (tests/camera/rtsp_server.py) in its own process."""

    def __init__(self, color: str, width: int = 320, height: int = 240) -> None:
        self.port = free_port()
        self.url = f"rtsp://127.0.0.1:{self.port}/stream"
        self._args = [
            SYSTEM_PYTHON,
            str(HERE / "rtsp_server.py"),
            str(self.port),
            color,
            str(width),
            str(height),
        ]
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self._args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            self.process.kill()
            raise AssertionError(f"RTSP server did not start: {line}{self.process.stdout.read()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _gstreamer_missing() -> str | None:
    if shutil.which(SYSTEM_PYTHON) is None:
        return f"{SYSTEM_PYTHON} is missing"
    probe = subprocess.run(
        [
            SYSTEM_PYTHON,
            "-c",
            "import gi; gi.require_version('GstRtspServer', '1.0');"
            "from gi.repository import Gst, GstRtspServer;"
            "Gst.init(None); assert Gst.ElementFactory.find('x264enc')",
        ],
        capture_output=True,
        text=True,
    )
    if probe.returncode:
        return "GStreamer's RTSP server or x264enc is missing (run make setup): " + probe.stderr[-300:]
    return None


@pytest.fixture
def rtsp_server() -> Iterator[Callable[..., RtspServer]]:
    missing = _gstreamer_missing()
    if missing:
        pytest.skip(missing)
    servers: list[RtspServer] = []

    def start(color: str, width: int = 320, height: int = 240) -> RtspServer:
        server = RtspServer(color, width, height)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


class MjpegServer:
    """multipart/x-mixed-replace JPEG frames at 10 frames/s, as IP cameras serve them over HTTP."""

    def __init__(
        self,
        frame: np.ndarray,
        frames_per_connection: int | None = None,
        corrupt: Callable[[int], bool] | None = None,
    ) -> None:
        """With `frames_per_connection`, each connection is closed after that many frames (a drop);
        the frames `corrupt` is true of (numbered from 1 in each connection) are bytes no JPEG
        decoder accepts."""
        good = jpeg(frame)
        garbage = b"\xff\xd8" + bytes(range(256)) * 8
        stop = self._stop = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    sent = 0
                    while not stop.is_set() and sent != frames_per_connection:
                        sent += 1
                        payload = garbage if corrupt is not None and corrupt(sent) else good
                        head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(
                            payload
                        )
                        self.wfile.write(head + payload + b"\r\n")
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/video.mjpg"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()


class CameraDaemon:
    """`lookout-edge camera` in its own process, with its config, events and status under `root`."""

    def __init__(self, root: Path, config: dict[str, Any]) -> None:
        self.root = root
        config.setdefault("state_dir", str(root / "state"))
        config.setdefault("status", {"interval": 0.3})
        config["status"].setdefault("file", str(root / "status.json"))
        self.config_path = root / "camera.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.status_path = Path(config["status"]["file"])
        self.log_path = root / "camera.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                lookout_edge_command("camera", "--config", str(self.config_path)), stdout=log, stderr=log
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def status(self) -> dict[str, Any]:
        try:
            status = json.loads(self.status_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return status if self.process is not None and status.get("pid") == self.process.pid else {}

    def camera(self, name: str) -> dict[str, Any]:
        return self.status().get("cameras", {}).get(name, {})

    def sink(self, name: str) -> dict[str, Any]:
        """The sink's counters, or {} until the daemon has first written its status."""
        return self.status().get("sinks", {}).get(name, {})

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout)


def save_image(folder: Path, name: str, pixels: np.ndarray) -> Path:
    """Write an image the way a producer should: under a hidden name, then renamed into place."""
    hidden = folder / f".{name}"
    Image.fromarray(pixels).save(hidden, format=Path(name).suffix[1:].replace("jpg", "jpeg"))
    return hidden.rename(folder / name)


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.fixture
def camera_daemon(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], CameraDaemon]]:
    daemons: list[CameraDaemon] = []

    def start(config: dict[str, Any]) -> CameraDaemon:
        daemon = CameraDaemon(tmp_path, config)
        daemon.start()
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:  # SIGTERM, so that the daemon unlinks its segments
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.terminate()
            try:
                daemon.process.wait(30)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs, to fill up; skipped where the tests cannot mount one (they run as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip() or mounted.returncode}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def http(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET, or of a JSON POST when `data` is given; HTTP errors are returned too."""
    if data is not None:
        headers = {"Content-Type": "application/json", **(headers or {})}
    request = Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Debian's headless Chromium through chromedriver (selenium never downloads a browser here)."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("chromium and chromium-driver are missing (run make setup)")
    os.environ["SE_AVOID_STATS"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
