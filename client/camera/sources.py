"""Frame sources: live streams (latest frame wins), video files and watched folders (every frame).

Decoding is FFmpeg through PyAV, asked for `rgb24` directly, so frames are RGB888 as the
agent expects (OpenCV's BGR order never appears); frames of monochrome cameras (gray pixel
formats) and gray image files go through lookout_edge.images, the trainer's rule. Open and
read timeouts are explicit: a stalled stream raises within `read_timeout` and is reopened
with exponential back-off. A frame that does not decode is skipped; only a stream that
decodes nothing for `read_timeout` is reopened.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from lookout_edge.files import open_regular
from lookout_edge.images import gray_to_rgb888, gray_to_uint8, to_rgb888

from .config import CameraConfig, Crop
from .processed import FileKey, ProcessedFiles
from .status import CameraStats

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
# FFmpeg's gray pixel formats and their significant bits (V4L2 GREY is gray, Y10 gray10le,
# Y12 gray12le, Y16 gray16le; the PNG decoder gives gray16be).
GRAY_FORMAT_BITS = {
    "gray": 8,
    **{f"gray{bits}{order}": bits for bits in (9, 10, 12, 14, 16) for order in ("le", "be")},
}


class FrameError(Exception):
    """A frame or a file that cannot be used; the camera goes on with the next one."""


class StreamFailing(Exception):
    """Packets arrive but none has decoded for `read_timeout` seconds: the stream is reopened."""


@dataclass(frozen=True)
class Frame:
    frame_id: int
    captured: float  # time.time() when the frame was decoded or read
    captured_monotonic: float
    raw: Any  # an av.VideoFrame or an [H, W, 3] uint8 RGB array
    origin: str | None = None  # the image file, for folder sources


def to_model_input(raw: Any, crop: Crop | None, size: tuple[int, int] | None) -> np.ndarray:
    """Crop, then resize to `size` (width, height): the RGB888 bitmap the model was trained on.

    Frames in a gray pixel format are brought to 8 bits by the rule of lookout_edge.images (the
    trainer's), not by FFmpeg's scaler, which rounds 16-bit values differently; they are cropped
    and resized while gray (a third of the work) and replicated to RGB last.
    """
    if isinstance(raw, av.VideoFrame):
        gray_bits = GRAY_FORMAT_BITS.get(raw.format.name)
        if gray_bits is not None:
            gray = gray_to_uint8(raw.to_ndarray(), gray_bits)
            return gray_to_rgb888(_crop_and_resize(gray, crop, size))
        if crop is None:
            width, height = size if size is not None else (raw.width, raw.height)
            return raw.reformat(width=width, height=height, format="rgb24").to_ndarray()
        raw = raw.to_ndarray(format="rgb24")
    return np.ascontiguousarray(_crop_and_resize(raw, crop, size))


def _crop_and_resize(pixels: np.ndarray, crop: Crop | None, size: tuple[int, int] | None) -> np.ndarray:
    """[H, W] gray or [H, W, 3] RGB uint8 pixels, cropped then resized to `size` (width, height)."""
    if crop is not None:
        if crop.x + crop.width > pixels.shape[1] or crop.y + crop.height > pixels.shape[0]:
            raise ValueError(
                f"crop {crop.width}x{crop.height}+{crop.x}+{crop.y} does not fit a "
                f"{pixels.shape[1]}x{pixels.shape[0]} frame"
            )
        pixels = pixels[crop.y : crop.y + crop.height, crop.x : crop.x + crop.width]
    if size is not None and (pixels.shape[1], pixels.shape[0]) != size:
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))
    return pixels


def _open(camera: CameraConfig) -> Any:
    options = {}
    if camera.source.startswith(("rtsp://", "rtsps://")):
        options["rtsp_transport"] = "tcp"
    options.update({str(k): str(v) for k, v in camera.options.items()})
    kind = "v4l2" if camera.source.startswith("/dev/video") else None
    return av.open(
        camera.source, format=kind, options=options, timeout=(camera.open_timeout, camera.read_timeout)
    )


def decode_frames(container: Any, camera: CameraConfig, stats: CameraStats) -> Iterator[Any]:
    """The frames of the first video stream; a packet that does not decode, or a frame larger
    than the camera's max_pixels, is skipped and counted.

    Reading errors (a drop, a read timeout) are raised as they come; decoding errors only once
    they have lasted `read_timeout` seconds without a frame in between (StreamFailing). The
    first decoding error of a stream is logged, every one is counted in the status.
    """
    failing_since: float | None = None
    logged = False
    for packet in container.demux(video=0):
        try:
            frames = packet.decode()
        except av.FFmpegError as exc:
            stats.error(f"{camera.source}: a frame does not decode: {exc}")
            if not logged:
                log.warning(
                    "camera %s: a frame does not decode, skipped (counted from now on): %s", camera.name, exc
                )
                logged = True
            now = time.monotonic()
            if failing_since is None:
                failing_since = now
            elif now - failing_since >= camera.read_timeout:
                raise StreamFailing(f"no frame decoded for {camera.read_timeout:g} s") from exc
            continue
        for frame in frames:
            failing_since = None
            if frame.width * frame.height > camera.max_pixels:  # before its conversion to RGB
                stats.error(f"{camera.source}: a {frame.width}x{frame.height} frame is more than max_pixels")
                continue
            yield frame


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
                    for decoded in decode_frames(container, self._camera, self._stats):
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
            except (av.FFmpegError, OSError, StreamFailing) as exc:
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
                yield from decode_frames(container, self._camera, self._stats)
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
        except (av.FFmpegError, OSError, StreamFailing) as exc:  # the file ends here
            raise FrameError(f"{self._camera.source}: {exc}") from exc
        self._frame_id += 1
        self._stats.add(frames=1)
        return Frame(self._frame_id, time.time(), time.monotonic(), decoded)

    def close(self) -> None:
        self._frames.close()  # type: ignore[attr-defined]


class FolderSource(FrameSource):
    """Images that appear in a folder, each once, oldest first.

    The folder is polled; a file is taken once its size and mtime have stopped changing
    between two polls, so half-written files are never read. Names starting with '.' are
    ignored (write to '.name' and rename). Every file not processed yet is taken, whatever its
    mtime; a file is recorded as processed (`processed.py`) when the worker asks for the next
    one or stops, i.e. once its event was handed to the sinks.
    """

    def __init__(self, camera: CameraConfig, stats: CameraStats, state_dir: Path) -> None:
        self._camera = camera
        self._stats = stats
        self._folder = Path(camera.source)
        self._processed = ProcessedFiles(
            state_dir / "folders" / f"{camera.name}.processed", {p.name for p in self._folder.iterdir()}
        )
        self._seen: dict[str, FileKey] = {}
        self._ready: list[FileKey] = []
        self._current: FileKey | None = None  # taken, not recorded yet
        self._frame_id = 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        """Queue the files that are new and stable since the last poll, oldest first."""
        try:
            entries = list(self._folder.iterdir())
        except OSError as exc:
            self._stats.error(f"{self._folder}: {exc.strerror}")
            return
        current: dict[str, FileKey] = {}
        for path in entries:
            if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                info = path.stat()
            except OSError:
                continue
            key = current[path.name] = FileKey(path.name, info.st_size, info.st_mtime_ns)
            if self._seen.get(path.name) == key and key not in self._processed:
                self._ready.append(key)
        self._seen = current
        self._processed.retain(set(current))
        self._ready.sort(key=lambda key: (key.mtime_ns, key.name))

    def _record(self) -> None:
        if self._current is None:
            return
        key, self._current = self._current, None
        try:
            self._processed.add(key)
        except OSError as exc:
            message = f"cannot record {key.name} as processed: {exc.strerror}"
            self._stats.error(message)
            log.error("camera %s: %s", self._camera.name, message)

    def next_frame(self, timeout: float) -> Frame | None:
        self._record()
        deadline = time.monotonic() + timeout
        while not self._ready:
            self._poll()
            if self._ready:
                break
            if self._stop.wait(min(self._camera.poll_interval, max(0.0, deadline - time.monotonic()))):
                return None
            if time.monotonic() >= deadline:
                return None
        self._current = self._ready.pop(0)
        path = self._folder / self._current.name
        pixels = read_image(path, self._camera.max_pixels)
        self._frame_id += 1
        self._stats.add(frames=1)
        return Frame(self._frame_id, time.time(), time.monotonic(), pixels, origin=str(path))

    def close(self) -> None:
        self._stop.set()
        self._record()
        self._processed.close()


def read_image(path: Path, max_pixels: int) -> np.ndarray:
    """The RGB pixels of an image file; FrameError, before anything is decoded, for what is not
    a regular file (a FIFO would block) or has more than `max_pixels` pixels in its header."""
    try:
        fd, _ = open_regular(path)
    except OSError as exc:  # NotRegularFile included: "not a regular file"
        raise FrameError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        try:
            with Image.open(file) as image:
                if image.width * image.height > max_pixels:
                    raise FrameError(
                        f"{path}: {image.width}x{image.height} is more than max_pixels {max_pixels}"
                    )
                return to_rgb888(image)
        except Image.DecompressionBombError as exc:
            raise FrameError(f"{path}: more than max_pixels {max_pixels} ({exc})") from None
        except (OSError, ValueError) as exc:
            raise FrameError(f"{path}: {exc}") from None


def open_source(camera: CameraConfig, stats: CameraStats, state_dir: Path) -> FrameSource:
    kind = camera.kind
    if kind == "live":
        return LiveSource(camera, stats)
    if kind == "folder":
        return FolderSource(camera, stats, state_dir)
    return FileSource(camera, stats)
