from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookout_edge.package import AnomalyLabel
from lookout_edge.trainer.metrics import classification_metrics, segmentation_metrics
from lookout_edge.trainer.report import EVALUATION_NAME, REPORT_NAME, ReportItem, write_report

RED = AnomalyLabel("scratch", "#FF0000")
BLUE = AnomalyLabel("dent", "#0000FF")


class _Page(HTMLParser):
    """Collects what the tests look at: gallery entries, images, histogram shapes, tags used."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[dict[str, str]] = []
        self.images: list[str] = []
        self.bars: list[dict[str, str]] = []
        self.threshold_lines: list[dict[str, str]] = []
        self.tags: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        classes = attributes.get("class", "").split()
        self.tags.add(tag)
        if tag == "div" and "item" in classes:
            self.entries.append(attributes)
        if tag == "img":
            self.images.append(attributes["src"])
        if tag == "rect" and "bar" in classes:
            self.bars.append(attributes)
        if tag == "line" and "threshold" in classes:
            self.threshold_lines.append(attributes)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _decode(src: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert src.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :])))


def _gray(height: int = 96, width: int = 128) -> np.ndarray:
    return np.full((height, width, 3), 128, np.uint8)


def _classification_items() -> list[ReportItem]:
    # (name, truth, score); threshold 0.5
    cases = [("ok-normal", False, 0.1), ("false-alarm", True, 0.3), ("ok-anomaly", True, 0.9)]
    cases += [("missed", False, 0.7), ("ok-normal-2", False, 0.2)]
    return [ReportItem(name, _gray(), truth, score, score >= 0.5) for name, truth, score in cases]


def _evaluation(items: list[ReportItem]) -> dict[str, object]:
    metrics = classification_metrics(
        np.array([i.is_anomalous for i in items]), np.array([i.predicted for i in items])
    )
    return {"threshold": 0.5, "classification": metrics, "auroc": 0.75, "model": "demo v1"}


def test_report_files_and_gallery_order(tmp_path: Path) -> None:
    items = _classification_items()
    report = write_report(tmp_path / "out", _evaluation(items), items)
    assert report == tmp_path / "out" / REPORT_NAME
    assert {p.name for p in report.parent.iterdir()} == {REPORT_NAME, EVALUATION_NAME}
    page = _parse(report)
    names = [entry["data-name"] for entry in page.entries]
    assert names == ["false-alarm", "missed", "ok-normal", "ok-anomaly", "ok-normal-2"]
    assert [("wrong" in entry["class"]) for entry in page.entries] == [True, True, False, False, False]
    assert len(page.images) == len(items)
    assert _decode(page.images[0]).size == (256, 192)


def test_report_is_self_contained(tmp_path: Path) -> None:
    items = _classification_items()
    page = _parse(write_report(tmp_path, _evaluation(items), items))
    assert "script" not in page.tags and "link" not in page.tags
    assert all(src.startswith("data:image/jpeg;base64,") for src in page.images)
    text = " ".join(page.text)
    for expected in ("Precision", "Recall", "F1 score", "50.0 %", "demo v1", "0.7500"):
        assert expected in text


def test_histogram_counts_and_threshold(tmp_path: Path) -> None:
    items = _classification_items()
    page = _parse(write_report(tmp_path, _evaluation(items), items))
    counts = {"normal": 0, "anomalous": 0}
    for bar in page.bars:
        counts[bar["class"].split()[1]] += int(bar["data-count"])
    assert counts == {"normal": 3, "anomalous": 2}
    (line,) = page.threshold_lines
    assert line["x1"] == line["x2"]
    # The plot spans x = 40 .. 630 for scores 0 .. 1.
    assert float(line["x1"]) == pytest.approx(40 + 0.5 * 590, abs=0.1)


def test_evaluation_json_round_trips(tmp_path: Path) -> None:
    items = _classification_items()
    evaluation = _evaluation(items)
    evaluation["auroc"] = np.float64(0.75)  # numpy scalars are accepted
    write_report(tmp_path, evaluation, items)
    document = json.loads((tmp_path / EVALUATION_NAME).read_text(encoding="utf-8"))
    assert document["threshold"] == 0.5
    assert document["auroc"] == 0.75
    assert document["classification"] == evaluation["classification"]
    assert document["results"] == [
        {
            "name": i.name,
            "is_anomalous": i.is_anomalous,
            "predicted": i.predicted,
            "score": i.score,
            "correct": i.is_anomalous == i.predicted,
        }
        for i in items
    ]


@pytest.mark.parametrize("bad", [float("nan"), object()])
def test_failed_write_keeps_the_previous_evaluation(tmp_path: Path, bad: object) -> None:
    items = _classification_items()
    write_report(tmp_path, _evaluation(items), items)
    before = (tmp_path / EVALUATION_NAME).read_bytes()
    broken = {**_evaluation(items), "extra": {"value": bad}}
    with pytest.raises((ValueError, TypeError)):
        write_report(tmp_path, broken, items)
    assert (tmp_path / EVALUATION_NAME).read_bytes() == before
    assert {p.name for p in tmp_path.iterdir()} == {REPORT_NAME, EVALUATION_NAME}


def test_failed_first_write_leaves_no_file(tmp_path: Path) -> None:
    items = _classification_items()
    with pytest.raises(ValueError, match="Out of range float"):
        write_report(tmp_path, {**_evaluation(items), "auroc": float("inf")}, items)
    assert list(tmp_path.iterdir()) == []


def test_report_needs_a_threshold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="threshold"):
        write_report(tmp_path, {}, _classification_items())


def test_segmentation_overlays_and_label_table(tmp_path: Path) -> None:
    truth = np.zeros((64, 64), np.uint8)
    truth[:32, :32] = 1
    pred = np.zeros((64, 64), np.uint8)
    pred[32:, 32:] = 2
    items = [
        ReportItem("seg", _gray(64, 64), True, 0.9, True, truth, pred, (RED, BLUE)),
        ReportItem(
            "clean", _gray(64, 64), False, 0.1, False, np.zeros_like(truth), np.zeros_like(pred), (RED, BLUE)
        ),
    ]
    evaluation = {
        "threshold": 0.5,
        "segmentation": segmentation_metrics(
            [i.label_map_true for i in items], [i.label_map_pred for i in items], ["scratch", "dent"]
        ),
    }
    page = _parse(write_report(tmp_path, evaluation, items))
    assert len(page.entries) == 2
    assert len(page.images) == 4  # predicted and ground-truth overlays for each image
    predicted, ground_truth = (np.asarray(_decode(src).convert("RGB"), dtype=int) for src in page.images[:2])
    # Bottom-right is predicted "dent" (blue, half transparent over gray); top-left is true "scratch" (red).
    r, g, b = predicted[200, 200]
    assert b > 170 and r < 90 and g < 90
    assert abs(predicted[50, 50] - 128).max() < 10
    r, g, b = ground_truth[50, 50]
    assert r > 170 and g < 90 and b < 90
    assert abs(ground_truth[200, 200] - 128).max() < 10
    text = " ".join(page.text)
    assert "Performance per label" in text and "scratch" in text and "Average IoU" in text


def test_report_item_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ReportItem("x", np.zeros((4, 4), np.uint8), False, 0.1, False)
    with pytest.raises(ValueError, match="does not match"):
        ReportItem("x", _gray(4, 4), False, 0.1, False, label_map_true=np.zeros((3, 4), np.uint8))
    with pytest.raises(ValueError, match="has no label"):
        ReportItem(
            "x", _gray(4, 4), True, 0.9, True, label_map_pred=np.full((4, 4), 2, np.uint8), labels=(RED,)
        )
