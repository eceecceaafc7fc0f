"""Evaluating a model graph on a labelled dataset, the way the agent would run it.

The graph runs in ONNX Runtime exactly as the agent runs it, and its outputs are read with the
agent's verdict rule (lookout_edge.contract): `anomaly_score >= threshold`, no mask for a
normal verdict. Metrics are the guide's (precision, recall, F1; per-label F1 and
IoU for segmentation) plus image AUROC and pixel AUROC.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from lookout_edge.contract import (
    ANOMALY_MAP_OUTPUT,
    DEFAULT_THRESHOLD,
    INPUT_NAME,
    LABEL_MAP_OUTPUT,
    SCORE_OUTPUT,
    is_anomalous,
    verdict_label_map,
)
from lookout_edge.package import AnomalyLabel, read_package
from lookout_edge.trainer.datasets import Dataset, load_dataset
from lookout_edge.trainer.metrics import auroc, classification_metrics, pixel_auroc, segmentation_metrics
from lookout_edge.trainer.region import REGION_FILE, load_region
from lookout_edge.trainer.report import EVALUATION_NAME, REPORT_NAME, ReportItem, write_report


@dataclass(frozen=True)
class Evaluated:
    metrics: dict[str, Any]
    items: list[ReportItem]

    def files(self) -> dict[str, bytes]:
        """evaluation.json and report.html, as bytes for a model package."""
        with tempfile.TemporaryDirectory() as scratch:
            write_report(Path(scratch), self.metrics, self.items)
            return {name: (Path(scratch) / name).read_bytes() for name in (EVALUATION_NAME, REPORT_NAME)}


def evaluate_model(
    graph: bytes | Path,
    dataset: Dataset,
    labels: tuple[AnomalyLabel, ...],
    threshold: float = DEFAULT_THRESHOLD,
    region: np.ndarray | None = None,
) -> Evaluated:
    """Run the graph on every image of `dataset` and compute the metrics; `region` (the model's
    inspection region, [H, W] bool) is shown on the report's images."""
    session = ort.InferenceSession(
        graph if isinstance(graph, bytes) else str(graph), providers=["CPUExecutionProvider"]
    )
    outputs = [output.name for output in session.get_outputs()]
    segmentation = LABEL_MAP_OUTPUT in outputs and bool(labels) and dataset.is_segmentation
    wanted = [SCORE_OUTPUT, *(name for name in (ANOMALY_MAP_OUTPUT, LABEL_MAP_OUTPUT) if name in outputs)]
    remap = label_remap(dataset.labels, labels) if segmentation else None
    truths, scores, maps, true_maps, predicted_maps = [], [], [], [], []
    items = []
    for sample in dataset.samples:
        image = dataset.load_image(sample)
        result = dict(zip(wanted, session.run(wanted, {INPUT_NAME: image}), strict=True))
        score = float(np.asarray(result[SCORE_OUTPUT]).reshape(-1)[0])
        anomalous = is_anomalous(score, threshold)
        truth_map = dataset.load_label_map(sample)
        if truth_map is not None and remap is not None:
            truth_map = remap[truth_map]
        predicted_map = (
            verdict_label_map(np.asarray(result[LABEL_MAP_OUTPUT], dtype=np.uint8), anomalous)
            if segmentation
            else None
        )
        truths.append(sample.is_anomalous)
        scores.append(score)
        if truth_map is not None and ANOMALY_MAP_OUTPUT in result:
            true_maps.append(truth_map)
            maps.append(np.asarray(result[ANOMALY_MAP_OUTPUT], dtype=np.float32))
        if predicted_map is not None and truth_map is not None:
            predicted_maps.append(predicted_map)
        items.append(
            ReportItem(
                name=sample.image_path.name,
                image=image,
                is_anomalous=sample.is_anomalous,
                score=score,
                predicted=anomalous,
                label_map_true=truth_map if segmentation else None,
                label_map_pred=predicted_map,
                labels=labels if segmentation else (),
                region=region,
            )
        )
    truth_array = np.array(truths, dtype=bool)
    score_array = np.array(scores)
    verdicts = np.array([item.predicted for item in items], dtype=bool)
    metrics: dict[str, Any] = {
        "threshold": threshold,
        "images": {"normal": int((~truth_array).sum()), "anomalous": int(truth_array.sum())},
        "classification": classification_metrics(truth_array, verdicts),
    }
    if truth_array.any() and not truth_array.all():
        metrics["auroc"] = auroc(truth_array, score_array)
    if maps and any(m.any() for m in true_maps):
        metrics["pixel_auroc"] = pixel_auroc(true_maps, maps)
    if predicted_maps:
        metrics["segmentation"] = segmentation_metrics(
            true_maps, predicted_maps, [label.name for label in labels]
        )
    return Evaluated(metrics, items)


def label_remap(
    dataset_labels: tuple[AnomalyLabel, ...], model_labels: tuple[AnomalyLabel, ...]
) -> np.ndarray:
    """A lookup table from the dataset's label indices to the model's, matched by name."""
    model_index = {label.name: index for index, label in enumerate(model_labels, start=1)}
    unknown = [label.name for label in dataset_labels if label.name not in model_index]
    if unknown:
        raise ValueError(
            f"the dataset has label(s) {', '.join(unknown)} that the model does not know "
            f"(it knows {', '.join(model_index) or 'none'})"
        )
    table = np.zeros(256, dtype=np.uint8)
    for index, label in enumerate(dataset_labels, start=1):
        table[index] = model_index[label.name]
    return table


def evaluate_package(package_dir: Path, dataset_path: Path) -> Evaluated:
    """Evaluate an existing model package on every image of a labelled dataset."""
    package = read_package(package_dir)
    split = load_dataset(dataset_path, check_counts=False)
    datasets = [split.train] if split.test is None else [split.train, split.test]
    dataset = datasets[-1]
    if (dataset.width, dataset.height) != (package.width, package.height):
        raise ValueError(
            f"the dataset's images are {dataset.width}x{dataset.height}, "
            f"the model was trained on {package.width}x{package.height}"
        )
    region_file = package_dir / REGION_FILE
    region = None
    if any(entry.path == region_file for entry in package.files):
        loaded = load_region(region_file, package.width, package.height)
        region = None if loaded is None else loaded.pixels
    return evaluate_model(package.model_file.path, dataset, package.labels, package.threshold, region)


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The evaluation in a few lines for a terminal."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    classification = metrics["classification"]
    lines = [
        f"images: {metrics['images']['normal']} normal, {metrics['images']['anomalous']} anomalous",
        f"precision {pct(classification['precision'])}, recall {pct(classification['recall'])}, "
        f"F1 {pct(classification['f1'])}",
    ]
    if "auroc" in metrics:
        lines.append(f"image AUROC {metrics['auroc']:.4f}")
    if "pixel_auroc" in metrics:
        lines.append(f"pixel AUROC {metrics['pixel_auroc']:.4f}")
    if "segmentation" in metrics:
        for label in metrics["segmentation"]["labels"]:
            lines.append(f"label {label['name']}: F1 {pct(label['f1'])}, IoU {pct(label['iou'])}")
        lines.append(f"mean IoU {pct(metrics['segmentation']['mean_iou'])}")
    return lines
