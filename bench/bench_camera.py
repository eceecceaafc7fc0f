"""Benchmark the camera path at 1920x1080: decode → shared memory → DetectAnomalies → event.

An H.264 1080p video file is decoded by the daemon's file source (every frame, as fast as the
agent answers), so frames/s is the whole path's throughput; capture-to-result latency runs from
the decoded frame to the result. The daemon runs twice, without and with its dashboard (pages
fetched every second meanwhile): the ratio of frames/s says what the dashboard costs. Beside
it, the agent's own DetectAnomalies latency over shared memory on the same model and size,
measured with the client alone. The model is the trainer's graph at 1920x1080 with a
3,000-patch bank (bench/bench_agent.py), so its cost is a trained model's; pass --package for a
trained model package of any size (frames are resized to it).

    python bench/bench_camera.py [--frames N] [--package DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_agent import bench_model_graph  # noqa: E402
from lookout_edge.client.camera.config import parse_config  # noqa: E402
from lookout_edge.client.camera.daemon import CameraDaemon  # noqa: E402
from lookout_edge.client.edge_client import EdgeAgentClient  # noqa: E402
from lookout_edge.package import read_package, write_package  # noqa: E402

WIDTH, HEIGHT = 1920, 1080


def write_video(path: Path, frames: int) -> None:
    """A 1080p H.264 file: grey texture with a moving red defect."""
    rng = np.random.default_rng(0)
    base = rng.integers(90, 160, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(frames):
            image = base.copy()
            x = (index * 37) % (WIDTH - 200)
            image[400:600, x : x + 200] = (250, 10, 10)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "mean": round(statistics.fmean(ordered), 2),
        "p50": round(ordered[len(ordered) // 2], 2),
        "p95": round(ordered[int(0.95 * (len(ordered) - 1))], 2),
    }


def run_daemon(
    work: Path, socket: str, models: Path, video: Path, model: str, frames: int, dashboard: bool
) -> dict[str, Any]:
    """The camera path's figures for `frames` frames of `video`; with `dashboard`, the daemon
    serves its dashboard and a browser's worth of requests (the overview, the camera page, the
    status and an image, every second) arrive while it runs."""
    events = work / "events.jsonl"
    raw: dict[str, Any] = {
        "agent": {"socket": socket, "models_dir": str(models)},
        "state_dir": str(work / "state"),
        "cameras": [{"name": "bench", "source": str(video), "model": model}],
        "sinks": [{"type": "jsonl", "path": str(events)}],
    }
    if dashboard:
        raw["dashboard"] = {"address": "127.0.0.1:0"}
    daemon = CameraDaemon(parse_config(raw))
    viewer = None
    done = threading.Event()
    if daemon.dashboard is not None:
        base = daemon.dashboard.url
        viewer = threading.Thread(target=_view, args=(base, done), daemon=True)
    started = time.monotonic()
    daemon.start()
    if viewer is not None:
        viewer.start()
    while time.monotonic() - started < 600:
        count = len(events.read_text().splitlines()) if events.exists() else 0
        if count >= frames:
            break
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    done.set()
    daemon.stop()
    records = [json.loads(line) for line in events.read_text().splitlines()]
    return {
        "frames": len(records),
        "camera_fps": round(len(records) / elapsed, 2),
        "capture_to_result_ms": stats([r["latency_ms"]["capture_to_result"] for r in records]),
        "camera_detect_ms": stats([r["latency_ms"]["detect"] for r in records]),
    }


def _view(base: str, done: threading.Event) -> None:
    """What an open dashboard costs: its pages and an image fetched every second."""
    while not done.wait(1.0):
        for path in ("", "cameras/bench", "api/status", "cameras/bench/latest.jpg"):
            try:
                with urlopen(base + path, timeout=5) as reply:
                    reply.read()
            except OSError:
                pass


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--package", type=Path, help="a model package to use instead of the benchmark model")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="le-bench-cam-", dir="/tmp"))
    agent = None
    try:
        models = work / "models"
        if args.package:
            shutil.copytree(args.package, models / "model")
        else:
            manifest = {
                "component_name": "bench-camera",
                "model_type": "classification",
                "image": {"width": WIDTH, "height": HEIGHT},
                "threshold": 0.5,
            }
            write_package(models / "model", manifest, {"model.onnx": bench_model_graph(WIDTH, HEIGHT)})
        package = read_package(models / "model")
        socket = f"unix://{work}/agent.sock"
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lookout_edge.cli",
                "agent",
                "--socket",
                socket,
                "--models-dir",
                str(models),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        video = work / "line.mp4"
        write_video(video, args.frames)
        with EdgeAgentClient(socket, shm_prefix="lookout_edge_bench") as client:
            for _ in range(300):
                try:
                    client.start_and_wait(package.component_name)
                    break
                except Exception:
                    time.sleep(0.1)
            image = np.random.default_rng(1).integers(0, 255, (package.height, package.width, 3), np.uint8)
            direct = []
            for _ in range(30):
                started = time.perf_counter()
                client.detect(image, package.component_name, shared_memory=True)
                direct.append((time.perf_counter() - started) * 1000)

        figures = {
            "resolution": f"{WIDTH}x{HEIGHT}",
            "model": f"{package.component_name} ({package.width}x{package.height})",
            "agent_detect_shm_ms": stats(direct),
        }
        for name, dashboard in (("without_dashboard", False), ("with_dashboard", True)):
            figures[name] = run_daemon(
                work / name, socket, models, video, package.component_name, args.frames, dashboard
            )
        figures["dashboard_fps_ratio"] = round(
            figures["with_dashboard"]["camera_fps"] / figures["without_dashboard"]["camera_fps"], 3
        )
        print(json.dumps(figures, indent=2))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        return 0
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
