"""Object-localisation metrics as the Rekognition Custom Labels guide defines them.

The guide (モデルを評価するためのメトリクス) counts every predicted and every ground-truth box of
every test image: a predicted box is correct (a true positive) when it overlaps a ground-truth box of
its label with IoU >= 0.5; each ground-truth box is matched at most once, to the most confident
prediction that reaches it (greedy in descending confidence, each prediction taking the unmatched
truth it overlaps most), so a duplicate of a found box is a false positive. Per label:

- precision, recall and F1 at a threshold: the predictions with confidence >= threshold count;
- the assumed threshold (想定しきい値): the threshold with the best F1 on the test set;
- average precision: the area under the precision-recall curve at IoU 0.5, all-point interpolated
  (precision made monotone from the right, then summed over every recall step, as VOC 2010+ and
  COCO without the 101-point sampling), so it does not depend on any threshold;
- average recall: the recall of all predictions averaged over the IoU thresholds 0.5, 0.55, ..., 0.95
  (the COCO definition), which rewards tight boxes.

The aggregate values are the unweighted means over labels: the guide's example summary file has the
aggregated F1, precision and recall equal to the mean of its two labels' values, and mAP is by name a
mean of the labels' APs. A ratio whose denominator is 0 (no prediction, no truth) is 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lookout_edge.custom_labels import Prediction, box_iou
from lookout_edge.trainer.labels.dataset import Box

MATCH_IOU = 0.5
RECALL_IOUS = tuple(round(0.5 + 0.05 * step, 2) for step in range(10))

Rectangle = tuple[float, float, float, float]  # left, top, width, height


@dataclass(frozen=True)
class TruthBox:
    """A ground-truth box in the units of `Prediction.box`: fractions of the image."""

    label: str
    box: Rectangle

    @classmethod
    def from_pixels(cls, box: Box, image_width: int, image_height: int) -> TruthBox:
        """The box of a dataset image in fractions, so that it compares with a graph's predictions."""
        return cls(
            box.label,
            (
                box.left / image_width,
                box.top / image_height,
                box.width / image_width,
                box.height / image_height,
            ),
        )


@dataclass(frozen=True)
class LabelMatches:
    """One label's predictions over a test set, most confident first, and whether each was correct."""

    label: str
    truths: int
    confidences: np.ndarray  # [n] float64, descending
    correct: np.ndarray  # [n] bool: matched a truth box at the matching IoU
    images: np.ndarray  # [n] int: index of the image each prediction belongs to

    def counts_at(self, threshold: float) -> tuple[int, int, int]:
        """(true positives, false positives, false negatives) counting confidences >= threshold."""
        kept = self.confidences >= threshold
        true_positives = int(np.count_nonzero(self.correct & kept))
        return true_positives, int(np.count_nonzero(kept)) - true_positives, self.truths - true_positives


@dataclass(frozen=True)
class LabelBoxMetrics:
    label: str
    truths: int  # ground-truth boxes of the label in the test set
    predictions: int  # predicted boxes of the label, any confidence
    threshold: float  # the assumed threshold, or the one asked for
    precision: float
    recall: float
    f1: float
    average_precision: float  # IoU 0.5, all-point interpolation
    average_recall: float  # IoU 0.5:0.95


@dataclass(frozen=True)
class BoxEvaluation:
    labels: tuple[LabelBoxMetrics, ...]
    images: int

    def _mean(self, name: str) -> float:
        return float(np.mean([getattr(label, name) for label in self.labels])) if self.labels else 0.0

    @property
    def mean_average_precision(self) -> float:
        return self._mean("average_precision")

    @property
    def mean_average_recall(self) -> float:
        return self._mean("average_recall")

    @property
    def precision(self) -> float:
        return self._mean("precision")

    @property
    def recall(self) -> float:
        return self._mean("recall")

    @property
    def f1(self) -> float:
        return self._mean("f1")

    def label(self, name: str) -> LabelBoxMetrics:
        return next(label for label in self.labels if label.label == name)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def f1_score(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


def _image_matches(predicted: list[Prediction], truth: list[TruthBox], iou: float) -> np.ndarray:
    """Which of one image's predictions of one label (most confident first) match a truth box."""
    correct = np.zeros(len(predicted), bool)
    if not truth or not predicted:
        return correct
    overlaps = box_iou(
        np.array([prediction.box for prediction in predicted], np.float64),
        np.array([item.box for item in truth], np.float64),
    )
    free = np.ones(len(truth), bool)
    for index, row in enumerate(overlaps):
        candidates = np.where(free & (row >= iou), row, -1.0)
        best = int(np.argmax(candidates))
        if candidates[best] >= 0:
            correct[index] = True
            free[best] = False
    return correct


def match_label(
    label: str,
    predictions: Sequence[Sequence[Prediction]],
    truths: Sequence[Sequence[TruthBox]],
    iou: float = MATCH_IOU,
) -> LabelMatches:
    """Match one label's predictions to its truth boxes image by image (see the module docstring).

    Greedy matching in descending confidence makes the matches of the predictions above any threshold
    the same as when only those predictions are matched, so one matching serves every threshold.
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} images of predictions but {len(truths)} of truth")
    confidences: list[float] = []
    correct: list[np.ndarray] = []
    images: list[int] = []
    count = 0
    for image, (predicted, truth) in enumerate(zip(predictions, truths, strict=True)):
        mine = sorted(
            (item for item in predicted if item.name == label and item.box is not None),
            key=lambda item: -item.confidence,
        )
        boxes = [item for item in truth if item.label == label]
        count += len(boxes)
        confidences.extend(item.confidence for item in mine)
        correct.append(_image_matches(mine, boxes, iou))
        images.extend([image] * len(mine))
    order = np.argsort(-np.asarray(confidences, np.float64), kind="stable")
    return LabelMatches(
        label=label,
        truths=count,
        confidences=np.asarray(confidences, np.float64)[order],
        correct=np.concatenate([*correct, np.zeros(0, bool)])[order],
        images=np.asarray(images, np.int64)[order],
    )


def _curve(matches: LabelMatches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at each distinct confidence taken as the threshold (descending), and
    those thresholds: predictions of equal confidence enter together, as a threshold cannot split them."""
    true_positives = np.cumsum(matches.correct)
    predicted = np.arange(1, len(matches.correct) + 1)
    # The last prediction of each run of equal confidences closes that threshold's counts.
    last = np.flatnonzero(np.append(np.diff(matches.confidences) != 0, True))
    precision = true_positives[last] / predicted[last]
    recall = true_positives[last] / matches.truths if matches.truths else np.zeros(len(last))
    return precision, recall, matches.confidences[last]


def average_precision(matches: LabelMatches) -> float:
    """Area under the all-point interpolated precision-recall curve."""
    if not matches.truths or not len(matches.confidences):
        return 0.0
    precision, recall, _ = _curve(matches)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * envelope))


def best_f1_threshold(matches: LabelMatches) -> float:
    """The assumed threshold: the confidence whose predictions-at-or-above give the best F1 (the most
    confident such threshold on a tie, so fewer false positives). 1.0 when nothing can be found."""
    if not matches.truths or not len(matches.confidences):
        return 1.0
    precision, recall, thresholds = _curve(matches)
    scores = np.where(
        precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0
    )
    return float(thresholds[int(np.argmax(scores))]) if scores.max() > 0 else 1.0


def average_recall(
    label: str, predictions: Sequence[Sequence[Prediction]], truths: Sequence[Sequence[TruthBox]]
) -> float:
    """Recall of all the label's predictions, averaged over the IoU thresholds 0.5:0.05:0.95."""
    recalls = []
    for iou in RECALL_IOUS:
        matches = match_label(label, predictions, truths, iou)
        recalls.append(_ratio(int(np.count_nonzero(matches.correct)), matches.truths))
    return float(np.mean(recalls))


def label_metrics(
    matches: LabelMatches, average_recall_value: float, threshold: float | None = None
) -> LabelBoxMetrics:
    """One label's metrics at `threshold`, or at its best-F1 (assumed) threshold when None."""
    chosen = best_f1_threshold(matches) if threshold is None else threshold
    true_positives, false_positives, false_negatives = matches.counts_at(chosen)
    precision = _ratio(true_positives, true_positives + false_positives)
    recall = _ratio(true_positives, true_positives + false_negatives)
    return LabelBoxMetrics(
        label=matches.label,
        truths=matches.truths,
        predictions=len(matches.confidences),
        threshold=chosen,
        precision=precision,
        recall=recall,
        f1=f1_score(precision, recall),
        average_precision=average_precision(matches),
        average_recall=average_recall_value,
    )


def evaluate_boxes(
    predictions: Sequence[Sequence[Prediction]],
    truths: Sequence[Sequence[TruthBox]],
    labels: Sequence[str],
    thresholds: Mapping[str, float] | None = None,
) -> BoxEvaluation:
    """Per-label and aggregate box metrics of a test set.

    `predictions[i]` are image i's predicted boxes (as `decode` returns them, or every candidate
    above a low floor, which AP needs to see the whole curve), `truths[i]` its truth boxes in the same
    units. Without `thresholds` each label is scored at its best-F1 threshold, the guide's assumed
    threshold; with them, at the given ones (e.g. a deployed model's).
    """
    results = []
    for label in labels:
        matches = match_label(label, predictions, truths)
        threshold = None if thresholds is None else thresholds[label]
        results.append(label_metrics(matches, average_recall(label, predictions, truths), threshold))
    return BoxEvaluation(labels=tuple(results), images=len(truths))
