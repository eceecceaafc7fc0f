"""Patch features for PatchCore: mid-level backbone features with 3x3 neighbourhood aggregation.

The graph extends the backbone (trainer/backbone.py): each selected stage's feature map is
averaged over its 3x3 neighbourhood (Roth et al. 2022, "locally aware patch features"), the
coarser map is resized to the finer grid, and both are concatenated and flattened to a
``[C, P]`` matrix: one column per patch. The same nodes feed training (through ONNX Runtime)
and the exported model, so features are computed one way only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lookout_edge.contract import INPUT_NAME
from lookout_edge.trainer.architecture import NETWORK_STRIDE, STAGES, feature_name, stage_stride
from lookout_edge.trainer.backbone import build_backbone_graph
from lookout_edge.trainer.interpolation import bilinear_matrix

FEATURE_STAGES = (2, 4)
FEATURES_OUTPUT = "patch_features"


@dataclass(frozen=True)
class FeatureLayout:
    """Where patches come from: the network input size and the patch grid."""

    image_height: int
    image_width: int
    network_size: tuple[int, int]
    grid: tuple[int, int]  # patch rows, columns (stride 8 of the network input)
    channels: int

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]


def network_size_for(height: int, width: int, short_side: int = 256) -> tuple[int, int]:
    """The network input size: the short side at `short_side`, the aspect ratio kept, multiples of 32."""
    scale = short_side / min(height, width)

    def round_side(side: float) -> int:
        return max(NETWORK_STRIDE, round(side / NETWORK_STRIDE) * NETWORK_STRIDE)

    return round_side(height * scale), round_side(width * scale)


def layout_for(height: int, width: int, short_side: int = 256) -> FeatureLayout:
    network = network_size_for(height, width, short_side)
    stride = stage_stride(FEATURE_STAGES[0])
    grid = (-(-network[0] // stride), -(-network[1] // stride))
    channels = sum(STAGES[stage].out_channels for stage in FEATURE_STAGES)
    return FeatureLayout(height, width, network, grid, channels)


def _constant(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def build_feature_graph(weights: dict[str, np.ndarray], layout: FeatureLayout) -> onnx.ModelProto:
    """The backbone plus aggregation: input `image` uint8 [H, W, 3], output `patch_features` [C, P]."""
    model = build_backbone_graph(
        weights, layout.image_height, layout.image_width, layout.network_size, stages=FEATURE_STAGES
    )
    graph = model.graph
    aggregated = []
    for stage in FEATURE_STAGES:
        pooled = f"{feature_name(stage)}.aggregated"
        graph.node.append(
            helper.make_node(
                "AveragePool",
                [feature_name(stage)],
                [pooled],
                name=pooled,
                kernel_shape=[3, 3],
                strides=[1, 1],
                pads=[1, 1, 1, 1],
                count_include_pad=0,
            )
        )
        aggregated.append(pooled)
    # The coarser stages are brought onto the finest grid.
    for index in range(1, len(aggregated)):
        aggregated[index] = append_resize(
            graph, aggregated[index], stage_grid(layout, FEATURE_STAGES[index]), layout.grid
        )
    graph.node.append(helper.make_node("Concat", aggregated, ["patch_grid"], name="patch_grid", axis=1))
    shape = _constant(graph, "patch_matrix_shape", np.array([layout.channels, layout.patches], np.int64))
    graph.node.append(
        helper.make_node("Reshape", ["patch_grid", shape], [FEATURES_OUTPUT], name=FEATURES_OUTPUT)
    )
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info(FEATURES_OUTPUT, TensorProto.FLOAT, [layout.channels, layout.patches])
    )
    return model


def stage_grid(layout: FeatureLayout, stage: int) -> tuple[int, int]:
    stride = stage_stride(stage)
    return -(-layout.network_size[0] // stride), -(-layout.network_size[1] // stride)


def append_resize(graph: onnx.GraphProto, x: str, size_in: tuple[int, int], size_out: tuple[int, int]) -> str:
    """Append nodes resizing `x` [..., h, w] to [..., H, W], bilinear with half-pixel centres."""
    rows = _constant(graph, f"{x}.resize_rows", bilinear_matrix(size_in[0], size_out[0]))
    columns = _constant(graph, f"{x}.resize_columns", bilinear_matrix(size_in[1], size_out[1]).T.copy())
    tall = f"{x}.resized_rows"
    graph.node.append(helper.make_node("MatMul", [rows, x], [tall], name=tall))
    resized = f"{x}.resized"
    graph.node.append(helper.make_node("MatMul", [tall, columns], [resized], name=resized))
    return resized


class FeatureExtractor:
    """Runs the feature graph on training images with ONNX Runtime."""

    def __init__(self, weights: dict[str, np.ndarray], layout: FeatureLayout) -> None:
        self.layout = layout
        model = build_feature_graph(weights, layout)
        self._session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """[C, P] float32 patch features of one [H, W, 3] uint8 image."""
        (features,) = self._session.run([FEATURES_OUTPUT], {INPUT_NAME: image})
        return np.asarray(features)
