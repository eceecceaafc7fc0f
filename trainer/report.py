"""The evaluation report: `evaluation.json` for programs, `report.html` for people.

The HTML page is self-contained (inline CSS, inline SVG, images as base64 JPEG; no script,
no external asset) so a quality engineer can open it offline or mail it. It shows what the
Lookout for Vision console showed after training: the summary metrics, the per-label metrics
of a segmentation model and every test image with its verdict, plus the score histogram with
the threshold, which tells how much margin the threshold leaves on each side. A model with an
inspection region shows it on every image: outlined, the outside dimmed.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from lookout_edge.package import AnomalyLabel

EVALUATION_NAME = "evaluation.json"
REPORT_NAME = "report.html"
THUMBNAIL_WIDTH = 256
OVERLAY_ALPHA = 128  # of 255: the defect stays visible under its label colour
OUTSIDE_BRIGHTNESS = 0.35  # outside the inspection region, thumbnails are dimmed to this
REGION_OUTLINE = (255, 212, 0)  # and the region's edge is drawn in this colour
HISTOGRAM_BINS = 20
NORMAL_COLOR = "#4C78A8"
ANOMALOUS_COLOR = "#E45756"


@dataclass(frozen=True)
class ReportItem:
    """One evaluated image. Label maps hold 0 for background and i for `labels[i - 1]`."""

    name: str
    # uint8 [H, W, 3]; kept at the gallery's thumbnail size, so that a report of thousands of
    # images does not hold them all at full size.
    image: np.ndarray
    is_anomalous: bool
    score: float
    predicted: bool
    label_map_true: np.ndarray | None = None  # uint8 [H, W]
    label_map_pred: np.ndarray | None = None  # uint8 [H, W]
    labels: tuple[AnomalyLabel, ...] = ()
    region: np.ndarray | None = None  # bool [H, W]: where the model inspects (trainer/region.py)

    def __post_init__(self) -> None:
        if self.image.dtype != np.uint8 or self.image.ndim != 3 or self.image.shape[2] != 3:
            raise ValueError(
                f"{self.name}: image must be uint8 [H, W, 3], got {self.image.dtype} {self.image.shape}"
            )
        if self.region is not None and self.region.shape != self.image.shape[:2]:
            raise ValueError(f"{self.name}: region {self.region.shape} does not match the image")
        for label_map in (self.label_map_true, self.label_map_pred):
            if label_map is None:
                continue
            if label_map.shape != self.image.shape[:2]:
                raise ValueError(f"{self.name}: label map {label_map.shape} does not match the image")
            if label_map.size and int(label_map.max()) > len(self.labels):
                raise ValueError(f"{self.name}: label map value {int(label_map.max())} has no label")
        if self.image.shape[1] > THUMBNAIL_WIDTH:
            object.__setattr__(self, "image", np.asarray(thumbnail(self.image)))

    @property
    def correct(self) -> bool:
        return self.is_anomalous == self.predicted

    @property
    def is_segmentation(self) -> bool:
        return self.label_map_true is not None or self.label_map_pred is not None

    def result(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "is_anomalous": bool(self.is_anomalous),
            "predicted": bool(self.predicted),
            "score": float(self.score),
            "correct": self.correct,
        }


def write_report(out_dir: Path, evaluation: Mapping[str, Any], items: Sequence[ReportItem]) -> Path:
    """Write `evaluation.json` and `report.html` into out_dir; return the HTML page's path.

    `evaluation` must hold "threshold"; it may hold "classification" (from
    `classification_metrics`), "auroc", "segmentation" (from `segmentation_metrics`) and other
    plain values, which are shown as details. The JSON file is `evaluation` plus the per-image
    results under "results". Both files are written to a temporary file then renamed, so a
    failed write leaves the previous file (or none), never half of one.
    """
    if "threshold" not in evaluation:
        raise ValueError("evaluation needs the 'threshold' the verdicts were made with")
    document = {**evaluation, "results": [item.result() for item in items]}
    page = render_html(evaluation, items)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(
        out_dir / EVALUATION_NAME,
        lambda stream: json.dump(document, stream, indent=2, allow_nan=False, default=plain_json),
    )
    report = out_dir / REPORT_NAME
    write_atomic(report, lambda stream: stream.write(page))
    return report


def plain_json(value: Any) -> Any:
    """Let numpy scalars and arrays through json.dump; anything else is a caller's mistake."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_atomic(path: Path, write: Callable[[IO[str]], object]) -> None:
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def render_html(evaluation: Mapping[str, Any], items: Sequence[ReportItem]) -> str:
    threshold = float(evaluation["threshold"])
    gallery = sorted(items, key=lambda item: item.correct)  # stable: misclassified first, in order
    wrong = sum(not item.correct for item in items)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Model evaluation</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Model evaluation</h1>",
        "<h2>Model performance metrics</h2>",
        _summary_table(evaluation, len(items)),
    ]
    if "segmentation" in evaluation:
        parts += ["<h2>Performance per label</h2>", _label_table(evaluation["segmentation"])]
    regions = [item.region for item in items if item.region is not None]
    if regions:
        parts.append(
            f'<p class="region">The model inspects {100 * float(regions[0].mean()):.1f} % of the image: '
            "the region outlined in yellow on every image. Outside it (dimmed) nothing is scored or "
            "painted.</p>"
        )
    parts += [
        "<h2>Scores</h2>",
        _histogram_svg([item.score for item in items], [item.is_anomalous for item in items], threshold),
        f"<h2>Images ({len(items)}, {wrong} misclassified, shown first)</h2>",
        '<div class="gallery">',
        *(_gallery_entry(item) for item in gallery),
        "</div></body></html>",
    ]
    return "\n".join(parts)


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin-bottom:1em}
th,td{border:1px solid #ccc;padding:.3em .7em;text-align:left}
td.num{text-align:right}
.gallery{display:flex;flex-wrap:wrap;gap:1em}
.item{border:2px solid #6a6;border-radius:4px;padding:.5em}
.item.wrong{border-color:#c33;background:#fff4f4}
.item figure{display:inline-block;margin:0 .3em 0 0}
.item figcaption,.item dl{font-size:.85em}
.item dl{display:grid;grid-template-columns:auto auto;gap:0 .7em;margin:.3em 0 0}
.item dd{margin:0}
.verdict{font-weight:bold}
.swatch{display:inline-block;width:.8em;height:.8em;margin-right:.3em;border:1px solid #444}
"""


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _row(name: str, value: str, note: str = "") -> str:
    return f"<tr><th>{html.escape(name)}</th><td class='num'>{value}</td><td>{html.escape(note)}</td></tr>"


def _summary_table(evaluation: Mapping[str, Any], images: int) -> str:
    rows = [_row("Threshold", f"{float(evaluation['threshold']):.4f}", "score ≥ threshold is anomalous")]
    rows.append(_row("Test images", str(images)))
    classification = evaluation.get("classification")
    if classification is not None:
        tp, fp, fn = classification["tp"], classification["fp"], classification["fn"]
        rows += [
            _row(
                "Precision", _percent(classification["precision"]), f"{tp} of {tp + fp} predicted anomalies"
            ),
            _row("Recall", _percent(classification["recall"]), f"{tp} of {tp + fn} anomalies found"),
            _row("F1 score", _percent(classification["f1"]), "harmonic mean of precision and recall"),
            _row("Confusion", f"TP {tp} · FP {fp} · TN {classification['tn']} · FN {fn}"),
        ]
    if evaluation.get("auroc") is not None:
        rows.append(_row("ROC AUC", f"{float(evaluation['auroc']):.4f}", "image scores"))
    shown = {"threshold", "classification", "auroc", "segmentation"}
    for key, value in evaluation.items():
        if key not in shown and isinstance(value, str | int | float | bool):
            rows.append(_row(key, html.escape(str(value))))
    return "<table>" + "".join(rows) + "</table>"


def _label_table(segmentation: Mapping[str, Any]) -> str:
    head = (
        "<tr><th>Label</th><th>Test images</th><th>Precision</th><th>Recall</th><th>F1 score</th>"
        "<th>Average IoU</th><th>Pixel IoU</th></tr>"
    )
    rows = [
        "<tr>"
        f"<td>{html.escape(label['name'])}</td><td class='num'>{label['test_images']}</td>"
        + "".join(
            f"<td class='num'>{_percent(label[key])}</td>"
            for key in ("precision", "recall", "f1", "average_iou", "iou")
        )
        + "</tr>"
        for label in segmentation["labels"]
    ]
    mean = f"<p>Mean IoU over labels: {_percent(segmentation['mean_iou'])}. "
    note = (
        "Average IoU is the mean over the images showing the label (in truth or prediction) of "
        "each image's overlap; pixel IoU pools the pixels of all images.</p>"
    )
    return "<table>" + head + "".join(rows) + "</table>" + mean + note


def _histogram_svg(scores: Sequence[float], anomalous: Sequence[bool], threshold: float) -> str:
    """Counts of normal and anomalous images per score bin on 0..1, side by side, and the threshold."""
    width, height, left, bottom, top = 640, 240, 40, 30, 20
    plot_w, plot_h = width - left - 10, height - bottom - top
    values = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    truth = np.asarray(anomalous, dtype=bool)
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    counts = {
        "normal": np.histogram(values[~truth], bins=edges)[0],
        "anomalous": np.histogram(values[truth], bins=edges)[0],
    }
    peak = max(1, int(max(c.max() for c in counts.values())) if values.size else 1)
    bin_w = plot_w / HISTOGRAM_BINS

    def x(score: float) -> float:
        return left + score * plot_w

    shapes = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="Histogram of image scores">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#444"/>',
    ]
    for offset, (kind, colour) in enumerate((("normal", NORMAL_COLOR), ("anomalous", ANOMALOUS_COLOR))):
        for index, count in enumerate(counts[kind]):
            bar_h = plot_h * int(count) / peak
            bar_x = x(edges[index]) + offset * bin_w / 2
            shapes.append(
                f'<rect class="bar {kind}" data-count="{int(count)}" x="{bar_x:.1f}" '
                f'y="{top + plot_h - bar_h:.1f}" width="{bin_w / 2 - 1:.1f}" height="{bar_h:.1f}" '
                f'fill="{colour}"/>'
            )
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        shapes.append(
            f'<text x="{x(tick):.1f}" y="{height - 10}" font-size="11" text-anchor="middle">{tick:g}</text>'
        )
    shapes.append(f'<text x="{left - 5}" y="{top + 4}" font-size="11" text-anchor="end">{peak}</text>')
    shapes.append(f'<text x="{left - 5}" y="{top + plot_h}" font-size="11" text-anchor="end">0</text>')
    line_x = x(min(max(threshold, 0.0), 1.0))
    shapes += [
        f'<line class="threshold" x1="{line_x:.1f}" y1="{top - 5}" x2="{line_x:.1f}" y2="{top + plot_h}" '
        'stroke="#000" stroke-width="2" stroke-dasharray="5,3"/>',
        f'<text x="{line_x + 4:.1f}" y="{top + 6}" font-size="11">threshold {threshold:.3f}</text>',
        f'<rect x="{width - 150}" y="4" width="10" height="10" fill="{NORMAL_COLOR}"/>',
        f'<text x="{width - 136}" y="13" font-size="11">normal</text>',
        f'<rect x="{width - 85}" y="4" width="10" height="10" fill="{ANOMALOUS_COLOR}"/>',
        f'<text x="{width - 71}" y="13" font-size="11">anomalous</text>',
        "</svg>",
    ]
    return "\n".join(shapes)


def _gallery_entry(item: ReportItem) -> str:
    status = "correct" if item.correct else "wrong"
    verdict = "✔ Correct" if item.correct else "✘ Wrong"
    small = thumbnail(item.image)
    if item.region is not None:
        small = _show_region(small, item.region)
    figures = []
    if item.is_segmentation:
        for caption, label_map in (("Predicted", item.label_map_pred), ("Ground truth", item.label_map_true)):
            picture = small if label_map is None else _overlay(small, label_map, item.labels)
            figures.append(figure(picture, f"{caption} ({item.name})", caption))
    else:
        figures.append(figure(small, item.name, ""))
    details = [
        ("Ground truth", _kind(item.is_anomalous)),
        ("Prediction", _kind(item.predicted)),
        ("Score", f"{item.score:.3f}"),
    ]
    if item.is_segmentation:
        details.append(("Predicted labels", _legend(item.label_map_pred, item.labels)))
        details.append(("True labels", _legend(item.label_map_true, item.labels)))
    rows = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in details)
    return (
        f'<div class="item {status}" data-name="{html.escape(item.name)}">'
        f'<div class="name">{html.escape(item.name)} <span class="verdict">{verdict}</span></div>'
        + "".join(figures)
        + f"<dl>{rows}</dl></div>"
    )


def _kind(anomalous: bool) -> str:
    return "Anomaly" if anomalous else "Normal"


def _legend(label_map: np.ndarray | None, labels: tuple[AnomalyLabel, ...]) -> str:
    if label_map is None:
        return "n/a"
    present = [labels[value - 1] for value in np.unique(label_map) if value > 0]
    return (
        ", ".join(
            f'<span class="swatch" style="background:{label.color}"></span>{html.escape(label.name)}'
            for label in present
        )
        or "none"
    )


def figure(picture: Image.Image, alt: str, caption: str) -> str:
    text = f"<figcaption>{caption}</figcaption>" if caption else ""
    return (
        f'<figure><img src="data:image/jpeg;base64,{jpeg_base64(picture)}" width="{picture.width}" '
        f'height="{picture.height}" alt="{html.escape(alt)}">{text}</figure>'
    )


def thumbnail(image: np.ndarray) -> Image.Image:
    height, width = image.shape[:2]
    size = (THUMBNAIL_WIDTH, max(1, round(height * THUMBNAIL_WIDTH / width)))
    return Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def _overlay(thumbnail: Image.Image, label_map: np.ndarray, labels: tuple[AnomalyLabel, ...]) -> Image.Image:
    """The thumbnail with each labelled pixel tinted in its label's colour, half transparent."""
    palette = np.zeros((len(labels) + 1, 4), dtype=np.uint8)
    for index, label in enumerate(labels, start=1):
        palette[index] = (*label.rgb, OVERLAY_ALPHA)
    small = Image.fromarray(np.ascontiguousarray(label_map, dtype=np.uint8)).resize(
        thumbnail.size, Image.Resampling.NEAREST
    )
    tint = Image.fromarray(palette[np.asarray(small)])  # [h, w, 4] uint8: RGBA
    return Image.alpha_composite(thumbnail.convert("RGBA"), tint).convert("RGB")


def _show_region(thumbnail: Image.Image, region: np.ndarray) -> Image.Image:
    """The thumbnail dimmed outside the region, with the region's edge outlined."""
    inside = (
        np.asarray(
            Image.fromarray(region.astype(np.uint8) * 255).resize(thumbnail.size, Image.Resampling.NEAREST)
        )
        > 0
    )
    pixels = np.asarray(thumbnail, dtype=np.float32)
    shown = np.where(inside[..., None], pixels, pixels * OUTSIDE_BRIGHTNESS)
    padded = np.pad(inside, 1, mode="edge")
    neighbours_outside = ~padded[:-2, 1:-1] | ~padded[2:, 1:-1] | ~padded[1:-1, :-2] | ~padded[1:-1, 2:]
    shown[inside & neighbours_outside] = REGION_OUTLINE
    return Image.fromarray(shown.astype(np.uint8))


def jpeg_base64(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
