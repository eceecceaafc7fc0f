"""Image classification heads on the frozen backbone: one label per image, or several.

The graph (one static ONNX graph, the contract of lookout_edge/custom_labels.py):

    image uint8 [H, W, 3]
      -> EfficientNet-Lite0 stages 4 (stride 16, 112 channels) and 6 (stride 32, 320 channels)
      -> per stage: global average and global max over the map            -> pooled [864]
      -> standardised with the training images' mean and sd, linear layer -> logits [L]
      -> softmax (one label per image) or a sigmoid per label (multi-label) -> label_scores

Average pooling describes the whole part; max pooling keeps a small defect that the average
would dilute. The head is a multinomial (or per-label binary) logistic regression fitted in
numpy with L2 regularisation, its strength chosen by cross-validated log-loss on the training
images: with tens of images per label a linear head on frozen features is what generalises,
and it fits in well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lookout_edge.contract import INPUT_NAME
from lookout_edge.custom_labels import LABEL_SCORES_OUTPUT
from lookout_edge.trainer.architecture import STAGES, feature_name
from lookout_edge.trainer.backbone import build_backbone_graph

POOLED_STAGES = (4, 6)
POOLED_OUTPUT = "pooled_features"
L2_CHOICES = (1e-2, 1e-1, 1.0)
FOLDS = 3
STEPS = 250


@dataclass(frozen=True)
class LinearHead:
    """logits = ((x - mean) / sd) @ weights + bias."""

    mean: np.ndarray  # [D]
    sd: np.ndarray  # [D]
    weights: np.ndarray  # [D, L]
    bias: np.ndarray  # [L]
    multi_label: bool
    l2: float


def pooled_size() -> int:
    return 2 * sum(STAGES[stage].out_channels for stage in POOLED_STAGES)


def build_pooled_graph(weights: dict[str, np.ndarray], size: tuple[int, int]) -> onnx.ModelProto:
    """The backbone and the global pooling: input `image` uint8 [H, W, 3], output [D] float32."""
    model = build_backbone_graph(weights, size[0], size[1], size, stages=POOLED_STAGES)
    graph = model.graph
    pooled = []
    for stage in POOLED_STAGES:
        for op in ("GlobalAveragePool", "GlobalMaxPool"):
            name = f"{feature_name(stage)}.{op}"
            graph.node.append(helper.make_node(op, [feature_name(stage)], [name], name=name))
            pooled.append(name)
    graph.node.append(helper.make_node("Concat", pooled, ["pooled_nchw"], name="pooled_nchw", axis=1))
    graph.initializer.append(numpy_helper.from_array(np.array([pooled_size()], np.int64), "pooled_shape"))
    graph.node.append(
        helper.make_node("Reshape", ["pooled_nchw", "pooled_shape"], [POOLED_OUTPUT], name=POOLED_OUTPUT)
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(POOLED_OUTPUT, TensorProto.FLOAT, [pooled_size()]))
    return model


class PooledFeatures:
    """Runs the pooled-feature graph on training images (at the graph's input size)."""

    def __init__(self, weights: dict[str, np.ndarray], size: tuple[int, int]) -> None:
        model = build_pooled_graph(weights, size)
        self._session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def __call__(self, image: np.ndarray) -> np.ndarray:
        (features,) = self._session.run([POOLED_OUTPUT], {INPUT_NAME: image})
        return np.asarray(features, np.float64)


def _probabilities(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    if multi_label:
        return np.asarray(1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60))))
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True))


def _fit_linear(
    x: np.ndarray, targets: np.ndarray, multi_label: bool, l2: float
) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression on standardised features by full-batch Adam; targets [n, L] in 0/1.

    Each image weighs by the inverse frequency of its labels, so that a rare label is not
    given up for a common one.
    """
    n, d = x.shape
    labels = targets.shape[1]
    if multi_label:
        positives = targets.sum(axis=0).clip(1, None)
        negatives = (n - targets.sum(axis=0)).clip(1, None)
        sample_weights = np.where(targets > 0, n / (2 * positives), n / (2 * negatives))
    else:
        counts = targets.sum(axis=0).clip(1, None)
        sample_weights = (targets @ (n / (labels * counts)))[:, None]
    sample_weights = sample_weights.astype(np.float32)
    weights = np.zeros((d, labels), np.float32)
    bias = np.zeros(labels, np.float32)
    moments = [np.zeros_like(weights), np.zeros_like(weights), np.zeros_like(bias), np.zeros_like(bias)]
    rate, beta1, beta2 = 0.08, 0.9, 0.999
    for step in range(1, STEPS + 1):
        error = (_probabilities(x @ weights + bias, multi_label) - targets) * sample_weights / n
        gradients = (x.T @ error + l2 * weights, error.sum(axis=0))
        for index, (param, gradient) in enumerate(zip((weights, bias), gradients, strict=True)):
            first, second = moments[2 * index], moments[2 * index + 1]
            first *= beta1
            first += (1 - beta1) * gradient
            second *= beta2
            second += (1 - beta2) * gradient**2
            param -= rate * (first / (1 - beta1**step)) / (np.sqrt(second / (1 - beta2**step)) + 1e-8)
    return weights, bias


def _log_loss(probabilities: np.ndarray, targets: np.ndarray, multi_label: bool) -> float:
    p = np.clip(probabilities, 1e-7, 1 - 1e-7)
    if multi_label:
        return float(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean())
    return float(-(targets * np.log(p)).sum(axis=1).mean())


def _folds(targets: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold number per image, dealt label by label so that every fold sees every label."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(targets), int)
    key = targets.argmax(axis=1)
    for label in np.unique(key):
        members = rng.permutation(np.flatnonzero(key == label))
        fold[members] = (np.arange(len(members)) + rng.integers(folds)) % folds
    return fold


def fit_head(features: np.ndarray, targets: np.ndarray, multi_label: bool, seed: int = 0) -> LinearHead:
    """The classification head for [n, D] pooled features and [n, L] 0/1 targets."""
    mean = features.mean(axis=0)
    sd = features.std(axis=0) + 1e-6
    x = ((features - mean) / sd).astype(np.float32)
    targets = targets.astype(np.float32)
    fold = _folds(targets, FOLDS, seed)
    losses = []
    for l2 in L2_CHOICES:
        loss = 0.0
        for k in range(FOLDS):
            held = fold == k
            if not held.any() or held.all():
                continue
            weights, bias = _fit_linear(x[~held], targets[~held], multi_label, l2)
            loss += _log_loss(
                _probabilities(x[held] @ weights + bias, multi_label), targets[held], multi_label
            )
        losses.append(loss)
    l2 = L2_CHOICES[int(np.argmin(losses))]
    weights, bias = _fit_linear(x, targets, multi_label, l2)
    return LinearHead(mean, sd, weights, bias, multi_label, l2)


def head_scores(head: LinearHead, features: np.ndarray) -> np.ndarray:
    """The head's label scores for [n, D] features, as the graph computes them."""
    return _probabilities(((features - head.mean) / head.sd) @ head.weights + head.bias, head.multi_label)


def build_classifier_graph(
    weights: dict[str, np.ndarray], head: LinearHead, size: tuple[int, int]
) -> onnx.ModelProto:
    """The pooled-feature graph with the head folded into one MatMul and Add."""
    model = build_pooled_graph(weights, size)
    graph = model.graph
    scale = (head.weights / head.sd[:, None]).astype(np.float32)
    offset = (head.bias - (head.mean / head.sd) @ head.weights).astype(np.float32)
    graph.initializer.extend(
        [
            numpy_helper.from_array(scale, "head_weights"),
            numpy_helper.from_array(np.array([1, pooled_size()], np.int64), "pooled_row_shape"),
            numpy_helper.from_array(offset[None, :], "head_bias"),
            numpy_helper.from_array(np.array([scale.shape[1]], np.int64), "label_shape"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node(
                "Reshape", [POOLED_OUTPUT, "pooled_row_shape"], ["pooled_row"], name="pooled_row"
            ),
            helper.make_node("MatMul", ["pooled_row", "head_weights"], ["logits_raw"], name="logits_raw"),
            helper.make_node("Add", ["logits_raw", "head_bias"], ["logits"], name="logits"),
            helper.make_node("Sigmoid", ["logits"], ["probabilities"], name="probabilities")
            if head.multi_label
            else helper.make_node("Softmax", ["logits"], ["probabilities"], name="probabilities", axis=1),
            helper.make_node(
                "Reshape", ["probabilities", "label_shape"], [LABEL_SCORES_OUTPUT], name=LABEL_SCORES_OUTPUT
            ),
        ]
    )
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info(LABEL_SCORES_OUTPUT, TensorProto.FLOAT, [scale.shape[1]])
    )
    graph.name = "custom_labels_classifier"
    return model


def train_classifier(
    samples: Sequence[tuple[np.ndarray, Sequence[str]]],
    labels: tuple[str, ...],
    size: tuple[int, int],
    weights: dict[str, np.ndarray],
    multi_label: bool,
    seed: int = 0,
) -> tuple[onnx.ModelProto, LinearHead]:
    """Fit a head on images already at the graph's input `size` (height, width) and export it."""
    extract = PooledFeatures(weights, size)
    features = np.stack([extract(image) for image, _ in samples])
    index = {label: position for position, label in enumerate(labels)}
    targets = np.zeros((len(samples), len(labels)))
    for row, (_, names) in enumerate(samples):
        for name in names:
            targets[row, index[name]] = 1.0
    head = fit_head(features, targets, multi_label, seed)
    return build_classifier_graph(weights, head, size), head
