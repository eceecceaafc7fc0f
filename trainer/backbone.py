"""The frozen EfficientNet-Lite0 feature extractor as a self-contained ONNX graph.

The graph takes exactly the bytes a client sends — one interleaved RGB888 image, uint8 ``[H, W, 3]`` —
and does all preprocessing itself, so the agent never reimplements it:

    Cast -> Unsqueeze -> Transpose (HWC -> NCHW) -> Resize (bilinear, asymmetric, to the network size)
    -> Sub/Div ((x - 127) / 128) -> stem -> inverted-residual blocks

Batch norm is folded into the convolutions, TensorFlow "SAME" padding becomes explicit (possibly
asymmetric) Conv pads, and ReLU6 is Clip. Every shape is static and only TensorRT-friendly opset-17 ops
are used. The outputs are the feature maps of the selected stages, NCHW float32, named ``stage<i>``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lookout_edge.contract import INPUT_NAME
from lookout_edge.trainer.architecture import (
    INPUT_MEAN,
    INPUT_STD,
    STAGES,
    FoldedConv,
    check_config,
    feature_name,
    fold_backbone,
    same_padding,
)

# Opset 11 and IR version 6 are what TensorRT 7.1's parser (JetPack 4.4, Jetson Xavier) reads;
# ONNX Runtime and later TensorRT versions read them too.
OPSET = 11
IR_VERSION = 6


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def rename_last_output(self, name: str) -> str:
        """Give the most recent node's output (not yet consumed by any node) a public name."""
        self.nodes[-1].output[0] = name
        return name

    def conv(self, x: str, conv: FoldedConv, name: str, size: tuple[int, int]) -> tuple[str, tuple[int, int]]:
        """Append a folded conv (and its ReLU6) applied to ``x`` of spatial ``size``; returns the output
        and its spatial size."""
        k, s = conv.kernel, conv.stride
        (top, bottom), (left, right) = (same_padding(side, k, s) for side in size)
        out = self.node(
            "Conv",
            [x, self.constant(f"{name}.weight", conv.weight), self.constant(f"{name}.bias", conv.bias)],
            name,
            kernel_shape=[k, k],
            strides=[s, s],
            pads=[top, left, bottom, right],
            group=conv.groups,
        )
        if conv.relu6:
            out = self.node("Clip", [out, "zero", "six"], f"{name}.relu6")
        return out, (-(-size[0] // s), -(-size[1] // s))


def build_backbone_graph(
    weights: dict[str, np.ndarray],
    input_height: int,
    input_width: int,
    network_size: tuple[int, int] = (224, 224),
    stages: tuple[int, ...] = (2, 4),
) -> onnx.ModelProto:
    """Build the feature-extractor graph for ``input_height`` x ``input_width`` RGB images.

    ``weights`` is an EfficientNet-Lite0 state dict (:func:`trainer.weights.load_pretrained_weights`).
    The image is resized to ``network_size`` (height, width; multiples of 32) before the network runs;
    choose it with the aspect ratio of the images in mind. ``stages`` selects which of the seven stages'
    outputs to return (0-based; output strides 2, 4, 8, 16, 16, 32, 32). The default, stages 2 and 4, are
    the last stride-8 (40 channels) and stride-16 (112 channels) stages: the mid-level features PatchCore
    uses. The graph stops after the last requested stage.
    """
    check_config(network_size, stages)
    if input_height <= 0 or input_width <= 0:
        raise ValueError(f"input size must be positive, got {input_height}x{input_width}")
    backbone = fold_backbone(weights, last_stage=stages[-1])

    g = _GraphBuilder()
    g.constant("zero", np.array(0.0, np.float32))
    g.constant("six", np.array(6.0, np.float32))
    x = g.node("Cast", [INPUT_NAME], "image_float", to=TensorProto.FLOAT)
    x = g.node("Unsqueeze", [x], "image_nhwc", axes=[0])
    x = g.node("Transpose", [x], "image_nchw", perm=[0, 3, 1, 2])
    if (input_height, input_width) != network_size:
        # "asymmetric" is the one coordinate mode every TensorRT version takes; opset 11 wants
        # roi and scales present, and empty when sizes are given.
        empty = g.constant("empty", np.zeros(0, np.float32))
        sizes = g.constant("network_size", np.array([1, 3, *network_size], np.int64))
        x = g.node(
            "Resize",
            [x, empty, empty, sizes],
            "image_resized",
            mode="linear",
            coordinate_transformation_mode="asymmetric",
        )
    x = g.node("Sub", [x, g.constant("input_mean", np.array(INPUT_MEAN, np.float32))], "image_centred")
    x = g.node("Div", [x, g.constant("input_std", np.array(INPUT_STD, np.float32))], "image_scaled")

    x, size = g.conv(x, backbone.stem, "stem", network_size)
    outputs = []
    for index, stage in enumerate(backbone.stages):
        for number, block in enumerate(stage):
            y = x
            for part, conv in block.convs:
                y, size = g.conv(y, conv, f"stage{index}.block{number}.{part}", size)
            x = g.node("Add", [x, y], f"stage{index}.block{number}.residual") if block.residual else y
        if index in stages:
            x = g.rename_last_output(feature_name(index))
            shape = [1, STAGES[index].out_channels, *size]
            outputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, shape))

    graph = helper.make_graph(
        g.nodes,
        "efficientnet_lite0_features",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [input_height, input_width, 3])],
        outputs,
        initializer=g.initializers,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="lookout-edge trainer",
        doc_string="EfficientNet-Lite0 (ImageNet-pretrained) feature extractor; input uint8 [H, W, 3] RGB.",
    )
