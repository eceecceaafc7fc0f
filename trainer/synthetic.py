"""A small, deterministic, realistic-looking dataset for fast tests and the demo.

Each image shows one round part with a procedural texture on a dark background, with a little jitter in
position, size and lighting. Anomalous images show one anomaly each, alternating:

- ``scratch``: a thin dark line across the part;
- ``missing``: a chunk of the part's rim cut away to the background.

The dataset is written twice over the same image files: as ``normal/`` and ``anomaly/`` folders
(classification, the guide's automatic labelling) and as a Ground Truth manifest ``train.manifest``
with refs relative to its folder, with masks in ``masks/`` in the guide's convention (white background,
a ``BACKGROUND`` entry at key ``"0"`` of ``internal-color-map``) when `segmentation` is true.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lookout_edge.package import AnomalyLabel

SCRATCH = AnomalyLabel(name="scratch", color="#E6194B")
MISSING = AnomalyLabel(name="missing", color="#4363D8")
LABELS = (SCRATCH, MISSING)
MASK_BACKGROUND = "#FFFFFF"
MANIFEST_NAME = "train.manifest"

_PART_RGB = np.array([196.0, 150.0, 96.0])
_BACKGROUND_RGB = np.array([38.0, 40.0, 46.0])
_DATE = "2024-01-01T00:00:00.000"  # fixed, so that the manifest's bytes depend on the seed only


def write_synthetic_dataset(
    out_dir: Path,
    normal: int = 20,
    anomalous: int = 10,
    size: tuple[int, int] = (256, 192),
    seed: int = 0,
    segmentation: bool = True,
) -> Path:
    """Write the dataset into `out_dir` (created if needed) and return the manifest's path.

    `size` is (width, height). The same arguments always write the same bytes. The defaults meet the
    guide's minimums for classification; segmentation without a test set needs 20 images per label,
    i.e. ``anomalous=40``, or ``load_dataset(..., check_counts=False)`` for quick runs.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    width, height = size
    # Texture frequencies and phases are drawn once: one kind of part, varying between images.
    waves = rng.uniform([0.04, 0.04, 0.0], [0.25, 0.25, 2 * np.pi], size=(6, 3))
    lines = []
    for index in range(normal + anomalous):
        is_anomalous = index >= normal
        number = index - normal if is_anomalous else index
        name = f"{'anomaly' if is_anomalous else 'normal'}-{number:03d}.png"
        folder = "anomaly" if is_anomalous else "normal"
        pixels, part, background = _render_part(rng, waves, width, height)
        label = LABELS[number % 2] if is_anomalous else None
        region = np.zeros((height, width), dtype=bool)
        if label is SCRATCH:
            region = _scratch(rng, part, width, height)
            pixels[region] *= rng.uniform(0.25, 0.4)
        elif label is MISSING:
            region = _missing_piece(rng, part, width, height)
            pixels[region] = background[region]
        image_ref = f"{folder}/{name}"
        _save(pixels, out_dir / image_ref)
        mask_ref = None
        if segmentation and label is not None:
            mask_ref = f"masks/{name}"
            mask = np.empty((height, width, 3), dtype=np.uint8)
            mask[:] = AnomalyLabel("background", MASK_BACKGROUND).rgb
            mask[region] = label.rgb
            _save(mask, out_dir / mask_ref)
        lines.append(_manifest_line(image_ref, is_anomalous, mask_ref))
    manifest = out_dir / MANIFEST_NAME
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return manifest


LABEL_KINDS = ("classification", "multi-label", "localisation")
# What each image of a Custom Labels set shows, in turn: one label per image for classification;
# for multi-label and localisation also both defects at once.
_LABEL_CYCLES = {
    "classification": (("normal",), ("scratch",), ("missing",)),
    "multi-label": (("normal",), ("scratch",), ("missing",), ("missing", "scratch")),
    "localisation": ((), ("scratch",), ("missing",), ("missing", "scratch")),
}


_CLASS_IDS = {"normal": 0, "scratch": 1, "missing": 2}


def write_label_dataset(
    out_dir: Path,
    kind: str,
    images: int = 60,
    size: tuple[int, int] = (256, 192),
    seed: int = 0,
) -> Path:
    """A Custom Labels dataset of the same parts (docs/custom-labels.md): a Ground Truth manifest
    in the Rekognition Custom Labels guide's format, written to `out_dir`; returns its path.

    classification: `normal`, `scratch` or `missing`, one per image; multi-label: the same, or
    both defects; localisation: a box around each defect (`scratch`, `missing`; normal parts
    have none). `size` is (width, height). The same arguments always write the same bytes.
    """
    if kind not in _LABEL_CYCLES:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(LABEL_KINDS)}")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    width, height = size
    waves = rng.uniform([0.04, 0.04, 0.0], [0.25, 0.25, 2 * np.pi], size=(6, 3))
    cycle = _LABEL_CYCLES[kind]
    lines = []
    for index in range(images):
        names = cycle[index % len(cycle)]
        pixels, part, background = _render_part(rng, waves, width, height)
        boxes = []
        for name in names:
            if name == "scratch":
                region = _scratch(rng, part, width, height)
                pixels[region] *= rng.uniform(0.25, 0.4)
            elif name == "missing":
                region = _missing_piece(rng, part, width, height)
                pixels[region] = background[region]
            else:
                continue
            ys, xs = np.nonzero(region)
            boxes.append((name, int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        image_ref = f"images/part-{index:04d}.png"
        _save(pixels, out_dir / image_ref)
        lines.append(_label_line(kind, image_ref, names, boxes, size))
    manifest = out_dir / f"{kind}.manifest"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return manifest


def _label_line(
    kind: str,
    image_ref: str,
    names: tuple[str, ...],
    boxes: list[tuple[str, int, int, int, int]],
    size: tuple[int, int],
) -> dict[str, Any]:
    """One manifest line as the Custom Labels guide's examples write it."""
    line: dict[str, Any] = {"source-ref": image_ref}
    job = {"job-name": "labeling-job/synthetic", "human-annotated": "yes", "creation-date": _DATE}
    if kind == "localisation":
        class_map = {"0": "scratch", "1": "missing"}
        ids = {name: int(key) for key, name in class_map.items()}
        line["bounding-box"] = {
            "image_size": [{"width": size[0], "height": size[1], "depth": 3}],
            "annotations": [
                {
                    "class_id": ids[name],
                    "left": left,
                    "top": top,
                    "width": right - left,
                    "height": bottom - top,
                }
                for name, left, top, right, bottom in boxes
            ],
        }
        line["bounding-box-metadata"] = {
            "objects": [{"confidence": 1} for _ in boxes],
            "class-map": class_map,
            "type": "groundtruth/object-detection",
            **job,
        }
        return line
    for name in names:
        attribute = "part-label" if kind == "classification" else f"part-{name}"
        line[attribute] = _CLASS_IDS[name] if kind == "classification" else 1
        line[f"{attribute}-metadata"] = {
            "confidence": 1,
            "class-name": name,
            "type": "groundtruth/image-classification",
            **job,
        }
    return line


def _render_part(
    rng: np.random.Generator, waves: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the image as float RGB, the part's boolean footprint and the background alone."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cx = width / 2 + rng.uniform(-0.03, 0.03) * width
    cy = height / 2 + rng.uniform(-0.03, 0.03) * height
    radius = min(width, height) * rng.uniform(0.36, 0.39)
    light = rng.uniform(0.88, 1.12)
    part = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    texture = sum(np.sin(fx * (xx - cx) + fy * (yy - cy) + phase) for fx, fy, phase in waves) / len(waves)
    shading = 1.0 - 0.25 * ((xx - cx) ** 2 + (yy - cy) ** 2) / radius**2  # a domed part, lit from above
    background = _BACKGROUND_RGB * light + rng.normal(0.0, 3.0, (height, width, 1))
    surface = _PART_RGB * light * (shading * (1.0 + 0.12 * texture))[..., None]
    surface += rng.normal(0.0, 4.0, (height, width, 1))
    pixels = np.where(part[..., None], surface, background)
    return pixels, part, background


def _scratch(rng: np.random.Generator, part: np.ndarray, width: int, height: int) -> np.ndarray:
    """A thin line between two points of the part, clipped to the part."""
    ys, xs = np.nonzero(part)
    first, second = rng.choice(len(xs), size=2, replace=False)
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).line(
        [(int(xs[first]), int(ys[first])), (int(xs[second]), int(ys[second]))], fill=255, width=2
    )
    return (np.asarray(canvas) > 0) & part


def _missing_piece(rng: np.random.Generator, part: np.ndarray, width: int, height: int) -> np.ndarray:
    """A disc centred on the part's rim: the part inside it is gone."""
    ys, xs = np.nonzero(part)
    cx, cy = xs.mean(), ys.mean()
    radius = np.sqrt(part.sum() / np.pi)
    angle = rng.uniform(0, 2 * np.pi)
    bite = radius * rng.uniform(0.22, 0.32)
    yy, xx = np.mgrid[0:height, 0:width]
    ex, ey = cx + radius * np.cos(angle), cy + radius * np.sin(angle)
    return part & ((xx - ex) ** 2 + (yy - ey) ** 2 <= bite**2)


def _save(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB").save(
        path,
        format="PNG",
        compress_level=1,  # noisy pixels barely compress: favour speed
    )


def _manifest_line(image_ref: str, is_anomalous: bool, mask_ref: str | None) -> dict[str, Any]:
    line: dict[str, Any] = {
        "source-ref": image_ref,
        "anomaly-label": int(is_anomalous),
        "anomaly-label-metadata": {
            "confidence": 1,
            "job-name": "labeling-job/synthetic",
            "class-name": "anomaly" if is_anomalous else "normal",
            "human-annotated": "yes",
            "creation-date": _DATE,
            "type": "groundtruth/image-classification",
        },
    }
    if mask_ref is not None:
        color_map = {
            "0": {"class-name": "BACKGROUND", "hex-color": MASK_BACKGROUND.lower(), "confidence": 0.0}
        }
        for key, label in enumerate(LABELS, start=1):
            color_map[str(key)] = {
                "class-name": label.name,
                "hex-color": label.color.lower(),
                "confidence": 0.0,
            }
        line["anomaly-mask-ref"] = mask_ref
        line["anomaly-mask-ref-metadata"] = {
            "internal-color-map": color_map,
            "type": "groundtruth/semantic-segmentation",
            "human-annotated": "yes",
            "creation-date": _DATE,
            "job-name": "labeling-job/synthetic",
        }
    return line
