"""Anomalous frames saved as JPEG with the mask overlaid, kept under a count, a size and an age limit."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .config import ImagesConfig

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

    def save(
        self, camera: str, frame_id: int, captured: float, pixels: np.ndarray, mask: np.ndarray | None
    ) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(captured)) + f"{captured % 1:.3f}"[1:]
        path = self._directory / camera / f"{stamp}Z-{frame_id:08d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(overlay(pixels, mask)).save(path, quality=90)
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
