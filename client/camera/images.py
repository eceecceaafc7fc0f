"""Anomalous frames saved as JPEG with the mask overlaid, kept under a count, a size and an age limit.

Frames are only saved while the disk keeps `images.min_free_mb` free, so that the images never
take the room the spool, the JSONL file and the status file need.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .config import ImagesConfig
from .files import Episode

log = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.5


def overlay(pixels: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Blend the mask's coloured (non-background, i.e. not white) pixels over the frame."""
    if mask is None or mask.shape != pixels.shape:
        return pixels
    defect = np.any(mask != 255, axis=2)
    blended = pixels.copy()
    blended[defect] = (pixels[defect] * (1 - OVERLAY_ALPHA) + mask[defect] * OVERLAY_ALPHA).astype(np.uint8)
    return blended


class ImageStore:
    def __init__(self, config: ImagesConfig) -> None:
        assert config.directory is not None
        self._config = config
        self._directory = config.directory
        self._directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # (mtime, size, path) of the files kept, oldest first.
        self._kept = sorted(
            (p.stat().st_mtime, p.stat().st_size, p) for p in self._directory.glob("*/*.jpg") if p.is_file()
        )
        self._bytes = sum(size for _, size, _ in self._kept)
        self._low_space = Episode(log)

    def _room(self) -> bool:
        free = shutil.disk_usage(self._directory).free
        if free < self._config.min_free_bytes:
            self._low_space.failed(
                f"{self._directory}: {free / (1 << 20):.1f} MB free, below images.min_free_mb "
                f"{self._config.min_free_bytes / (1 << 20):g}; anomalous frames are not saved"
            )
            return False
        self._low_space.recovered(f"{self._directory}: saving anomalous frames")
        return True

    def save(
        self, camera: str, frame_id: int, captured: float, pixels: np.ndarray, mask: np.ndarray | None
    ) -> Path | None:
        """The saved file, or None when the disk is below the reserve (skipped)."""
        with self._lock:
            room = self._room()
        if not room:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(captured)) + f"{captured % 1:.3f}"[1:]
        path = self._directory / camera / f"{stamp}Z-{frame_id:08d}.jpg"
        path.parent.mkdir(exist_ok=True)
        try:
            Image.fromarray(overlay(pixels, mask)).save(path, quality=90)
        except OSError:  # the disk filled up meanwhile: leave no partial JPEG
            path.unlink(missing_ok=True)
            raise
        size = path.stat().st_size
        with self._lock:
            self._kept.append((time.time(), size, path))
            self._bytes += size
            self._enforce()
        return path

    def _enforce(self) -> None:
        oldest_allowed = time.time() - self._config.max_age_s
        while self._kept and (
            len(self._kept) > self._config.max_count
            or self._bytes > self._config.max_bytes
            or self._kept[0][0] < oldest_allowed
        ):
            _, size, path = self._kept.pop(0)
            self._bytes -= size
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
