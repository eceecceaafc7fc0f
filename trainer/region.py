"""The inspection region: where a model looks. Outside it nothing is scored or painted.

Given at training time (``lookout-edge train DATASET --region FILE``) as either

- a PNG mask the size of the training images: a pixel is inspected when its value is not zero
  (any of R, G, B for colour masks) and it is not fully transparent (alpha 0, when the PNG has
  an alpha channel); or
- a JSON file of polygons in image pixel coordinates (x to the right, y down, (0, 0) the
  top-left pixel's centre): ``{"polygons": [[[x, y], ...], ...], "exclude": [...]}``. The region
  is the union of ``polygons`` minus the union of the optional ``exclude`` polygons. Pixels are
  filled as Pillow's ``ImageDraw.polygon`` fills them, edges included, so
  ``[[0, 0], [W-1, 0], [W-1, H-1], [0, H-1]]`` covers the whole image.

How the exported graph applies it (trainer/export.py):

- Patches lie on a stride-8 grid of the network input, rows x cols; patch (r, c) covers the
  image area [r H / rows, (r + 1) H / rows) x [c W / cols, (c + 1) W / cols). Its weight is the
  fraction of that area inside the region.
- The image's raw score is the maximum over patches of weight x blurred distance: the map is
  weighted after the 3x3 grid blur, so a patch fully inside keeps exactly the value the model
  without region gives it, a patch fully outside counts for nothing and a patch on the edge
  counts in proportion to its part inside.
- `anomaly_map` and `label_map` are those of the model without region, set to 0 at every pixel
  outside the region.

The memory bank and the segmentation head are built from every patch, as without a region: a
patch inside is compared with the same bank, so its distance is the one the model without
region gives. The threshold is chosen from the region's scores of the training images.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lookout_edge.trainer.datasets import DatasetError
from lookout_edge.trainer.patchcore import raw_score

REGION_FILE = "region.png"
# A polygons file is a few KiB; anything far larger is not one.
MAX_POLYGONS_BYTES = 1 << 22
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RegionError(DatasetError):
    """A region file that cannot be used: the message names the file and what to do."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__([f"{path}: {problem}"])
        self.args = (f"the inspection region {path} cannot be used: {problem}",)


@dataclass(frozen=True)
class Region:
    pixels: np.ndarray  # [H, W] bool: True where the model inspects
    given_as: str  # "mask" or "polygons"
    source: str  # the file's name, as given
    _weights: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def patch_weights(self, grid: tuple[int, int]) -> np.ndarray:
        """[rows, cols] float32: the fraction of each patch's area inside the region.

        Patch (r, c) of a rows x cols grid covers image rows [r H / rows, (r + 1) H / rows) and
        columns [c W / cols, (c + 1) W / cols), pixels counted by the length they overlap it.
        """
        if grid not in self._weights:
            height, width = self.pixels.shape
            rows, columns = _overlap(grid[0], height), _overlap(grid[1], width)
            fraction = rows @ self.pixels.astype(np.float64) @ columns.T
            # Rounded so that a patch wholly inside weighs exactly 1 and one outside exactly 0.
            self._weights[grid] = np.clip(np.round(fraction, 9), 0.0, 1.0).astype(np.float32)
        return self._weights[grid]

    def png(self) -> bytes:
        """The region as an 8-bit PNG, 255 inside and 0 outside: the package's region.png."""
        buffer = io.BytesIO()
        Image.fromarray(self.pixels.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
        return buffer.getvalue()

    def manifest(self) -> dict[str, Any]:
        """The manifest's "region" entry (docs/model-package.md)."""
        return {
            "file": REGION_FILE,
            "given_as": self.given_as,
            "source": self.source,
            "fraction": round(float(self.pixels.mean()), 6),
        }


def _overlap(cells: int, pixels: int) -> np.ndarray:
    """[cells, pixels]: the part of each cell [i n / cells, (i + 1) n / cells) each pixel covers."""
    size = pixels / cells
    start = np.arange(cells)[:, None] * size
    pixel = np.arange(pixels)[None, :]
    covered = np.minimum(start + size, pixel + 1) - np.maximum(start, pixel)
    return np.maximum(covered, 0.0) / size


def region_raw_score(region: Region | None, grid_map: np.ndarray) -> float:
    """An image's raw score from its anomaly grid: the maximum of the grid weighted by the
    region (trainer/patchcore.py `raw_score`), or of the grid as it is without one."""
    if region is not None:
        grid_map = grid_map * region.patch_weights((grid_map.shape[0], grid_map.shape[1]))
    return raw_score(grid_map)


def mask_pixel_maps(
    region: Region | None, maps: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(P(anomaly), label) pixel maps of the segmentation head, P(anomaly) 0 outside the region.

    With P(anomaly) 0 the label map (`SegmentationHead.label_map`) is 0 there too, as in the graph.
    """
    if region is None:
        return maps
    anomaly, label = maps
    return np.where(region.pixels, anomaly, 0.0), label


def load_region(path: Path | None, width: int, height: int) -> Region | None:
    """The region of a PNG mask or a polygons JSON file for images of `width` x `height`.

    RegionError (a DatasetError), naming the file and what to do, for a file that cannot be
    read, a mask of another size, malformed polygons, or a region without a single pixel.
    """
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RegionError(path, f"it cannot be read ({exc.strerror or exc})") from None
    if data.startswith(_PNG_SIGNATURE):
        pixels, given_as = _mask_pixels(path, data, width, height), "mask"
    elif (kind := _image_format(data)) is not None:
        raise RegionError(
            path, f"it is a {kind} image; a region mask must be a PNG (lossy formats blur its edge)"
        )
    else:
        pixels, given_as = _polygon_pixels(path, data, width, height), "polygons"
    if not pixels.any():
        raise RegionError(path, "it holds no pixel; mark the area to inspect (non-zero in a mask)")
    return Region(pixels, given_as, path.name)


def _image_format(data: bytes) -> str | None:
    """The format of an image Pillow recognises in `data`, or None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return str(image.format)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _mask_pixels(path: Path, data: bytes, width: int, height: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            values = np.asarray(image.convert("RGBA") if image.mode == "P" else image)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RegionError(path, f"it is not a readable PNG ({exc})") from None
    if values.shape[:2] != (height, width):
        raise RegionError(
            path,
            f"it is {values.shape[1]}x{values.shape[0]}, the training images are {width}x{height}: "
            "draw the mask on a training image, at its size",
        )
    if values.ndim == 2:
        return values != 0
    channels = values.shape[2]
    colour = values[..., : 3 if channels >= 3 else 1]
    inside = colour.any(axis=2)
    if channels in (2, 4):  # LA, RGBA: the last channel is alpha
        inside &= values[..., -1] != 0
    return np.asarray(inside)


def _polygon_pixels(path: Path, data: bytes, width: int, height: int) -> np.ndarray:
    what = (
        'expected a PNG mask or a JSON file {"polygons": [[[x, y], ...], ...]} '
        "in image pixel coordinates (docs/trainer.md, Inspection region)"
    )
    if len(data) > MAX_POLYGONS_BYTES:
        raise RegionError(path, f"{len(data)} bytes is no polygons file; {what}")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegionError(path, f"it is neither a PNG nor JSON ({exc}); {what}") from None
    if not isinstance(document, dict) or "polygons" not in document:
        raise RegionError(path, f'it has no "polygons" key; {what}')
    unknown = sorted(set(document) - {"polygons", "exclude"})
    if unknown:
        raise RegionError(path, f"unknown key(s) {', '.join(unknown)}; {what}")
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for key, fill in (("polygons", 1), ("exclude", 0)):
        polygons = document.get(key, [])
        if not isinstance(polygons, list) or (key == "polygons" and not polygons):
            raise RegionError(path, f'"{key}" must be a non-empty list of polygons; {what}')
        for index, polygon in enumerate(polygons):
            points = _polygon(path, f"{key}[{index}]", polygon, width, height)
            draw.polygon(points, fill=fill, outline=fill)
    return np.asarray(canvas, dtype=bool)


def _polygon(path: Path, where: str, polygon: Any, width: int, height: int) -> list[tuple[float, float]]:
    """The vertices of one polygon, checked: at least 3 [x, y] pairs of numbers on the image."""
    if not isinstance(polygon, list) or len(polygon) < 3:
        raise RegionError(path, f"{where} must be a list of at least 3 [x, y] vertices")
    points = []
    for vertex in polygon:
        if (
            not isinstance(vertex, list)
            or len(vertex) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in vertex)
            or not all(math.isfinite(v) for v in vertex)
        ):
            raise RegionError(path, f"{where} has vertex {vertex!r}; vertices are [x, y] numbers")
        x, y = float(vertex[0]), float(vertex[1])
        if not (0 <= x <= width and 0 <= y <= height):
            raise RegionError(
                path,
                f"{where} has vertex [{vertex[0]}, {vertex[1]}] outside the {width}x{height} training "
                "images; coordinates are image pixels, (0, 0) top left",
            )
        points.append((x, y))
    return points
