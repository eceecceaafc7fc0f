"""Rule-based Custom Labels packages: real ONNX graphs of the runtime's contract that need no training.

Each label is a colour channel ("red", "green", "blue"): a graph scores an image (or, for
localisation, each half of it) by its mean colour, so a red image is predicted "red" and a
picture whose left half is green has a "green" box over its left half. Building them needs `onnx`.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lookout_edge.custom_labels import LabelPackage, project_arn, read_label_package, version_arn
from lookout_edge.package import write_package
from tests.sample_models import image_model

LABELS = ("red", "green", "blue")
WIDTH, HEIGHT = 96, 64
KIND_MODEL_TYPES = {
    "classification": "image-classification",
    "multi-label": "multi-label-classification",
    "localisation": "object-localisation",
}
# The two candidate boxes of a localisation model: the image's left and right halves.
HALF_BOXES = np.array([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 0.5, 1.0]], dtype=np.float32)
GAIN = 10.0  # a saturated channel's logit; sigmoid outputs get a bias of -GAIN / 2


def _graph(kind: str) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.eye(3, dtype=np.float32) * (GAIN / 255.0), "weights")
    bias = numpy_helper.from_array(np.full(3, -GAIN / 2, dtype=np.float32), "bias")
    nodes = [helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT)]
    initializers = [weights] if kind == "classification" else [weights, bias]
    if kind == "localisation":
        half = WIDTH // 2
        for index, (start, end) in enumerate(((0, half), (half, WIDTH))):
            for name, value in ((f"start{index}", start), (f"end{index}", end)):
                initializers.append(numpy_helper.from_array(np.array([value], dtype=np.int64), name))
            nodes += [
                helper.make_node(
                    "Slice", ["pixels", f"start{index}", f"end{index}", "axis1"], [f"half{index}"]
                ),
                helper.make_node("ReduceMean", [f"half{index}"], [f"mean{index}"], axes=[0, 1], keepdims=1),
            ]
        initializers.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"))
        initializers.append(numpy_helper.from_array(HALF_BOXES, "half_boxes"))
        nodes += [
            helper.make_node("Concat", ["mean0", "mean1"], ["means"], axis=0),
            helper.make_node("Reshape", ["means", "rows"], ["colours"]),
            helper.make_node("MatMul", ["colours", "weights"], ["logits"]),
            helper.make_node("Add", ["logits", "bias"], ["shifted"]),
            helper.make_node("Sigmoid", ["shifted"], ["box_scores"]),
            helper.make_node("Identity", ["half_boxes"], ["boxes"]),
        ]
        initializers.append(numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "rows"))
        outputs = [
            helper.make_tensor_value_info("box_scores", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [2, 4]),
        ]
    else:
        nodes += [
            helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[0, 1], keepdims=1),
            helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
        ]
        if kind == "classification":
            nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
        else:
            nodes += [
                helper.make_node("Add", ["logits", "bias"], ["shifted"]),
                helper.make_node("Sigmoid", ["shifted"], ["probabilities"]),
            ]
        nodes.append(helper.make_node("Reshape", ["probabilities", "flat"], ["label_scores"]))
        initializers.append(numpy_helper.from_array(np.array([3], dtype=np.int64), "flat"))
        outputs = [helper.make_tensor_value_info("label_scores", TensorProto.FLOAT, [3])]
    return image_model(nodes, f"colour-{kind}", HEIGHT, WIDTH, outputs, initializers)


def write_label_package(
    directory: Path,
    kind: str,
    project: str,
    version_name: str,
    created: datetime | None = None,
    threshold: float = 0.5,
    f1_score: float = 0.9,
) -> LabelPackage:
    """A package of `kind` (the CLI's kinds) for the labels red, green and blue."""
    created = created or datetime(2026, 12, 2, 10, 15, tzinfo=timezone.utc)
    millis = int(created.timestamp() * 1000)
    evaluation = {
        "Version": 1,
        "AggregatedEvaluationResults": {"F1Score": f1_score},
        "LabelEvaluationResults": [],
    }
    manifest = {
        "model_type": KIND_MODEL_TYPES[kind],
        "component_name": version_name,
        "project": project,
        "version_name": version_name,
        "project_arn": project_arn(project, millis),
        "model_arn": version_arn(project, version_name, millis),
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "image": {"width": WIDTH, "height": HEIGHT},
        "labels": [{"name": name, "assumed_threshold": threshold} for name in LABELS],
        "evaluation": "evaluation.json",
    }
    files = {"model.onnx": _graph(kind), "evaluation.json": json.dumps(evaluation).encode()}
    write_package(directory, manifest, files, check=read_label_package)
    return read_label_package(directory)


def colour_image(left: tuple[int, int, int], right: tuple[int, int, int] | None = None) -> np.ndarray:
    """An RGB image of WIDTH x HEIGHT whose left and right halves have the given colours."""
    image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    image[:, : WIDTH // 2] = left
    image[:, WIDTH // 2 :] = right or left
    return image


def png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
