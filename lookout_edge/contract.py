"""The graph contract of a model package and the verdict rule, in one place.

Every piece that makes, checks or runs a model's graph reads these names and rules from here:
the trainer when it exports and evaluates, the agent when it loads and answers, the TensorRT
backends when they rewrite the graph. docs/model-package.md describes the same contract.

    image          input   uint8 [H, W, 3]   the raw RGB888 bitmap at the training size
    anomaly_score  output  float32, 1 value  0..1, compared with the manifest's threshold
    confidence     output  float32, 1 value  optional
    label_map      output  uint8 [H, W]      segmentation: 0 background, i the i-th label
    anomaly_map    output  float32 [H, W]    optional, the trainer's per-pixel map; not served

The verdict is `anomaly_score >= threshold`, with the threshold read from the manifest, and a
normal verdict comes with an empty mask. The agent applies that rule to the graph's outputs,
so editing a manifest's threshold moves the verdict and the mask together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lookout_edge.package import PackageError

__all__ = [
    "ANOMALY_MAP_OUTPUT",
    "CONFIDENCE_OUTPUT",
    "DEFAULT_THRESHOLD",
    "INPUT_NAME",
    "LABEL_MAP_OUTPUT",
    "SCORE_OUTPUT",
    "TensorSpec",
    "check_graph_io",
    "clip_score",
    "confidence_of",
    "is_anomalous",
    "onnx_graph_io",
    "session_graph_io",
    "verdict_label_map",
]

INPUT_NAME = "image"
SCORE_OUTPUT = "anomaly_score"
CONFIDENCE_OUTPUT = "confidence"
LABEL_MAP_OUTPUT = "label_map"
ANOMALY_MAP_OUTPUT = "anomaly_map"

# The trainer calibrates its scores so that its chosen decision point lands here; it is the
# `threshold` a freshly trained package's manifest records.
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output as a runtime reports it: element type as a numpy dtype name
    ("uint8", "float32"), and the shape with None for a dimension that is not fixed."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


# ONNX Runtime's element type names that differ from numpy's.
_ORT_TYPES = {"float": "float32", "double": "float64", "float16": "float16"}


def session_graph_io(session: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs of an onnxruntime.InferenceSession."""

    def spec(value: Any) -> TensorSpec:
        kind = str(value.type).removeprefix("tensor(").removesuffix(")")
        shape = tuple(dim if isinstance(dim, int) else None for dim in value.shape)
        return TensorSpec(value.name, _ORT_TYPES.get(kind, kind), shape)

    return [spec(value) for value in session.get_inputs()], [spec(value) for value in session.get_outputs()]


def onnx_graph_io(model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs (initializers aside) and outputs of an onnx.ModelProto; needs the onnx package."""
    from onnx import helper

    def spec(value: Any) -> TensorSpec:
        tensor = value.type.tensor_type
        shape = tuple(dim.dim_value if dim.HasField("dim_value") else None for dim in tensor.shape.dim)
        return TensorSpec(value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name, shape)

    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [spec(value) for value in model.graph.input if value.name not in initializers]
    return inputs, [spec(value) for value in model.graph.output]


def check_graph_io(
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    width: int,
    height: int,
    segmentation: bool,
    where: object,
) -> None:
    """Raise PackageError, naming `where` and what is wrong, if the graph breaks the contract."""
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise PackageError(f"{where}: the graph must have exactly one input named '{INPUT_NAME}'")
    image = inputs[0]
    if image.dtype != "uint8":
        raise PackageError(f"{where}: input '{INPUT_NAME}' must be uint8, not {image.dtype}")
    expected = [height, width, 3]
    if list(image.shape) != expected:
        raise PackageError(
            f"{where}: input shape {list(image.shape)} does not match the manifest's image size {expected}"
        )
    names = {output.name for output in outputs}
    required = {SCORE_OUTPUT} | ({LABEL_MAP_OUTPUT} if segmentation else set())
    missing = required - names
    if missing:
        raise PackageError(f"{where}: the graph lacks output(s) {', '.join(sorted(missing))}")


def clip_score(score: float) -> float:
    """The anomaly score as served: within 0..1 whatever the graph returned."""
    return min(1.0, max(0.0, score))


def is_anomalous(score: float, threshold: float) -> bool:
    """The verdict rule: a score at or above the threshold is anomalous."""
    return score >= threshold


def verdict_label_map(label_map: np.ndarray, anomalous: bool) -> np.ndarray:
    """The label map that goes with a verdict: as the graph painted it, or empty when normal."""
    return label_map if anomalous else np.zeros_like(label_map)


def confidence_of(score: float, threshold: float) -> float:
    """Confidence in the verdict: 0.5 at the threshold, 1.0 at the far end of the score range.

    Used where a graph has no `confidence` output (docs/api-compatibility.md)."""
    if score >= threshold:
        span = 1.0 - threshold
        distance = score - threshold
    else:
        span = threshold
        distance = threshold - score
    return 0.5 + 0.5 * min(1.0, distance / span) if span > 0 else 1.0
