"""Evaluation metrics, named and defined as in the Lookout for Vision guide.

Image classification (an image is positive when anomalous):

- precision = TP / (TP + FP): of the images predicted anomalous, the fraction that are;
- recall = TP / (TP + FN): of the anomalous images, the fraction predicted anomalous;
- F1 = harmonic mean of precision and recall, computed as 2 TP / (2 TP + FP + FN).

Segmentation, for each anomaly label (pixel metrics, the guide's "PixelAnomalyClassMetrics"):
precision, recall and F1 over all pixels of the evaluated images, and the "average IoU":
the guide defines it as "the average percentage of overlap between the anomaly masks of the
test images and the masks the model predicts for them", reported for each label. That is an
average over images of each image's IoU, not one IoU of pooled pixels; both are reported here
(`average_iou` and `iou`), and `mean_iou` averages `average_iou` over labels.

A score at or above the threshold means anomalous. The threshold rules work on scores of any
scale: the trainer picks its threshold on raw PatchCore distances and calibrates them to the
model package's 0..1 scale afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypedDict

import numpy as np

# Below this fraction of the scale (1, or the largest normal score if larger), a margin over the
# normal scores is too thin to absorb the scatter of a new normal image.
MIN_NORMAL_MARGIN = 0.02


class ClassificationMetrics(TypedDict):
    precision: float | None
    recall: float | None
    f1: float | None
    tp: int
    fp: int
    tn: int
    fn: int


class LabelMetrics(TypedDict):
    name: str
    test_images: int
    precision: float | None
    recall: float | None
    f1: float | None
    iou: float | None
    average_iou: float | None
    tp: int
    fp: int
    fn: int


class SegmentationMetrics(TypedDict):
    labels: list[LabelMetrics]
    mean_iou: float | None
    images: int
    pixels: int


def _binary_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if array.dtype != bool and not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must be booleans or 0/1 (1 = anomalous)")
    return array.astype(bool)


def _finite_scores(scores: np.ndarray, size: int) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.shape != (size,):
        raise ValueError(f"scores have shape {array.shape}; expected ({size},) to match the labels")
    if not np.isfinite(array).all():
        raise ValueError("scores must be finite (no NaN or infinity)")
    return array


def _both_classes(labels: np.ndarray, what: str) -> None:
    positives = int(labels.sum())
    if positives == 0 or positives == labels.size:
        present = "anomalous" if positives else "normal"
        raise ValueError(f"{what} needs both normal and anomalous examples; all {labels.size} are {present}")


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random anomalous example scores above a
    random normal one, ties counting one half (the Mann–Whitney U statistic divided by n₁·n₀).

    Computed exactly from integer counts per distinct score, so tied scores are handled exactly.
    Raises ValueError when only one class is present, since the area is then undefined.
    """
    truth = _binary_labels(labels)
    values = _finite_scores(scores, truth.size)
    _both_classes(truth, "AUROC")
    _, inverse = np.unique(values, return_inverse=True)
    positives_at = np.bincount(inverse, weights=truth, minlength=inverse.max() + 1).astype(np.int64)
    negatives_at = np.bincount(inverse, weights=~truth, minlength=inverse.max() + 1).astype(np.int64)
    negatives_below = np.cumsum(negatives_at) - negatives_at
    # Doubled to stay in integers: 2U = sum(2 * pos * neg_below + pos * neg_tied).
    twice_u = int(np.sum(2 * positives_at * negatives_below + positives_at * negatives_at))
    return twice_u / (2 * int(positives_at.sum()) * int(negatives_at.sum()))


def threshold_max_f1(labels: np.ndarray, scores: np.ndarray, favour_recall: bool = False) -> float:
    """The threshold (score >= threshold is anomalous) that maximises F1 on held-out scores.

    With `favour_recall`, maximise F2 = 5·P·R / (4·P + R) instead: recall weighs four times as
    much as precision, for lines where a missed defect costs more than a false alarm.

    Every threshold between two neighbouring distinct scores classifies the held-out set the
    same way, so the returned value sits in the middle of the chosen gap rather than on a
    sample's score: that leaves equal room on both sides for the scatter of unseen images.
    Zero (or, for scores at or below zero, the lowest score minus one) is the neighbour below
    the lowest score. When several gaps give
    the same best F, the widest one wins (the largest margin), then the highest.
    """
    truth = _binary_labels(labels)
    values = _finite_scores(scores, truth.size)
    _both_classes(truth, "Choosing a threshold by F1")
    beta2 = 4.0 if favour_recall else 1.0
    distinct, inverse = np.unique(values, return_inverse=True)
    positives_at = np.bincount(inverse, weights=truth, minlength=distinct.size)
    negatives_at = np.bincount(inverse, weights=~truth, minlength=distinct.size)
    # Candidate k flags every score >= distinct[k]: cumulative counts from the top.
    tp = np.cumsum(positives_at[::-1])[::-1]
    fp = np.cumsum(negatives_at[::-1])[::-1]
    fn = truth.sum() - tp
    f_beta = (1 + beta2) * tp / ((1 + beta2) * tp + beta2 * fn + fp)
    floor = 0.0 if distinct[0] > 0 else float(distinct[0]) - 1.0
    below = np.concatenate(([floor], distinct[:-1]))
    gap = distinct - below
    best = np.flatnonzero(np.isclose(f_beta, f_beta.max(), rtol=0.0, atol=1e-12))
    # lexsort sorts by the last key first: widest gap, then highest candidate.
    chosen = best[np.lexsort((-distinct[best], -gap[best]))[0]]
    return float((distinct[chosen] + below[chosen]) / 2)


def threshold_from_normals(scores: np.ndarray) -> float:
    """A threshold when the held-out set has only normal images: max + max(std, 0.02 x scale).

    Why the maximum: for n exchangeable normal scores, a new normal image exceeds the largest of
    them with probability 1/(n+1), so the maximum alone already bounds the false-alarm rate.
    Why a margin of one sample standard deviation: the maximum of a small set underestimates
    the tail, and the spread is the natural scale of a new normal's scatter (for Gaussian scores
    and n = 5 this moves the threshold from about mean + 1.2σ to mean + 2.2σ, near 1.5 % false
    alarms instead of about 12 %). Why a floor of 2 % of the scale (1, or the largest score if
    larger): with one image, or identical scores, the spread is zero and the threshold would sit
    on a seen normal score, flagging it.
    """
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("at least one normal score is needed to set a threshold")
    values = _finite_scores(values, values.size)
    spread = float(values.std(ddof=1)) if values.size > 1 else 0.0
    highest = float(values.max())
    return highest + max(spread, MIN_NORMAL_MARGIN * max(1.0, abs(highest)))


def classification_metrics(labels: np.ndarray, predicted: np.ndarray) -> ClassificationMetrics:
    """Precision, recall, F1 and the confusion counts for image verdicts (True = anomalous).

    Degenerate cases are None (JSON null), never a made-up number: precision when nothing is
    predicted anomalous, recall when no image is anomalous, F1 when neither happens (no TP, FP
    or FN). F1 = 2TP / (2TP + FP + FN) equals the harmonic mean of precision and recall
    whenever both exist, and is 0 when anomalies exist but none is predicted.
    """
    truth = _binary_labels(labels)
    verdicts = _binary_labels(predicted, "predicted")
    if verdicts.shape != truth.shape:
        raise ValueError(f"predicted has shape {verdicts.shape}; labels have {truth.shape}")
    tp = int(np.sum(truth & verdicts))
    fp = int(np.sum(~truth & verdicts))
    fn = int(np.sum(truth & ~verdicts))
    tn = int(truth.size - tp - fp - fn)
    return ClassificationMetrics(
        precision=_ratio(tp, tp + fp),
        recall=_ratio(tp, tp + fn),
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
    )


def segmentation_metrics(
    true_maps: Iterable[np.ndarray], pred_maps: Iterable[np.ndarray], label_names: Sequence[str]
) -> SegmentationMetrics:
    """Per-label pixel metrics for label maps (0 = background, i = the i-th name in label_names).

    The maps are read one pair at a time (they may come from a generator), each reduced to a
    (K+1)×(K+1) confusion matrix with np.bincount, so memory does not grow with the data set.

    For each label: `tp`, `fp`, `fn` and `precision`, `recall`, `f1`, `iou` are pooled over all
    pixels; `test_images` counts the images whose ground truth contains the label (the console's
    "Test images" column); `average_iou` is the mean of the per-image IoU over the images where
    the label is in the ground truth or the prediction (elsewhere the IoU is 0/0), so a mask
    predicted on an image without that defect counts as 0. `mean_iou` is the mean of
    `average_iou` over the labels where it is defined. Undefined values are None.
    """
    size = len(label_names) + 1
    total = np.zeros((size, size), dtype=np.int64)
    iou_sum = np.zeros(size, dtype=np.float64)
    iou_images = np.zeros(size, dtype=np.int64)
    test_images = np.zeros(size, dtype=np.int64)
    images = 0
    for index, (truth, pred) in enumerate(zip(true_maps, pred_maps, strict=True)):
        truth, pred = np.asarray(truth), np.asarray(pred)
        if truth.shape != pred.shape or truth.ndim != 2 or truth.size == 0:
            raise ValueError(f"image {index}: maps must be 2-D and alike, got {truth.shape} and {pred.shape}")
        for what, labels in (("true", truth), ("predicted", pred)):
            if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= size:
                raise ValueError(f"image {index}: {what} map must hold integers 0..{size - 1}")
        pair = truth.astype(np.int64) * size + pred
        confusion = np.bincount(pair.ravel(), minlength=size * size).reshape(size, size)
        total += confusion
        intersection = np.diag(confusion)
        union = confusion.sum(axis=0) + confusion.sum(axis=1) - intersection
        present = union > 0
        iou_sum[present] += intersection[present] / union[present]
        iou_images += present
        test_images += confusion.sum(axis=1) > 0
        images += 1
    if images == 0:
        raise ValueError("no label maps to evaluate")

    per_label: list[LabelMetrics] = []
    for label, name in enumerate(label_names, start=1):
        tp = int(total[label, label])
        fp = int(total[:, label].sum()) - tp
        fn = int(total[label, :].sum()) - tp
        per_label.append(
            LabelMetrics(
                name=name,
                test_images=int(test_images[label]),
                precision=_ratio(tp, tp + fp),
                recall=_ratio(tp, tp + fn),
                f1=_ratio(2 * tp, 2 * tp + fp + fn),
                iou=_ratio(tp, tp + fp + fn),
                average_iou=float(iou_sum[label] / iou_images[label]) if iou_images[label] else None,
                tp=tp,
                fp=fp,
                fn=fn,
            )
        )
    defined = [m["average_iou"] for m in per_label if m["average_iou"] is not None]
    return SegmentationMetrics(
        labels=per_label,
        mean_iou=float(np.mean(defined)) if defined else None,
        images=images,
        pixels=int(total.sum()),
    )


def pixel_auroc(
    true_masks: Sequence[np.ndarray],
    anomaly_maps: Sequence[np.ndarray],
    max_pixels: int = 2_000_000,
    seed: int = 0,
) -> float:
    """AUROC of per-pixel anomaly maps against "any anomaly" masks (nonzero = anomalous pixel).

    Above `max_pixels` pixels, the AUROC is computed on a seeded random subsample, so the same
    inputs always give the same value. Since the AUROC compares anomalous pixels with normal
    ones, each class is sampled on its own: anomalous pixels keep up to half of the budget
    (usually all of them, as defects are small) and normal pixels fill the rest. Each pixel of a
    class is kept independently with the same probability, so the estimate is unbiased, and
    with a million pixels per class its standard error is well under 0.001. The sequences are
    read twice (count, then sample), one image at a time.
    """
    if len(true_masks) != len(anomaly_maps) or not true_masks:
        raise ValueError(
            f"need as many masks as maps, and one at least: {len(true_masks)}, {len(anomaly_maps)}"
        )
    if max_pixels < 2:
        raise ValueError("max_pixels must be at least 2")
    positives = negatives = 0
    for index, (mask, amap) in enumerate(zip(true_masks, anomaly_maps, strict=True)):
        if np.shape(mask) != np.shape(amap):
            raise ValueError(f"image {index}: mask {np.shape(mask)} and map {np.shape(amap)} differ")
        anomalous = int(np.count_nonzero(mask))
        positives += anomalous
        negatives += int(np.size(mask)) - anomalous
    keep_positives = min(positives, max(max_pixels // 2, max_pixels - negatives))
    keep_positive_rate = keep_positives / positives if positives else 1.0
    keep_negative_rate = min(1.0, (max_pixels - keep_positives) / negatives) if negatives else 1.0

    rng = np.random.default_rng(seed)
    labels: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    for mask, amap in zip(true_masks, anomaly_maps, strict=True):
        truth = np.asarray(mask).ravel() != 0
        values = np.asarray(amap, dtype=np.float64).ravel()
        if keep_positive_rate < 1.0 or keep_negative_rate < 1.0:
            keep = rng.random(truth.size) < np.where(truth, keep_positive_rate, keep_negative_rate)
            truth, values = truth[keep], values[keep]
        labels.append(truth)
        scores.append(values)
    return auroc(np.concatenate(labels), np.concatenate(scores))
