"""The evaluation report of a Custom Labels model: `report.html`, self-contained like the anomaly
models' (trainer/report.py, whose page style and thumbnails it shares).

It shows what the Custom Labels console shows after training: the aggregate metrics, each
label's precision, recall, F1 and assumed threshold, the confusion matrix of a classification
model, and every test image with its true and predicted labels. On localisation models the
true boxes are drawn in green and the predicted ones in orange, with their label and
confidence. Images with a mistake come first.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import ImageDraw

from lookout_edge.custom_labels import Prediction
from lookout_edge.trainer.report import STYLE, figure, thumbnail

TRUTH_COLOR = (40, 170, 70)
PREDICTED_COLOR = (255, 140, 0)


@dataclass(frozen=True)
class LabelReportItem:
    name: str
    image: np.ndarray  # uint8 [H, W, 3], any size (a thumbnail is made)
    truth: tuple[str, ...]
    predictions: tuple[Prediction, ...]  # at the assumed thresholds
    truth_boxes: tuple[tuple[str, tuple[float, float, float, float]], ...] = ()  # fractions

    @property
    def correct(self) -> bool:
        predicted = {prediction.name for prediction in self.predictions}
        if self.truth_boxes or any(prediction.box for prediction in self.predictions):
            return len(self.predictions) == len(self.truth_boxes) and predicted == set(self.truth)
        return predicted == set(self.truth)


def render_label_report(summary: Mapping[str, Any], items: Sequence[LabelReportItem], title: str) -> str:
    aggregate = summary["AggregatedEvaluationResults"]
    details = summary["EvaluationDetails"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Model performance</h2>",
        "<table>",
        *(
            f'<tr><th>{name}</th><td class="num">{_number(aggregate.get(key))}</td></tr>'
            for name, key in (
                ("F1 score", "F1Score"),
                ("Precision", "Precision"),
                ("Recall", "Recall"),
                ("mAP (IoU 0.5)", "AveragePrecision"),
                ("Average recall", "AverageRecall"),
            )
            if key in aggregate
        ),
        f'<tr><th>Training images</th><td class="num">{details["NumberOfTrainingImages"]}</td></tr>',
        f'<tr><th>Test images</th><td class="num">{details["NumberOfTestingImages"]}</td></tr>',
        "</table>",
        "<h2>Per label</h2>",
        "<table><tr><th>Label</th><th>F1</th><th>Precision</th><th>Recall</th>"
        "<th>Assumed threshold</th><th>Test images</th></tr>",
        *(
            f"<tr><td>{html.escape(row['Label'])}</td>"
            + "".join(
                f'<td class="num">{_number(row["Metrics"][key])}</td>'
                for key in ("F1Score", "Precision", "Recall", "Threshold")
            )
            + f'<td class="num">{row["NumberOfTestingImages"]}</td></tr>'
            for row in summary["LabelEvaluationResults"]
        ),
        "</table>",
    ]
    if "ConfusionMatrix" in aggregate:
        parts += ["<h2>Confusion matrix (share of each true label's test images)</h2>"]
        parts += _confusion_table(aggregate["ConfusionMatrix"], details["Labels"])
    wrong = sum(not item.correct for item in items)
    parts += [
        f"<h2>Test images ({len(items)}, {wrong} with a mistake, shown first)</h2>",
        '<div class="gallery">',
        *(_entry(item) for item in sorted(items, key=lambda item: item.correct)),
        "</div></body></html>",
    ]
    return "\n".join(parts)


def _number(value: Any) -> str:
    return "–" if value is None else f"{float(value):.3f}"


def _confusion_table(entries: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[str]:
    value = {(entry["GroundTruthLabel"], entry["PredictedLabel"]): entry["Value"] for entry in entries}
    header = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    rows = [f"<table><tr><th>true \\ predicted</th>{header}</tr>"]
    for truth in labels:
        cells = "".join(f'<td class="num">{_number(value.get((truth, label)))}</td>' for label in labels)
        rows.append(f"<tr><th>{html.escape(truth)}</th>{cells}</tr>")
    return [*rows, "</table>"]


def _entry(item: LabelReportItem) -> str:
    picture = thumbnail(item.image)
    draw = ImageDraw.Draw(picture)
    width, height = picture.size
    boxes = [(name, box, TRUTH_COLOR, "") for name, box in item.truth_boxes]
    boxes += [
        (p.name, p.box, PREDICTED_COLOR, f" {100 * p.confidence:.0f}%") for p in item.predictions if p.box
    ]
    for name, (left, top, box_width, box_height), color, note in boxes:
        corner = (left * width, top * height)
        draw.rectangle(
            (*corner, (left + box_width) * width, (top + box_height) * height), outline=color, width=2
        )
        draw.text((corner[0] + 2, corner[1] + 1), f"{name}{note}", fill=color)
    predicted = ", ".join(f"{p.name} {100 * p.confidence:.1f} %" for p in item.predictions) or "nothing"
    status = "correct" if item.correct else "wrong"
    return (
        f'<div class="item {status}">{figure(picture, item.name, "")}<dl>'
        f"<dt>Image</dt><dd>{html.escape(item.name)}</dd>"
        f"<dt>True</dt><dd>{html.escape(', '.join(item.truth) or 'no label')}</dd>"
        f"<dt>Predicted</dt><dd>{html.escape(predicted)}</dd></dl></div>"
    )
