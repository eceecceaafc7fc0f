"""Custom Labels models at run time: their packages, their graph contract and their predictions.

A Custom Labels model (docs/custom-labels.md) is a model package like an anomaly model's
(docs/model-package.md), with one of three `model_type`s and one static ONNX graph that takes
the raw RGB888 image at the package's size:

    image         input   uint8 [H, W, 3]
    label_scores  output  float32 [L]      image-classification (softmax) and
                                           multi-label-classification (a sigmoid per label)
    box_scores    output  float32 [N, L]   object-localisation: each candidate box's
    boxes         output  float32 [N, 4]   per-label probability, and the box as (left, top,
                                           width, height) fractions of the image

The graph does no thresholding and no suppression: `decode` applies each label's assumed
threshold (or the caller's MinConfidence) and, for boxes, per-label non-maximum suppression, so
that the endpoint, the CLI and the trainer's evaluation read one set of outputs one way.
This module imports no `onnx`: the endpoint needs only ONNX Runtime.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from lookout_edge.contract import INPUT_NAME
from lookout_edge.images import to_rgb888
from lookout_edge.package import (
    LABEL_MODEL_TYPES,
    MANIFEST_NAME,
    MAX_SIDE,
    MIN_SIDE,
    PackageError,
    PackageFile,
    package_dirs,
    read_manifest_object,
    read_package_files,
    require_key,
    verify_package_files,
)

__all__ = [
    "BOXES_OUTPUT",
    "BOX_SCORES_OUTPUT",
    "LABEL_MODEL_TYPES",
    "LABEL_SCORES_OUTPUT",
    "NMS_IOU",
    "ImageFormatError",
    "LabelModel",
    "LabelPackage",
    "LabelSpec",
    "NotALabelModel",
    "Prediction",
    "box_iou",
    "decode",
    "decode_image",
    "fit_image",
    "label_packages",
    "project_arn",
    "project_of_arn",
    "read_label_package",
    "version_arn",
    "version_of_arn",
]

IMAGE_CLASSIFICATION, MULTI_LABEL, LOCALISATION = LABEL_MODEL_TYPES

LABEL_SCORES_OUTPUT = "label_scores"
BOX_SCORES_OUTPUT = "box_scores"
BOXES_OUTPUT = "boxes"

# Boxes of one label that overlap a more confident one by more than this are the same object.
NMS_IOU = 0.5
MAX_LABELS = 250  # the guide's quota of labels per dataset

DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT = "000000000000"


class ImageFormatError(ValueError):
    """Bytes that are not a PNG or JPEG image this runtime can decode."""


class NotALabelModel(PackageError):
    """A readable package of another model type (an anomaly model of the Edge Agent)."""


@dataclass(frozen=True)
class LabelSpec:
    name: str
    assumed_threshold: float  # a probability, 0..1: the guide's "assumed threshold" / 100


@dataclass(frozen=True)
class LabelPackage:
    """What the endpoint and the CLI need to know about one Custom Labels model package."""

    directory: Path
    model_type: str
    project: str
    version_name: str
    project_arn: str
    model_arn: str
    created: datetime
    width: int
    height: int
    labels: tuple[LabelSpec, ...]
    model_file: PackageFile
    files: tuple[PackageFile, ...]
    evaluation_file: PackageFile | None

    @property
    def is_localisation(self) -> bool:
        return self.model_type == LOCALISATION

    def evaluation(self) -> dict[str, Any] | None:
        """The package's EvaluationSummary (the guide's evaluation JSON), if it has one."""
        if self.evaluation_file is None:
            return None
        try:
            data = json.loads(self.evaluation_file.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PackageError(f"{self.evaluation_file.path} cannot be read as JSON: {exc}") from None
        return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class Prediction:
    name: str
    confidence: float  # 0..1
    box: tuple[float, float, float, float] | None = None  # left, top, width, height as fractions


def project_arn(
    project: str, created_ms: int, region: str = DEFAULT_REGION, account: str = DEFAULT_ACCOUNT
) -> str:
    return f"arn:aws:rekognition:{region}:{account}:project/{project}/{created_ms}"


def version_arn(
    project: str,
    version_name: str,
    created_ms: int,
    region: str = DEFAULT_REGION,
    account: str = DEFAULT_ACCOUNT,
) -> str:
    return f"arn:aws:rekognition:{region}:{account}:project/{project}/version/{version_name}/{created_ms}"


# What project_arn and version_arn write, read back (any partition, region and account).
_PROJECT_ARN = re.compile(r"^arn:[^:]+:rekognition:[^:]*:[^:]*:project/([^/]+)/[0-9]+$")
_VERSION_ARN = re.compile(r"^arn:[^:]+:rekognition:[^:]*:[^:]*:project/([^/]+)/version/([^/]+)/[0-9]+$")


def project_of_arn(arn: str) -> str | None:
    """The project name in a project ARN, None when `arn` is not one."""
    match = _PROJECT_ARN.match(arn)
    return match[1] if match else None


def version_of_arn(arn: str) -> tuple[str, str] | None:
    """(project, version name) in a project-version ARN, None when `arn` is not one."""
    match = _VERSION_ARN.match(arn)
    return (match[1], match[2]) if match else None


def read_label_package(directory: Path) -> LabelPackage:
    """Parse and check a Custom Labels package's manifest; PackageError naming what is wrong."""
    manifest = directory / MANIFEST_NAME
    data = read_manifest_object(manifest)
    model_type = require_key(data, "model_type", str, manifest)
    if model_type not in LABEL_MODEL_TYPES:
        raise NotALabelModel(
            f"{manifest}: model_type {model_type!r} is not a Custom Labels model "
            f"({', '.join(LABEL_MODEL_TYPES)}); anomaly models are served by the Edge Agent"
        )
    names = {key: require_key(data, key, str, manifest) for key in ("project", "version_name")}
    for key, value in names.items():
        if not value or "/" in value:
            raise PackageError(f"{manifest}: '{key}' must be a non-empty name without '/'")
    arns = {key: require_key(data, key, str, manifest) for key in ("project_arn", "model_arn")}
    created = _read_time(require_key(data, "created", str, manifest), manifest)
    image = require_key(data, "image", dict, manifest)
    width = require_key(image, "width", int, manifest)
    height = require_key(image, "height", int, manifest)
    for side, value in (("width", width), ("height", height)):
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise PackageError(f"{manifest}: image {side} {value} is outside {MIN_SIDE}..{MAX_SIDE}")
    labels = _read_label_specs(require_key(data, "labels", list, manifest), manifest)
    files = read_package_files(data, directory, manifest)
    model_file = _listed(
        files, directory, require_key(data, "model_file", str, manifest), "model_file", manifest
    )
    evaluation = data.get("evaluation")
    evaluation_file = None
    if evaluation is not None:
        if not isinstance(evaluation, str):
            raise PackageError(f"{manifest}: 'evaluation' must name a file of the package")
        evaluation_file = _listed(files, directory, evaluation, "evaluation", manifest)
    return LabelPackage(
        directory=directory,
        model_type=model_type,
        project=names["project"],
        version_name=names["version_name"],
        project_arn=arns["project_arn"],
        model_arn=arns["model_arn"],
        created=created,
        width=width,
        height=height,
        labels=labels,
        model_file=model_file,
        files=files,
        evaluation_file=evaluation_file,
    )


def label_packages(models_dir: Path) -> tuple[list[LabelPackage], list[str]]:
    """The readable Custom Labels packages of `models_dir` and a message for each unreadable one
    (anomaly packages are skipped silently: they belong to the Edge Agent)."""
    packages, problems = [], []
    for directory in package_dirs(models_dir):
        try:
            packages.append(read_label_package(directory))
        except NotALabelModel:
            continue
        except PackageError as exc:
            problems.append(str(exc))
    return packages, problems


def _read_time(value: str, manifest: Path) -> datetime:
    try:
        created = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise PackageError(f"{manifest}: 'created' {value!r} is not an ISO 8601 time") from None
    return created if created.tzinfo else created.replace(tzinfo=timezone.utc)


def _read_label_specs(items: list[Any], manifest: Path) -> tuple[LabelSpec, ...]:
    labels = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise PackageError(
                f"{manifest}: labels[{index}] must be an object with 'name' and 'assumed_threshold'"
            )
        name = require_key(item, "name", str, manifest)
        threshold = require_key(item, "assumed_threshold", (int, float), manifest)
        if not name or not 0.0 <= threshold <= 1.0:
            raise PackageError(f"{manifest}: labels[{index}] needs a name and an assumed_threshold in 0..1")
        labels.append(LabelSpec(name, float(threshold)))
    if not 1 <= len(labels) <= MAX_LABELS or len({label.name for label in labels}) != len(labels):
        raise PackageError(f"{manifest}: 'labels' must hold 1 to {MAX_LABELS} labels with unique names")
    return tuple(labels)


def _listed(
    files: tuple[PackageFile, ...], directory: Path, name: str, key: str, manifest: Path
) -> PackageFile:
    path = (directory / name).resolve()
    entry = next((item for item in files if item.path == path), None)
    if entry is None:
        raise PackageError(f"{manifest}: {key} '{name}' is not listed under 'files'")
    return entry


def decode_image(data: bytes) -> np.ndarray:
    """RGB888 [H, W, 3] from the bytes of a PNG or JPEG file; ImageFormatError for anything else."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ("PNG", "JPEG"):
                raise ImageFormatError(
                    f"the image is {image.format or 'of an unknown format'}; send PNG or JPEG"
                )
            image.load()
            return to_rgb888(image)
    except ImageFormatError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageFormatError(f"the bytes are not a readable PNG or JPEG image: {exc}") from None


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` [n, 4] with every box of `b` [m, 4], boxes as (left, top, width, height)."""
    left = np.maximum(a[:, None, 0], b[None, :, 0])
    top = np.maximum(a[:, None, 1], b[None, :, 1])
    right = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2])
    bottom = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    union = (a[:, None, 2] * a[:, None, 3]) + (b[None, :, 2] * b[None, :, 3]) - inter
    return np.asarray(np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0))


def _suppress(boxes: np.ndarray, scores: np.ndarray) -> list[int]:
    """Indices kept by greedy non-maximum suppression, most confident first."""
    if not len(scores):
        return []
    order = list(np.argsort(-scores, kind="stable"))
    kept: list[int] = []
    while order:
        best = order.pop(0)
        kept.append(int(best))
        if order:
            overlaps = box_iou(boxes[[best]], boxes[order])[0]
            order = [index for index, iou in zip(order, overlaps, strict=True) if iou <= NMS_IOU]
    return kept


def decode(
    model_type: str,
    labels: Sequence[LabelSpec],
    outputs: dict[str, np.ndarray],
    min_confidence: float | None = None,
) -> list[Prediction]:
    """The predictions in a graph's outputs, most confident first.

    `min_confidence` (0..1) replaces every label's assumed threshold when given, as the guide's
    MinConfidence does.
    """

    def floor(index: int) -> float:
        return labels[index].assumed_threshold if min_confidence is None else min_confidence

    predictions = []
    if model_type != LOCALISATION:
        scores = np.asarray(outputs[LABEL_SCORES_OUTPUT], np.float64).reshape(-1)
        for index, score in enumerate(scores):
            if math.isfinite(score) and score >= floor(index):
                predictions.append(Prediction(labels[index].name, float(score)))
    else:
        box_scores = np.nan_to_num(np.asarray(outputs[BOX_SCORES_OUTPUT], np.float64), nan=-1.0)
        boxes = np.clip(np.nan_to_num(np.asarray(outputs[BOXES_OUTPUT], np.float64)), 0.0, 1.0)
        for index, label in enumerate(labels):
            candidates = np.flatnonzero(box_scores[:, index] >= floor(index))
            for kept in _suppress(boxes[candidates], box_scores[candidates, index]):
                row = candidates[kept]
                left, top, width, height = (float(value) for value in boxes[row])
                predictions.append(
                    Prediction(label.name, float(box_scores[row, index]), (left, top, width, height))
                )
    return sorted(predictions, key=lambda prediction: -prediction.confidence)


def fit_image(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """An RGB888 image brought to a graph's input size: bilinear, the aspect ratio not kept
    (box fractions hold for the original image either way). Training and serving both use it."""
    if rgb.shape[:2] == (height, width):
        return np.ascontiguousarray(rgb)
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))


class LabelModel:
    """One Custom Labels package loaded into ONNX Runtime."""

    def __init__(self, package: LabelPackage, providers: list[str] | None = None) -> None:
        import onnxruntime as ort  # the endpoint's one heavy import, paid when a model starts

        verify_package_files(package.files)
        self.package = package
        options = ort.SessionOptions()
        self._session = ort.InferenceSession(
            str(package.model_file.path), options, providers=providers or ["CPUExecutionProvider"]
        )
        self._outputs = [output.name for output in self._session.get_outputs()]
        expected = {BOX_SCORES_OUTPUT, BOXES_OUTPUT} if package.is_localisation else {LABEL_SCORES_OUTPUT}
        if not expected <= set(self._outputs):
            raise PackageError(
                f"{package.model_file.path} has outputs {self._outputs}; a {package.model_type} "
                f"graph needs {sorted(expected)}: retrain or repackage the model"
            )

    def raw(self, rgb: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs for an RGB888 image of any size (resized to the package's)."""
        image = fit_image(rgb, self.package.width, self.package.height)
        values = self._session.run(self._outputs, {INPUT_NAME: image})
        return {name: np.asarray(value) for name, value in zip(self._outputs, values, strict=True)}

    def predict(self, rgb: np.ndarray, min_confidence: float | None = None) -> list[Prediction]:
        return decode(self.package.model_type, self.package.labels, self.raw(rgb), min_confidence)
