"""The trained model as one static-shape ONNX graph, in the agent's graph contract.

    image uint8 [H, W, 3]
      -> patch features [C, P]                                    (trainer/features.py)
      -> nearest-bank distance: ReduceMin(MatMul(-2 M, F) + |m|^2) + |f|^2, Sqrt
      -> blurred grid map -> per-position A * map + B (trainer/normalise.py)
      -> max -> logistic calibration                              -> anomaly_score
      -> normalised grid map resized to [H, W]                    -> anomaly_map
      -> segmentation: softmax regression per patch, label logits relative to the
         background's resized to [H, W], P(anomaly) >= pixel threshold, likeliest label
                                                                  -> label_map, anomaly_map

The per-position normalisation scales the border classes that the training normals show to be
noisier than the interior down to its level; everything downstream (score, map, segmentation
head) sees the normalised map. With an inspection region (trainer/region.py) the score is the
maximum of the normalised grid map weighted by each patch's fraction inside the region, and both
maps are 0 outside it.

The names and types are the graph contract of lookout_edge.contract. The label map is not
gated by the image verdict here: whoever serves the graph applies the contract's verdict rule
with the manifest's threshold, so that a changed threshold moves verdict and mask together.
Only operators TensorRT's ONNX parser takes are used, and no shape is dynamic.
`reference_outputs` computes the same outputs with the numpy functions of
trainer/patchcore.py and trainer/segmentation.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lookout_edge.contract import (
    ANOMALY_MAP_OUTPUT,
    LABEL_MAP_OUTPUT,
    SCORE_OUTPUT,
    check_graph_io,
    onnx_graph_io,
)
from lookout_edge.trainer.features import FEATURES_OUTPUT, FeatureLayout, append_resize, build_feature_graph
from lookout_edge.trainer.normalise import MapNormalisation
from lookout_edge.trainer.patchcore import (
    anomaly_grid,
    blur_kernel,
    blur_normaliser,
    calibrated_score,
)
from lookout_edge.trainer.reference import resize_bilinear
from lookout_edge.trainer.region import Region, mask_pixel_maps, region_raw_score
from lookout_edge.trainer.segmentation import SegmentationHead


@dataclass(frozen=True)
class TrainedModel:
    layout: FeatureLayout
    bank: np.ndarray  # [M, C] float32
    centre: float  # raw score at the threshold
    scale: float  # raw-score units per logistic unit
    head: SegmentationHead | None = None
    region: Region | None = None  # where the model looks (trainer/region.py)
    # Per-position map normalisation (trainer/normalise.py); None scores the blurred map as it is,
    # for models assembled by hand (tests, benchmarks). Training always measures one.
    normalisation: MapNormalisation | None = None

    def normalised(self, grid_map: np.ndarray) -> np.ndarray:
        """What the graph scores and paints, from a blurred map of `anomaly_grid`."""
        return grid_map if self.normalisation is None else self.normalisation.apply(grid_map)

    def raw_scores(self, grid_maps: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """[n] float64 raw image scores of blurred maps: the region's maximum of each normalised map."""
        return np.array([region_raw_score(self.region, self.normalised(m)) for m in grid_maps], np.float64)


class GraphNodes:
    """Appends nodes and constants to a graph, each node named after its output."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph

    def constant(self, name: str, value: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def add(self, op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        self.graph.node.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output


def build_model_graph(weights: dict[str, np.ndarray], model: TrainedModel) -> onnx.ModelProto:
    layout = model.layout
    onnx_model = build_feature_graph(weights, layout)
    graph = onnx_model.graph
    n = GraphNodes(graph)
    rows, cols = layout.grid
    height, width = layout.image_height, layout.image_width
    bank = model.bank.astype(np.float32)

    features = FEATURES_OUTPUT
    squared = n.add("Mul", [features, features], "patch_squared")
    patch_sq = n.add("ReduceSum", [squared], "patch_sq", axes=[0], keepdims=1)
    products = n.add("MatMul", [n.constant("bank_times_minus2", bank * -2.0), features], "bank_products")
    bank_sq = np.einsum("mc,mc->m", bank, bank)[:, None].astype(np.float32)
    partial = n.add("Add", [products, n.constant("bank_sq", bank_sq)], "partial_distances")
    nearest = n.add("ReduceMin", [partial], "nearest_partial", axes=[0], keepdims=1)
    squared_distance = n.add("Add", [nearest, patch_sq], "nearest_squared")
    distance = n.add(
        "Sqrt", [n.add("Relu", [squared_distance], "nearest_squared_clamped")], "nearest_distance"
    )
    grid = n.add(
        "Reshape",
        [distance, n.constant("grid_shape", np.array([1, 1, rows, cols], np.int64))],
        "distance_grid",
    )
    kernel = blur_kernel()
    blurred = n.add(
        "Conv", [grid, n.constant("blur_kernel", kernel[None, None])], "blurred_raw", pads=[1, 1, 1, 1]
    )
    normaliser = blur_normaliser(layout.grid, kernel)[None, None].astype(np.float32)
    grid_map = n.add("Mul", [blurred, n.constant("blur_normaliser", normaliser)], "anomaly_grid")
    if model.normalisation is not None:
        gain = n.constant("normalisation_gain", model.normalisation.gain[None, None].astype(np.float32))
        offset_grid = model.normalisation.offset[None, None].astype(np.float32)
        scaled = n.add("Mul", [grid_map, gain], "anomaly_grid_scaled")
        grid_map = n.add("Add", [scaled, n.constant("normalisation_offset", offset_grid)], "normalised_grid")
    raw = n.add("ReduceMax", [_region_score_grid(n, model, grid_map)], "raw_score", keepdims=0)
    inverse_scale = n.constant("inverse_scale", np.array(1.0 / model.scale, np.float32))
    offset = n.constant("offset", np.array(-model.centre / model.scale, np.float32))
    logit = n.add("Add", [n.add("Mul", [raw, inverse_scale], "raw_scaled"), offset], "score_logit")
    # The sigmoid maps the raw threshold (`centre`) to 0.5, the contract's DEFAULT_THRESHOLD.
    n.add("Sigmoid", [logit], SCORE_OUTPUT)
    image_shape = n.constant("image_map_shape", np.array([height, width], np.int64))
    outputs = [helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, [])]

    if model.head is None:
        resized = append_resize(graph, grid_map, layout.grid, (height, width))
        n.add("Reshape", [resized, image_shape], ANOMALY_MAP_OUTPUT)
    else:
        _segmentation_nodes(n, model, grid_map, image_shape)
        outputs.append(helper.make_tensor_value_info(LABEL_MAP_OUTPUT, TensorProto.UINT8, [height, width]))
    outputs.append(helper.make_tensor_value_info(ANOMALY_MAP_OUTPUT, TensorProto.FLOAT, [height, width]))
    _region_outputs(n, model)
    del graph.output[:]
    graph.output.extend(outputs)
    graph.name = "lookout_edge_patchcore"
    onnx.checker.check_model(onnx_model, full_check=True)
    check_graph_io(*onnx_graph_io(onnx_model), width, height, model.head is not None, "the exported graph")
    return onnx_model


def _region_score_grid(n: GraphNodes, model: TrainedModel, grid_map: str) -> str:
    """The grid map the image score is taken from: without a region the map itself, with one
    each patch's value times the fraction of it inside the region (trainer/region.py)."""
    if model.region is None:
        return grid_map
    weights = model.region.patch_weights(model.layout.grid)[None, None]
    return n.add("Mul", [grid_map, n.constant("region_patch_weights", weights)], "region_score_grid")


def _region_outputs(n: GraphNodes, model: TrainedModel) -> None:
    """Set `anomaly_map` and `label_map` to 0 outside the region, whatever nodes made them.

    The region is a bool [H, W] initializer (one byte a pixel; TensorRT takes bool, not uint8).
    The label map is masked while still int64, before its final Cast to uint8, which the
    TensorRT variant retargets (agent/backends/trt_graph.py).
    """
    if model.region is None:
        return
    graph = n.graph
    inside = n.constant("region_pixels", model.region.pixels.astype(np.bool_))
    producer = {output: node for node in graph.node for output in node.output}
    unmasked = producer[ANOMALY_MAP_OUTPUT]
    unmasked.output[0] = unmasked.name = "anomaly_map_unmasked"
    zero = n.constant("region_zero_anomaly", np.array(0.0, np.float32))
    n.add("Where", [inside, "anomaly_map_unmasked", zero], ANOMALY_MAP_OUTPUT)
    cast = producer.get(LABEL_MAP_OUTPUT)
    if cast is None:
        return
    assert cast.op_type == "Cast", "the label map ends with its Cast to uint8"
    moved = onnx.NodeProto()
    moved.CopyFrom(cast)
    graph.node.remove(cast)  # appended again below, after the Where that now feeds it
    zero_label = n.constant("region_zero_label", np.array(0, np.int64))
    moved.input[0] = n.add("Where", [inside, moved.input[0], zero_label], "label_map_in_region")
    graph.node.append(moved)


def _segmentation_nodes(n: GraphNodes, model: TrainedModel, grid_map: str, image_shape: str) -> None:
    head = model.head
    assert head is not None
    layout = model.layout
    labels = head.weight.shape[0] - 1
    height, width = layout.image_height, layout.image_width
    distances = n.add(
        "Reshape",
        [grid_map, n.constant("distance_row_shape", np.array([1, layout.patches], np.int64))],
        "distance_row",
    )
    inputs = n.add("Concat", [FEATURES_OUTPUT, distances], "head_inputs", axis=0)
    weight = n.constant("head_relative_weight", head.relative_weight)
    bias = n.constant("head_relative_bias", head.relative_bias[:, None])
    relative = n.add("Add", [n.add("MatMul", [weight, inputs], "head_products"), bias], "relative_logits")
    grid_shape = n.constant("logit_grid_shape", np.array([1, labels, *layout.grid], np.int64))
    grid_logits = n.add("Reshape", [relative, grid_shape], "relative_logit_grid")
    pixel_logits = append_resize(n.graph, grid_logits, layout.grid, (height, width))
    if labels == 1:
        log_sum = pixel_logits
        label = n.constant("only_label", np.array(1, np.int64))
    else:
        log_sum = n.add("ReduceLogSumExp", [pixel_logits], "pixel_log_sum", axes=[1], keepdims=1)
        best = n.add("ArgMax", [pixel_logits], "best_label_index", axis=1, keepdims=1)
        label = n.add("Add", [best, n.constant("label_offset", np.array(1, np.int64))], "best_label")
    anomaly = n.add("Sigmoid", [log_sum], "anomaly_probability")
    n.add("Reshape", [anomaly, image_shape], ANOMALY_MAP_OUTPUT)
    pixel_threshold = n.constant("pixel_threshold", np.array(head.pixel_threshold, np.float32))
    below = n.add("Less", [anomaly, pixel_threshold], "below_pixel_threshold")
    # Labels stay int64 until the last node: TensorRT has no uint8 tensors inside a graph.
    zero = n.constant("zero_label", np.array(0, np.int64))
    pixel_label = n.add("Where", [below, zero, label], "pixel_label")
    flat = n.add("Reshape", [pixel_label, image_shape], "label_map_int")
    n.add("Cast", [flat], LABEL_MAP_OUTPUT, to=TensorProto.UINT8)


def reference_outputs(model: TrainedModel, patches: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's outputs computed in numpy from the image's patch features [C, P]."""
    layout = model.layout
    size = (layout.image_height, layout.image_width)
    grid_map = model.normalised(anomaly_grid(patches, model.bank, layout.grid))
    score = float(calibrated_score(region_raw_score(model.region, grid_map), model.centre, model.scale))
    outputs = {SCORE_OUTPUT: np.array(score)}
    if model.head is None:
        resized = resize_bilinear(grid_map[None].astype(np.float64), *size)[0]
        outputs[ANOMALY_MAP_OUTPUT] = resized if model.region is None else resized * model.region.pixels
        return outputs
    anomaly, label = mask_pixel_maps(
        model.region, model.head.pixel_maps(patches, grid_map.reshape(-1), layout.grid, size)
    )
    outputs[ANOMALY_MAP_OUTPUT] = anomaly
    outputs[LABEL_MAP_OUTPUT] = model.head.label_map(anomaly, label)
    return outputs
