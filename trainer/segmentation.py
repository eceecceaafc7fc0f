"""The segmentation head: which anomaly label each patch shows, learnt from the masks.

A softmax regression over the labels (background first) on each patch's features and its
PatchCore distance, trained with the masks' label fractions per patch as soft targets.
Its logits are upsampled to the image and a pixel is anomalous when the probability of "not
background" reaches a threshold chosen on held-out masks for the best mean IoU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lookout_edge.trainer.reference import resize_bilinear

L2 = 1e-3
STEPS = 300
LEARNING_RATE = 0.05


@dataclass(frozen=True)
class SegmentationHead:
    """logits = weight @ [features; distance] + bias, with the input standardisation folded in.

    Inference only needs each label's logit relative to the background's,
    d_k = l_k - l_0: P(anomaly) = sigmoid(log sum_k exp(d_k)) and the likeliest label is
    argmax_k d_k. Resizing is linear, so the relative logits are computed on the patch grid
    and resized once, and no per-pixel softmax is needed.
    """

    weight: np.ndarray  # [K + 1, C + 1]
    bias: np.ndarray  # [K + 1]
    pixel_threshold: float = 0.5

    @property
    def relative_weight(self) -> np.ndarray:
        return (self.weight[1:] - self.weight[0]).astype(np.float32)

    @property
    def relative_bias(self) -> np.ndarray:
        return (self.bias[1:] - self.bias[0]).astype(np.float32)

    def pixel_maps(
        self, patches: np.ndarray, distances: np.ndarray, grid: tuple[int, int], size: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(P(anomaly) [H, W], likeliest label [H, W] uint8, 1..K) for patch features [C, P]."""
        inputs = np.concatenate([patches, distances[None, :]], axis=0)
        relative = self.relative_weight @ inputs + self.relative_bias[:, None]
        upsampled = resize_bilinear(relative.reshape(-1, *grid).astype(np.float64), *size)
        top = upsampled.max(axis=0)
        log_sum = top + np.log(np.exp(upsampled - top).sum(axis=0))
        anomaly = 1.0 / (1.0 + np.exp(-log_sum))
        return anomaly, (np.argmax(upsampled, axis=0) + 1).astype(np.uint8)

    def label_map(self, anomaly: np.ndarray, label: np.ndarray) -> np.ndarray:
        """[H, W] uint8 labels: 0 where P(anomaly) is below the pixel threshold, else the likeliest label."""
        return np.where(anomaly >= self.pixel_threshold, label, 0).astype(np.uint8)


def patch_targets(label_map: np.ndarray, labels: int, grid: tuple[int, int]) -> np.ndarray:
    """[K + 1, P] fraction of each patch's pixels that carry each label (area averaging)."""
    height, width = label_map.shape
    rows = np.minimum((np.arange(height) * grid[0]) // height, grid[0] - 1)
    cols = np.minimum((np.arange(width) * grid[1]) // width, grid[1] - 1)
    cell = (rows[:, None] * grid[1] + cols[None, :]).reshape(-1)
    counts = np.zeros((labels + 1, grid[0] * grid[1]))
    np.add.at(counts, (label_map.reshape(-1).astype(np.intp), cell), 1.0)
    return counts / np.maximum(counts.sum(axis=0, keepdims=True), 1.0)


def train_head(inputs: np.ndarray, targets: np.ndarray, seed: int = 0) -> SegmentationHead:
    """Fit the softmax regression on patch inputs [D, N] (features and distance) and targets [K + 1, N].

    Classes are weighted by inverse frequency (capped) so that thin defects are not drowned by
    background; the optimiser is full-batch Adam, deterministic for a given input.
    """
    mean = inputs.mean(axis=1, keepdims=True)
    std = inputs.std(axis=1, keepdims=True) + 1e-6
    x = ((inputs - mean) / std).astype(np.float32)
    classes, count = targets.shape
    frequency = targets.sum(axis=1) / count
    # Square-root inverse frequency, relative to the background, at most 50.
    class_weight = np.minimum(np.sqrt(frequency[0] / np.maximum(frequency, 1e-9)), 50.0).astype(np.float32)
    sample_target = (targets * class_weight[:, None]).astype(np.float32)
    normaliser = float(sample_target.sum())

    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((classes, x.shape[0])) * 0.01).astype(np.float32)
    bias = np.log(np.maximum(frequency, 1e-6)).astype(np.float32)
    moments = [np.zeros_like(weight), np.zeros_like(bias)]
    squares = [np.zeros_like(weight), np.zeros_like(bias)]
    for step in range(1, STEPS + 1):
        logits = weight @ x + bias[:, None]
        logits -= logits.max(axis=0, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=0, keepdims=True)
        # d(weighted cross-entropy)/d(logits) for soft targets.
        gradient = (probabilities * sample_target.sum(axis=0, keepdims=True) - sample_target) / normaliser
        grads = [gradient @ x.T + L2 * weight, gradient.sum(axis=1)]
        for index, (param, grad) in enumerate(zip((weight, bias), grads, strict=True)):
            moments[index] = 0.9 * moments[index] + 0.1 * grad
            squares[index] = 0.999 * squares[index] + 0.001 * grad**2
            corrected = moments[index] / (1 - 0.9**step)
            scale = np.sqrt(squares[index] / (1 - 0.999**step)) + 1e-8
            param -= LEARNING_RATE * corrected / scale
    folded_weight = weight / std[:, 0][None, :]
    folded_bias = bias - (folded_weight @ mean)[:, 0]
    return SegmentationHead(weight=folded_weight.astype(np.float32), bias=folded_bias.astype(np.float32))


def best_pixel_threshold(
    maps: list[tuple[np.ndarray, np.ndarray]], truths: list[np.ndarray], labels: int
) -> float:
    """The P(anomaly) threshold that maximises the mean IoU over labels on held-out images.

    `maps` are `SegmentationHead.pixel_maps` outputs. Pixels are tallied in a histogram per
    (predicted label, true label) over 200 probability bins, so every candidate threshold is
    scored at once.
    """
    bins = 200
    histogram = np.zeros((labels + 1, labels + 1, bins))
    for (anomaly, predicted), truth in zip(maps, truths, strict=True):
        bucket = np.minimum((anomaly * bins).astype(np.intp), bins - 1)
        np.add.at(
            histogram, (predicted.reshape(-1), truth.reshape(-1).astype(np.intp), bucket.reshape(-1)), 1.0
        )
    # at_or_above[k, j, b]: pixels predicted k, truly j, with P(anomaly) in bin b or above.
    at_or_above = np.cumsum(histogram[:, :, ::-1], axis=2)[:, :, ::-1]
    true_totals = histogram.sum(axis=(0, 2))
    best_threshold, best_iou = 0.5, -1.0
    for b in range(1, bins):
        ious = []
        for k in range(1, labels + 1):
            true_positive = at_or_above[k, k, b]
            false_positive = at_or_above[k, :, b].sum() - true_positive
            false_negative = true_totals[k] - true_positive
            union = true_positive + false_positive + false_negative
            if true_totals[k] > 0:
                ious.append(true_positive / union if union else 0.0)
        mean_iou = float(np.mean(ious)) if ious else 0.0
        if mean_iou > best_iou:
            best_threshold, best_iou = b / bins, mean_iou
    return best_threshold
