"""Frame sources: live streams (latest frame wins), video files and watched folders (every frame).

Decoding is FFmpeg through PyAV, asked for `rgb24` directly, so frames are RGB888 as the
agent expects (OpenCV's BGR order never appears). Open and read timeouts are explicit: a
stalled stream raises within `read_timeout` and is reopened with exponential back-off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from .config import CameraConfig, Crop
from .status import CameraStats

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Frame:
    frame_id: int
    captured: float  # time.time() when the frame was decoded or read
    captured_monotonic: float
    raw: Any  # an av.VideoFrame or an [H, W, 3] uint8 RGB array
    origin: str | None = None  # the image file, for folder sources


def to_model_input(raw: Any, crop: Crop | None, size: tuple[int, int] | None) -> np.ndarray:
    """Crop, then resize to `size` (width, height): the RGB888 bitmap the model was trained on."""
    if isinstance(raw, av.VideoFrame) and crop is None:
        width, height = size if size is not None else (raw.width, raw.height)
        return raw.reformat(width=width, height=height, format="rgb24").to_ndarray()
    pixels = raw.to_ndarray(format="rgb24") if isinstance(raw, av.VideoFrame) else raw
    if crop is not None:
        if crop.x + crop.width > pixels.shape[1] or crop.y + crop.height > pixels.shape[0]:
            raise ValueError(
                f"crop {crop.width}x{crop.height}+{crop.x}+{crop.y} does not fit a "
                f"{pixels.shape[1]}x{pixels.shape[0]} frame"
            )
        pixels = pixels[crop.y : crop.y + crop.height, crop.x : crop.x + crop.width]
    if size is not None and (pixels.shape[1], pixels.shape[0]) != size:
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))
    return np.ascontiguousarray(pixels)


def _open(camera: CameraConfig) -> Any:
    options = {}
    if camera.source.startswith(("rtsp://", "rtsps://")):
        options["rtsp_transport"] = "tcp"
    options.update({str(k): str(v) for k, v in camera.options.items()})
    kind = "v4l2" if camera.source.startswith("/dev/video") else None
    return av.open(
        camera.source, format=kind, options=options, timeout=(camera.open_timeout, camera.read_timeout)
    )


class FrameSource:
    """What the camera worker reads from."""

    finished = False  # no frame will ever come again (end of a file that does not loop)

    def next_frame(self, timeout: float) -> Frame | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the source; idempotent."""


class LiveSource(FrameSource):
    """A reader thread decodes continuously and keeps only the newest frame."""

    def __init__(self, camera: CameraConfig, stats: CameraStats) -> None:
        self._camera = camera
        self._stats = stats
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._taken = 0
        self._thread = threading.Thread(target=self._run, name=f"camera-{camera.name}-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        delay = self._camera.reconnect_initial
        frame_id = 0
        first = True
        while not self._stop.is_set():
            got_frame = False
            try:
                if not first:
                    self._stats.add(reconnects=1)
                first = False
                with _open(self._camera) as container:
                    self._stats.set_connected(True)
                    for decoded in container.decode(video=0):
                        if self._stop.is_set():
                            return
                        frame_id += 1
                        got_frame = True
                        delay = self._camera.reconnect_initial
                        now = time.time()
                        frame = Frame(frame_id, now, time.monotonic(), decoded)
                        self._stats.add(frames=1)
                        with self._cond:
                            self._latest = frame
                            self._cond.notify_all()
                message = "stream ended"
            except (av.FFmpegError, OSError) as exc:
                message = str(exc)
            self._stats.set_connected(False)
            if self._stop.is_set():
                return
            self._stats.error(f"{self._camera.source}: {message}")
            if not got_frame:
                delay = min(delay * 2, self._camera.reconnect_max)
            wait = delay if not got_frame else self._camera.reconnect_initial
            log.warning("camera %s: %s; reopening in %.1f s", self._camera.name, message, wait)
            self._stop.wait(wait)

    def next_frame(self, timeout: float) -> Frame | None:
        with self._cond:
            self._cond.wait_for(
                lambda: (
                    self._stop.is_set() or (self._latest is not None and self._latest.frame_id > self._taken)
                ),
                timeout,
            )
            frame = self._latest
            if frame is None or frame.frame_id <= self._taken:
                return None
            self._taken = frame.frame_id
            self._latest = None  # let the decoder's buffer go
            return frame

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(self._camera.read_timeout + self._camera.open_timeout + 5)


class FileSource(FrameSource):
    """Every frame of a video file, in order; optionally from the start again at the end."""

    def __init__(self, camera: CameraConfig, stats: CameraStats) -> None:
        self._camera = camera
        self._stats = stats
        self._frames = self._decode()
        self._frame_id = 0

    def _decode(self) -> Iterator[Any]:
        while True:
            with _open(self._camera) as container:
                yield from container.decode(video=0)
            if not self._camera.loop:
                return

    def next_frame(self, timeout: float) -> Frame | None:
        if self.finished:
            return None
        try:
            decoded = next(self._frames)
        except StopIteration:
            self.finished = True
            return None
        self._frame_id += 1
        self._stats.add(frames=1)
        return Frame(self._frame_id, time.time(), time.monotonic(), decoded)

    def close(self) -> None:
        self._frames.close()  # type: ignore[attr-defined]


class FolderSource(FrameSource):
    """Images that appear in a folder, each once, oldest first.

    The folder is polled; a file is taken once its size and mtime have stopped changing
    between two polls, so half-written files are never read. Names starting with '.' are
    ignored (write to '.name' and rename). Files already there at start are processed too.
    """

    def __init__(self, camera: CameraConfig, stats: CameraStats) -> None:
        self._camera = camera
        self._stats = stats
        self._folder = Path(camera.source)
        self._done: tuple[float, str] = (0.0, "")  # (mtime, name) of the last processed file
        self._seen: dict[str, tuple[float, int]] = {}
        self._ready: list[tuple[float, str]] = []
        self._frame_id = 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        current: dict[str, tuple[float, int]] = {}
        try:
            entries = list(self._folder.iterdir())
        except OSError as exc:
            self._stats.error(f"{self._folder}: {exc.strerror}")
            return
        for path in entries:
            if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                info = path.stat()
            except OSError:
                continue
            key = (info.st_mtime, path.name)
            if key <= self._done:
                continue
            current[path.name] = (info.st_mtime, info.st_size)
            if self._seen.get(path.name) == current[path.name] and key not in self._ready:
                self._ready.append(key)
        self._seen = current
        self._ready.sort()

    def next_frame(self, timeout: float) -> Frame | None:
        deadline = time.monotonic() + timeout
        while not self._ready:
            self._poll()
            if self._ready:
                break
            if self._stop.wait(min(self._camera.poll_interval, max(0.0, deadline - time.monotonic()))):
                return None
            if time.monotonic() >= deadline:
                return None
        key = self._ready.pop(0)
        self._done = key
        path = self._folder / key[1]
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as exc:
            self._stats.error(f"{path}: {exc}")
            return None
        self._frame_id += 1
        self._stats.add(frames=1)
        return Frame(self._frame_id, time.time(), time.monotonic(), pixels, origin=str(path))

    def close(self) -> None:
        self._stop.set()


def open_source(camera: CameraConfig, stats: CameraStats) -> FrameSource:
    kind = camera.kind
    if kind == "live":
        return LiveSource(camera, stats)
    if kind == "folder":
        return FolderSource(camera, stats)
    return FileSource(camera, stats)
