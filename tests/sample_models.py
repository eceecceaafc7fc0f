"""Rule-based sample model packages: real ONNX graphs that need no training.

They flag strongly red pixels (and, for segmentation, strongly blue ones) as defects. The
demo and the tests use them to exercise the agent with real graphs of the documented
contract; trained models come from the trainer. Building them needs the `onnx` package
(the `train` or `dev` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lookout_edge.package import write_package

# A pixel is a "red" defect when R > 200 and G, B < 80; "blue" when B > 200 and R, G < 80.
RED_LABEL = {"name": "red-paint", "color": "#FF0000"}
BLUE_LABEL = {"name": "blue-paint", "color": "#0000FF"}
# The score saturates at 1 when a tenth of the image is defective.
SCORE_GAIN = 10.0
SAMPLE_THRESHOLD = 0.05


def _color_rule(channel: int) -> np.ndarray:
    """Per-pixel [low, high) bounds for one dominant channel, as a (2, 3) array."""
    low = np.array([0, 0, 0], dtype=np.uint8)
    high = np.array([80, 80, 80], dtype=np.uint8)
    low[channel], high[channel] = 201, 255
    return np.stack([low, high])


def sample_graph(height: int, width: int, segmentation: bool) -> bytes:
    """The serialized ONNX graph of a sample model for [height, width, 3] images."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    initializers = []
    defect_maps = []
    rules = [("red", 0)] + ([("blue", 2)] if segmentation else [])
    for name, channel in rules:
        bounds = _color_rule(channel)
        initializers += [
            numpy_helper.from_array(bounds[0], f"{name}_low"),
            numpy_helper.from_array(bounds[1], f"{name}_high"),
        ]
        nodes += [
            helper.make_node("GreaterOrEqual", ["image", f"{name}_low"], [f"{name}_ge"]),
            helper.make_node("LessOrEqual", ["image", f"{name}_high"], [f"{name}_le"]),
            helper.make_node("And", [f"{name}_ge", f"{name}_le"], [f"{name}_in"]),
            helper.make_node("Cast", [f"{name}_in"], [f"{name}_in_u8"], to=TensorProto.UINT8),
            helper.make_node("ReduceMin", [f"{name}_in_u8"], [f"{name}_mask"], axes=[2], keepdims=0),
        ]
        defect_maps.append(f"{name}_mask")
    initializers += [
        numpy_helper.from_array(np.array(SCORE_GAIN, dtype=np.float32), "gain"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
    ]
    # Any defect pixel counts towards the score.
    if segmentation:
        nodes.append(helper.make_node("Max", defect_maps, ["any_defect"]))
    else:
        nodes.append(helper.make_node("Identity", defect_maps, ["any_defect"]))
    nodes += [
        helper.make_node("Cast", ["any_defect"], ["any_defect_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["any_defect_f"], ["defect_fraction"], keepdims=0),
        helper.make_node("Mul", ["defect_fraction", "gain"], ["raw_score"]),
        helper.make_node("Clip", ["raw_score", "zero", "one"], ["anomaly_score"]),
    ]
    outputs = [helper.make_tensor_value_info("anomaly_score", TensorProto.FLOAT, [])]
    if segmentation:
        # label 1 where red, 2 where blue (blue wins where both would apply, which cannot happen).
        initializers.append(numpy_helper.from_array(np.array(2, dtype=np.uint8), "two"))
        nodes += [
            helper.make_node("Mul", ["blue_mask", "two"], ["blue_label"]),
            helper.make_node("Max", ["red_mask", "blue_label"], ["label_map"]),
        ]
        outputs.append(helper.make_tensor_value_info("label_map", TensorProto.UINT8, [height, width]))
    return image_model(nodes, "sample_color_defects", height, width, outputs, initializers)


def image_model(
    nodes: list[Any], name: str, height: int, width: int, outputs: list[Any], initializers: list[Any]
) -> bytes:
    """A checked, serialized opset-17 model whose one input is the uint8 [height, width, 3] `image`."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [height, width, 3])],
        outputs,
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lookout-edge"
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def write_sample_package(
    directory: Path, component_name: str, width: int = 640, height: int = 480, segmentation: bool = False
) -> Path:
    """Write a sample model package for `width` x `height` images."""
    manifest = {
        "component_name": component_name,
        "model_arn": f"sample:{component_name}",
        "model_type": "segmentation" if segmentation else "classification",
        "image": {"width": width, "height": height},
        "threshold": SAMPLE_THRESHOLD,
        "labels": [RED_LABEL, BLUE_LABEL] if segmentation else [],
        "training": {"method": "rule: strongly red (and blue) pixels are defects"},
    }
    return write_package(directory, manifest, {"model.onnx": sample_graph(height, width, segmentation)})
