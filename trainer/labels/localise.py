"""Object localisation on the frozen backbone: a dense box head fitted in numpy in seconds.

The graph (one static ONNX graph, the `box_scores` / `boxes` contract of lookout_edge/custom_labels.py):

    image uint8 [H, W, 3]
      -> EfficientNet-Lite0 stages 2 (stride 8), 4 (stride 16) and 6 (stride 32)
      -> one feature vector per stride-16 cell: stage 4, its 3x3 mean (context), stage 2 averaged
         over the cell's 2x2 stride-8 positions (detail), stage 6 repeated onto the cell (the
         part around it)                                                         -> cells [1, C, h, w]
      -> 1x1 conv, sigmoid: a probability per label that the cell is the centre of a box of it
      -> 1x1 conv, exp: the distances from the cell's centre to the box's four sides, in cells
      -> the cell's box as (left, top, right, bottom) fractions; each box is replaced by the
         score-weighted mean of the boxes of its 3x3 neighbourhood (box voting)
      -> box_scores [h*w, L], boxes [h*w, 4] as (left, top, width, height)

Why this shape: with tens of images a linear head on frozen features is what generalises and
what fits in seconds, and a CenterNet/FCOS-like dense head needs nothing but convolutions, so it
stays inside TensorRT's parser with static shapes; suppression of duplicates is `decode`'s NMS.
The score head is a logistic regression on soft, Gaussian "box centre" targets (CenterNet), with
the positives up-weighted since boxes cover a few cells of hundreds; the distances are a ridge
regression of log distances on the cells of each box's central half (FCOS-style targets, log space
so that errors are relative). Box voting averages the regression errors of neighbouring cells,
which are largely independent. Measured on the cookies (cracks, 10 seeded 80/20 splits, AP at
IoU 0.5): no voting 0.34, voting 0.46, then ridge 10 -> 300 and centre spread 0.3 -> 0.5: 0.57.
Rejected: a 5x5 vote (0.39), distances learnt on the whole box (0.14), flipped copies of the
training images (0.38), stage-6 context (0.43), a numpy MLP score head (too slow for the budget);
dropping stage 6 cost about 0.02-0.03, within the splits' noise, and is kept for larger parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from lookout_edge.contract import INPUT_NAME
from lookout_edge.custom_labels import BOX_SCORES_OUTPUT, BOXES_OUTPUT, fit_image
from lookout_edge.trainer.architecture import NETWORK_STRIDE, STAGES, feature_name, stage_stride
from lookout_edge.trainer.backbone import build_backbone_graph
from lookout_edge.trainer.export import GraphNodes
from lookout_edge.trainer.labels.dataset import Box

DETAIL_STAGE, CELL_STAGE, CONTEXT_STAGE = 2, 4, 6
CELL_STRIDE = stage_stride(CELL_STAGE)  # 16
CELL_FEATURES = "cell_features"
CELL_GRID = "cell_grid"
CONTEXT = 3  # the cell's neighbourhood averaged into its features
VOTE = 3  # the neighbourhood whose boxes a cell's box averages

CENTRE_SIGMA = 0.5  # the Gaussian centre target's spread, in half box sizes
REGRESSION_REGION = 0.5  # cells within this many half box sizes of the centre learn the distances
MIN_DISTANCE = 0.25  # cells: a centre closer to a side than this is treated as this close
POSITIVE_SHARE = 0.25  # the centre cells' weight relative to all the others' together
L2 = 1e-3
STEPS = 300
LEARNING_RATE = 0.01
RIDGE = 300.0  # strong: distances learnt from a few hundred cells of a few dozen boxes
MAX_LOG_DISTANCE = 6.0  # exp(6) = 403 cells: keeps a wild input from overflowing


Fractions = tuple[str, float, float, float, float]  # label, left, top, width, height of the image


@dataclass(frozen=True)
class CellGrid:
    rows: int
    cols: int

    @classmethod
    def for_size(cls, size: tuple[int, int]) -> CellGrid:
        height, width = size
        if height % NETWORK_STRIDE or width % NETWORK_STRIDE or height <= 0 or width <= 0:
            raise ValueError(f"the graph's input size must be positive multiples of {NETWORK_STRIDE}: {size}")
        return cls(height // CELL_STRIDE, width // CELL_STRIDE)

    @property
    def cells(self) -> int:
        return self.rows * self.cols

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Each cell's centre (x, y) as fractions of the image, row-major [cells] each."""
        ys, xs = np.meshgrid(
            (np.arange(self.rows) + 0.5) / self.rows, (np.arange(self.cols) + 0.5) / self.cols, indexing="ij"
        )
        return xs.reshape(-1), ys.reshape(-1)


@dataclass(frozen=True)
class BoxHead:
    """score logits = ((x - mean) / sd) @ score_weight + score_bias; log distances likewise."""

    mean: np.ndarray  # [C]
    sd: np.ndarray  # [C]
    score_weight: np.ndarray  # [C, L]
    score_bias: np.ndarray  # [L]
    distance_weight: np.ndarray  # [C, 4] left, top, right, bottom
    distance_bias: np.ndarray  # [4]


def cell_channels() -> int:
    return sum(STAGES[stage].out_channels for stage in (CELL_STAGE, CELL_STAGE, DETAIL_STAGE, CONTEXT_STAGE))


class _Nodes(GraphNodes):
    def mean_pool(self, x: str, kernel: int, output: str) -> str:
        """Mean over a kernel x kernel neighbourhood at stride 1, borders averaging what is inside."""
        pad = kernel // 2
        return self.add(
            "AveragePool",
            [x],
            output,
            kernel_shape=[kernel, kernel],
            strides=[1, 1],
            pads=[pad, pad, pad, pad],
            count_include_pad=0,
        )

    def flatten_cells(self, x: str, channels: int, grid: CellGrid, output: str) -> str:
        """[1, K, rows, cols] -> [cells, K]: one row per cell, row-major like CellGrid.centres."""
        shape = self.constant(f"{output}.shape", np.array([channels, grid.cells], np.int64))
        return self.add("Transpose", [self.add("Reshape", [x, shape], f"{output}.rows")], output, perm=[1, 0])


def _repeat_matrix(cells: int, factor: int) -> np.ndarray:
    """[cells, cells // factor] 0/1 matrix: left-multiplying repeats each row `factor` times."""
    return np.kron(np.eye(cells // factor, dtype=np.float32), np.ones((factor, 1), np.float32))


def build_cell_graph(weights: dict[str, np.ndarray], size: tuple[int, int]) -> onnx.ModelProto:
    """The backbone and the cell features: input `image` uint8 [H, W, 3], output `cell_features`
    [cells, C]; the exported graph appends the head to the same nodes (`cell_grid`), so training and
    serving compute the features one way."""
    grid = CellGrid.for_size(size)
    model = build_backbone_graph(weights, *size, size, stages=(DETAIL_STAGE, CELL_STAGE, CONTEXT_STAGE))
    n = _Nodes(model.graph)
    cell = feature_name(CELL_STAGE)
    detail = n.add(
        "AveragePool", [feature_name(DETAIL_STAGE)], "detail_cells", kernel_shape=[2, 2], strides=[2, 2]
    )
    factor = stage_stride(CONTEXT_STAGE) // CELL_STRIDE
    rows = n.constant("context_repeat_rows", _repeat_matrix(grid.rows, factor))
    cols = n.constant("context_repeat_cols", _repeat_matrix(grid.cols, factor).T.copy())
    tall = n.add("MatMul", [rows, feature_name(CONTEXT_STAGE)], "context_rows")
    context = n.add("MatMul", [tall, cols], "context_cells")
    parts = [cell, n.mean_pool(cell, CONTEXT, "cell_neighbourhood"), detail, context]
    n.add("Concat", parts, CELL_GRID, axis=1)
    n.flatten_cells(CELL_GRID, cell_channels(), grid, CELL_FEATURES)
    del model.graph.output[:]
    model.graph.output.append(
        helper.make_tensor_value_info(CELL_FEATURES, TensorProto.FLOAT, [grid.cells, cell_channels()])
    )
    return model


def cell_targets(
    boxes: Sequence[Fractions], labels: tuple[str, ...], grid: CellGrid
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training targets of one image: centre scores [cells, L] in 0..1, log distances [cells, 4]
    and which cells learn distances [cells] bool.

    A box's score target is a Gaussian of the offset from its centre measured in half box sizes, so
    that big and small boxes light up alike, and the cell holding the centre is always 1. Where the
    central regions of two boxes overlap, the smaller box's distances win (FCOS's rule).
    """
    xs, ys = grid.centres()
    scores = np.zeros((grid.cells, len(labels)), np.float32)
    distances = np.zeros((grid.cells, 4), np.float32)
    learns = np.zeros(grid.cells, bool)
    smallest = np.full(grid.cells, np.inf)
    for label, left, top, width, height in boxes:
        dx = (xs - (left + width / 2)) / max(width / 2, 1e-6)
        dy = (ys - (top + height / 2)) / max(height / 2, 1e-6)
        target = np.exp(-(dx**2 + dy**2) / (2 * CENTRE_SIGMA**2))
        centre = int(np.argmin(dx**2 * width**2 + dy**2 * height**2))
        target[centre] = 1.0
        column = labels.index(label)
        scores[:, column] = np.maximum(scores[:, column], target)
        region = (np.abs(dx) <= REGRESSION_REGION) & (np.abs(dy) <= REGRESSION_REGION)
        region[centre] = True
        region &= width * height < smallest
        sides = np.stack(
            [
                (xs - left) * grid.cols,
                (ys - top) * grid.rows,
                (left + width - xs) * grid.cols,
                (top + height - ys) * grid.rows,
            ],
            axis=1,
        )
        distances[region] = np.log(np.maximum(sides[region], MIN_DISTANCE))
        learns |= region
        smallest[region] = width * height
    return scores, distances, learns


def fit_scores(x: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-label logistic regression on soft targets, full-batch Adam with L2.

    The cells near a centre (target > 0.5) are a percent or two of all cells; weighting them to
    POSITIVE_SHARE of the rest keeps the fit from settling on "nothing anywhere".
    """
    count, dims = x.shape
    positive = targets > 0.5
    positives = positive.sum(axis=0)
    up = np.where(positives > 0, POSITIVE_SHARE * count / np.maximum(positives, 1), 1.0).astype(np.float32)
    sample_weight = np.where(positive, up, np.float32(1.0))
    sample_weight /= sample_weight.mean(axis=0, keepdims=True)
    params = [np.zeros((dims, targets.shape[1]), np.float32), np.zeros(targets.shape[1], np.float32)]
    moments = [np.zeros_like(param) for param in params]
    squares = [np.zeros_like(param) for param in params]
    for step in range(1, STEPS + 1):
        probability = 1.0 / (1.0 + np.exp(-(x @ params[0] + params[1])))
        error = (probability - targets) * sample_weight / count
        grads = [x.T @ error + L2 * params[0], error.sum(axis=0)]
        for param, grad, moment, square in zip(params, grads, moments, squares, strict=True):
            moment += 0.1 * (grad - moment)
            square += 0.001 * (grad * grad - square)
            param -= LEARNING_RATE * (moment / (1 - 0.9**step)) / (np.sqrt(square / (1 - 0.999**step)) + 1e-8)
    return params[0], params[1]


def fit_distances(x: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression of the log distances (closed form: C is a few hundred)."""
    mean = targets.mean(axis=0)
    gram = x.T.astype(np.float64) @ x + RIDGE * np.eye(x.shape[1])
    weight = np.linalg.solve(gram, x.T.astype(np.float64) @ (targets - mean))
    return weight.astype(np.float32), (mean - x.mean(axis=0) @ weight).astype(np.float32)


def _fractions(box: Box, width: int, height: int) -> Fractions:
    return (box.label, box.left / width, box.top / height, box.width / width, box.height / height)


def fit_head(
    features: Sequence[np.ndarray],
    boxes: Sequence[Sequence[Fractions]],
    labels: tuple[str, ...],
    grid: CellGrid,
) -> BoxHead:
    """Fit both regressions on the cells of all training images, features standardised."""
    targets = [cell_targets(image_boxes, labels, grid) for image_boxes in boxes]
    x = np.concatenate(features).astype(np.float32)
    mean = x.mean(axis=0)
    sd = x.std(axis=0) + np.float32(1e-3)
    x = (x - mean) / sd
    score_weight, score_bias = fit_scores(x, np.concatenate([target[0] for target in targets]))
    learns = np.concatenate([target[2] for target in targets])
    if not learns.any():
        raise ValueError("localisation needs at least one training image with a box")
    distances = np.concatenate([target[1] for target in targets])[learns]
    distance_weight, distance_bias = fit_distances(x[learns], distances)
    return BoxHead(mean, sd, score_weight, score_bias, distance_weight, distance_bias)


def _conv_1x1(n: _Nodes, x: str, head: BoxHead, weight: np.ndarray, bias: np.ndarray, name: str) -> str:
    """A 1x1 conv computing ((x - mean) / sd) @ weight + bias at every cell: standardisation folded."""
    folded = (weight / head.sd[:, None]).astype(np.float32)
    offset = (bias - (head.mean / head.sd) @ weight).astype(np.float32)
    kernel = n.constant(f"{name}.weight", folded.T.copy()[:, :, None, None])
    return n.add("Conv", [x, kernel, n.constant(f"{name}.bias", offset)], name, kernel_shape=[1, 1])


def _cell_sides(n: _Nodes, head: BoxHead, grid: CellGrid) -> str:
    """Each cell's regressed box as (left, top, right, bottom) fractions, [1, 4, rows, cols]."""
    logs = _conv_1x1(n, CELL_GRID, head, head.distance_weight, head.distance_bias, "log_distances")
    bounds = [
        n.constant("log_distance_min", np.array(np.log(MIN_DISTANCE), np.float32)),
        n.constant("log_distance_max", np.array(MAX_LOG_DISTANCE, np.float32)),
    ]
    distances = n.add("Exp", [n.add("Clip", [logs, *bounds], "log_distances_clipped")], "distances")
    xs, ys = grid.centres()
    centres = np.stack([xs, ys, xs, ys]).reshape(1, 4, grid.rows, grid.cols).astype(np.float32)
    signs = np.array([-1 / grid.cols, -1 / grid.rows, 1 / grid.cols, 1 / grid.rows], np.float32)
    offsets = n.add(
        "Mul", [distances, n.constant("distance_to_fraction", signs.reshape(1, 4, 1, 1))], "side_offsets"
    )
    return n.add("Add", [offsets, n.constant("cell_centres", centres)], "cell_sides")


def _vote(n: _Nodes, sides: str, scores: str) -> str:
    """Box voting: each cell's sides become the mean of its neighbourhood's, weighted by how sure
    each neighbour is that it holds a box centre (of any label)."""
    weight = n.add("ReduceMax", [scores], "vote_weight", axes=[1], keepdims=1)
    weighted = n.mean_pool(n.add("Mul", [sides, weight], "weighted_sides"), VOTE, "weighted_sides_mean")
    epsilon = n.constant("vote_epsilon", np.array(1e-9, np.float32))
    total = n.add("Add", [n.mean_pool(weight, VOTE, "vote_weight_mean"), epsilon], "vote_weight_total")
    return n.add("Div", [weighted, total], "voted_sides")


def _append_head(model: onnx.ModelProto, head: BoxHead, grid: CellGrid) -> None:
    """Replace the cell-feature output with the contract's `box_scores` and `boxes`."""
    n = _Nodes(model.graph)
    labels = head.score_bias.shape[0]
    logits = _conv_1x1(n, CELL_GRID, head, head.score_weight, head.score_bias, "score_logits")
    scores = n.add("Sigmoid", [logits], "cell_scores")
    corners = n.flatten_cells(_vote(n, _cell_sides(n, head, grid), scores), 4, grid, "voted_box_sides")
    to_extent = np.array([[1, 0, -1, 0], [0, 1, 0, -1], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
    n.add("MatMul", [corners, n.constant("sides_to_extent", to_extent)], BOXES_OUTPUT)
    n.flatten_cells(scores, labels, grid, BOX_SCORES_OUTPUT)
    del model.graph.output[:]
    model.graph.output.extend(
        [
            helper.make_tensor_value_info(BOX_SCORES_OUTPUT, TensorProto.FLOAT, [grid.cells, labels]),
            helper.make_tensor_value_info(BOXES_OUTPUT, TensorProto.FLOAT, [grid.cells, 4]),
        ]
    )
    model.graph.name = "lookout_edge_box_head"


def train_localiser(
    samples: Sequence[tuple[np.ndarray, Sequence[Box]]],
    labels: tuple[str, ...],
    size: tuple[int, int],
    weights: dict[str, np.ndarray],
) -> onnx.ModelProto:
    """Fit the box head on `samples` (RGB uint8 images at any size, their boxes in their pixels; an
    image without boxes is a negative) and return the whole graph for input `size` (height, width).

    Images are squashed to `size` as the runtime does (custom_labels.fit_image), so a box keeps its
    fractions. `size` should keep the data's aspect ratio and make the smallest box at least a cell
    (16 pixels) across; a short side of 320 does for boxes down to 5% of the image.
    """
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique and at least one: {labels}")
    unknown = {box.label for _, boxes in samples for box in boxes} - set(labels)
    if unknown:
        raise ValueError(f"boxes with labels not in {labels}: {sorted(unknown)}")
    grid = CellGrid.for_size(size)
    model = build_cell_graph(weights, size)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    features = []
    fractions = []
    for image, boxes in samples:
        height, width = image.shape[:2]
        fractions.append([_fractions(box, width, height) for box in boxes])
        fitted = np.ascontiguousarray(fit_image(image, size[1], size[0]))
        (cells,) = session.run([CELL_FEATURES], {INPUT_NAME: fitted})
        features.append(np.asarray(cells))
    _append_head(model, fit_head(features, fractions, labels, grid), grid)
    onnx.checker.check_model(model, full_check=True)
    return model
