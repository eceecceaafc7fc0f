"""Training a Custom Labels model: a labelled dataset in, an evaluated model package out.

As the guide does, the model is fitted on the training images and evaluated on the test images
(the user's test set, or 20 % of the training images split off when there is none). The test
set also chooses each label's assumed threshold (best F1, trainer/labels/evaluation.py and
trainer/labels/box_metrics.py); the package records it, and DetectCustomLabels falls back to
it when a request gives no MinConfidence. The package (docs/custom-labels.md) holds the graph,
the guide's EvaluationSummary (`evaluation.json`) and the report, written atomically.

The graph's input size is the training images' median size brought to a short side of
`short_side` pixels with the aspect ratio kept (multiples of 32); every image, in training and
at run time, is resized to it by `lookout_edge.custom_labels.fit_image`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from lookout_edge.contract import INPUT_NAME
from lookout_edge.custom_labels import (
    IMAGE_CLASSIFICATION,
    LABEL_SCORES_OUTPUT,
    LOCALISATION,
    MULTI_LABEL,
    LabelSpec,
    Prediction,
    decode,
    fit_image,
    project_arn,
    read_label_package,
    version_arn,
)
from lookout_edge.package import write_package
from lookout_edge.trainer.features import network_size_for
from lookout_edge.trainer.labels.box_metrics import TruthBox, evaluate_boxes
from lookout_edge.trainer.labels.classify import train_classifier
from lookout_edge.trainer.labels.dataset import Box, LabelDataset, LabelledImage, read_rgb
from lookout_edge.trainer.labels.evaluation import (
    LabelMetrics,
    classification_metrics,
    confusion_matrix,
    evaluation_summary,
)
from lookout_edge.trainer.labels.localise import train_localiser
from lookout_edge.trainer.labels.report import LabelReportItem, render_label_report
from lookout_edge.trainer.progress import QUIET, Progress
from lookout_edge.trainer.weights import load_pretrained_weights

MODEL_TYPES = {
    "classification": IMAGE_CLASSIFICATION,
    "multi-label": MULTI_LABEL,
    "localisation": LOCALISATION,
}
SHORT_SIDES = {"classification": 256, "multi-label": 256, "localisation": 320}
EVALUATION_FILE = "evaluation.json"
REPORT_FILE = "report.html"
# Every candidate box down to this confidence is kept for the evaluation, so that average
# precision sees the whole precision-recall curve.
EVALUATION_FLOOR = 0.01


@dataclass(frozen=True)
class LabelTrainOptions:
    short_side: int | None = None  # None: SHORT_SIDES of the kind
    seed: int = 0
    region: str = "us-east-1"
    account: str = "000000000000"
    # The ARNs an endpoint already gave the project and the version (CreateProjectVersion);
    # None: made from the region, the account and the time of training.
    project_arn: str | None = None
    version_arn: str | None = None


@dataclass(frozen=True)
class LabelTrainResult:
    package: Path
    summary: dict[str, Any]
    seconds: dict[str, float]


def version_name_for(project: str, when: datetime) -> str:
    """The name AWS gives a version when none is chosen: `<project>.<UTC time>`."""
    return f"{project}.{when.strftime('%Y-%m-%dT%H.%M.%S')}"


def input_size(images: Sequence[LabelledImage], short_side: int) -> tuple[int, int]:
    """(height, width) of the graph's input: the median image size at `short_side`."""
    height = float(np.median([image.height for image in images]))
    width = float(np.median([image.width for image in images]))
    return network_size_for(round(height), round(width), short_side)


def train_labels(
    dataset: LabelDataset,
    out_dir: Path,
    project: str,
    version_name: str | None = None,
    options: LabelTrainOptions = LabelTrainOptions(),
    progress: Progress = QUIET,
) -> LabelTrainResult:
    """Train, evaluate and package a Custom Labels model; the package appears complete or not at all."""
    began = time.perf_counter()
    created = datetime.now(timezone.utc)
    created_ms = int(created.timestamp() * 1000)
    version_name = version_name or version_name_for(project, created)
    arn = options.version_arn or version_arn(
        project, version_name, created_ms, options.region, options.account
    )
    height, width = input_size(dataset.train, options.short_side or SHORT_SIDES[dataset.kind])
    weights = load_pretrained_weights()

    def load(image: LabelledImage) -> np.ndarray:
        return fit_image(read_rgb(image), width, height)

    train_images = [load(image) for image in progress.each("images", dataset.train)]
    seconds = {"load": time.perf_counter() - began}
    if dataset.kind == "localisation":
        samples = [
            (pixels, [_scaled(box, image, width, height) for box in image.boxes])
            for pixels, image in zip(train_images, dataset.train, strict=True)
        ]
        graph = train_localiser(samples, dataset.labels, (height, width), weights)
    else:
        graph, _ = train_classifier(
            [(pixels, image.labels) for pixels, image in zip(train_images, dataset.train, strict=True)],
            dataset.labels,
            (height, width),
            weights,
            multi_label=dataset.kind == "multi-label",
            seed=options.seed,
        )
    graph_bytes = graph.SerializeToString()
    seconds["fit"] = time.perf_counter() - began - seconds["load"]

    session = _session(graph)
    test_images = [load(image) for image in progress.each("test images", dataset.test)]
    outputs = [_run(session, pixels) for pixels in test_images]
    model_type = MODEL_TYPES[dataset.kind]
    finished = datetime.now(timezone.utc)
    if dataset.kind == "localisation":
        metrics, aggregate, truths = _box_evaluation(dataset, outputs)
    else:
        scores = (
            np.stack([output[LABEL_SCORES_OUTPUT] for output in outputs]) if outputs else np.zeros((0, 0))
        )
        metrics = classification_metrics(scores, [image.labels for image in dataset.test], dataset.labels)
        aggregate = {
            "ConfusionMatrix": confusion_matrix(scores, [image.labels for image in dataset.test], metrics)
        }
        truths = [() for _ in dataset.test]
    specs = tuple(LabelSpec(item.label, item.threshold) for item in metrics)
    summary = evaluation_summary(
        arn, dataset.labels, metrics, len(dataset.train), len(dataset.test), finished, aggregate
    )
    items = [
        LabelReportItem(
            name=image.source,
            image=pixels,
            truth=image.labels,
            predictions=tuple(decode(model_type, specs, output)),
            truth_boxes=truth,
        )
        for image, pixels, output, truth in zip(dataset.test, test_images, outputs, truths, strict=True)
    ]
    report = render_label_report(summary, items, f"{project}: {version_name}")
    seconds["evaluate"] = time.perf_counter() - began - seconds["load"] - seconds["fit"]

    manifest = {
        "component_name": version_name,
        "model_type": model_type,
        "project": project,
        "version_name": version_name,
        "project_arn": options.project_arn
        or project_arn(project, created_ms, options.region, options.account),
        "model_arn": arn,
        "created": created.isoformat().replace("+00:00", "Z"),
        "image": {"width": width, "height": height},
        "labels": [{"name": spec.name, "assumed_threshold": spec.assumed_threshold} for spec in specs],
        "evaluation": EVALUATION_FILE,
        "training": {
            "method": "EfficientNet-Lite0 (ImageNet, frozen) features, "
            + ("box head" if dataset.kind == "localisation" else "logistic-regression head"),
            "images": len(dataset.train),
            "test_images": len(dataset.test),
            "test_split_automatic": dataset.test_split_automatic,
            "seed": options.seed,
        },
    }
    files = {
        "model.onnx": graph_bytes,
        EVALUATION_FILE: _json_bytes(summary),
        REPORT_FILE: report.encode("utf-8"),
    }
    package = write_package(out_dir, manifest, files, check=read_label_package)
    seconds["total"] = time.perf_counter() - began
    return LabelTrainResult(package, summary, seconds)


def _scaled(box: Box, image: LabelledImage, width: int, height: int) -> Box:
    """A box in the pixels of the image resized to the graph's input."""
    sx, sy = width / image.width, height / image.height
    return Box(box.label, box.left * sx, box.top * sy, box.width * sx, box.height * sy)


def _session(graph: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, pixels: np.ndarray) -> dict[str, np.ndarray]:
    names = [output.name for output in session.get_outputs()]
    values = session.run(names, {INPUT_NAME: pixels})
    return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}


def _box_evaluation(
    dataset: LabelDataset, outputs: list[dict[str, np.ndarray]]
) -> tuple[
    list[LabelMetrics], dict[str, Any], list[tuple[tuple[str, tuple[float, float, float, float]], ...]]
]:
    """Per-label metrics at the best-F1 thresholds, mAP and mAR, and the truth boxes as fractions."""
    floor = [LabelSpec(label, EVALUATION_FLOOR) for label in dataset.labels]
    predictions: list[list[Prediction]] = [decode(LOCALISATION, floor, output) for output in outputs]
    truths = [
        [TruthBox.from_pixels(box, image.width, image.height) for box in image.boxes]
        for image in dataset.test
    ]
    evaluation = evaluate_boxes(predictions, truths, dataset.labels)
    metrics = [
        LabelMetrics(
            item.label,
            item.threshold,
            item.precision,
            item.recall,
            item.f1,
            sum(item.label in image.labels for image in dataset.test),
        )
        for item in evaluation.labels
    ]
    aggregate = {
        "AveragePrecision": evaluation.mean_average_precision,
        "AverageRecall": evaluation.mean_average_recall,
    }
    shown = [tuple((truth.label, truth.box) for truth in image) for image in truths]
    return metrics, aggregate, shown


def _json_bytes(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, allow_nan=False) + "\n").encode("utf-8")
