"""Evaluation of classification models as the Custom Labels guide reports it.

For each label, an image is a positive when the label is one of its true labels and is
predicted when the label's score reaches the label's threshold. The **assumed threshold** is
the one giving the best F1 on the test set (the guide: « 想定しきい値 »); among scores that tie
for it, the threshold sits halfway between the lowest score still predicted and the next score
below it, so that it is not right at a test image's score. Aggregate precision, recall and F1
are the means over labels (the guide's example summary is exactly that). The confusion matrix
gives, for each true label, the share of its test images on which each label is predicted at
its assumed threshold: with a threshold per label a row need not add up to 1, as in the guide's
example.

`evaluation_summary` writes the guide's `EvaluationSummary` document; localisation models
bring their per-label metrics and mAP/mAR from trainer/labels/box_metrics.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

SUMMARY_VERSION = 1
FALLBACK_THRESHOLD = 0.5  # a label with no test image has no best F1: its threshold stays here


@dataclass(frozen=True)
class LabelMetrics:
    label: str
    threshold: float
    precision: float
    recall: float
    f1: float
    test_images: int  # test images showing the label


def best_f1_threshold(scores: np.ndarray, positive: np.ndarray) -> tuple[float, float, float, float]:
    """(threshold, precision, recall, F1) at the threshold with the best F1 on these scores."""
    positives = int(positive.sum())
    if positives == 0:
        return FALLBACK_THRESHOLD, 0.0, 0.0, 0.0
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], positive[order].astype(float)
    true_positives = np.cumsum(hits)
    predicted = np.arange(1, len(ranked) + 1)
    # Only the last of equal scores is a place to cut.
    cuts = np.flatnonzero(np.r_[ranked[1:] < ranked[:-1], True])
    f1 = 2 * true_positives[cuts] / (predicted[cuts] + positives)
    best = cuts[int(np.argmax(f1))]
    below = ranked[best + 1] if best + 1 < len(ranked) else 0.0
    threshold = float((ranked[best] + below) / 2)
    precision = float(true_positives[best] / predicted[best])
    recall = float(true_positives[best] / positives)
    return threshold, precision, recall, float(2 * precision * recall / (precision + recall))


def classification_metrics(
    scores: np.ndarray, truths: Sequence[Sequence[str]], labels: Sequence[str]
) -> list[LabelMetrics]:
    """Per-label metrics at each label's best-F1 threshold; `scores` is [images, labels]."""
    metrics = []
    for index, label in enumerate(labels):
        positive = np.array([label in truth for truth in truths])
        threshold, precision, recall, f1 = best_f1_threshold(scores[:, index], positive)
        metrics.append(LabelMetrics(label, threshold, precision, recall, f1, int(positive.sum())))
    return metrics


def confusion_matrix(
    scores: np.ndarray, truths: Sequence[Sequence[str]], metrics: Sequence[LabelMetrics]
) -> list[dict[str, Any]]:
    """The guide's ConfusionMatrix entries: per true label, the share predicted as each label."""
    thresholds = np.array([item.threshold for item in metrics])
    predicted = scores >= thresholds
    entries = []
    for truth_metrics in metrics:
        rows = [i for i, truth in enumerate(truths) if truth_metrics.label in truth]
        for column, predicted_metrics in enumerate(metrics):
            share = float(predicted[rows, column].mean()) if rows else 0.0
            entries.append(
                {
                    "GroundTruthLabel": truth_metrics.label,
                    "PredictedLabel": predicted_metrics.label,
                    "Value": share,
                }
            )
    return entries


def evaluation_summary(
    version_arn: str,
    labels: Sequence[str],
    metrics: Sequence[LabelMetrics],
    training_images: int,
    testing_images: int,
    finished: datetime,
    extra_aggregate: dict[str, Any],
) -> dict[str, Any]:
    """The guide's EvaluationSummary; `extra_aggregate` adds ConfusionMatrix or AveragePrecision
    and AverageRecall, which the guide gives for one kind of model each."""
    if metrics:
        aggregate = {
            "F1Score": float(np.mean([item.f1 for item in metrics])),
            "Precision": float(np.mean([item.precision for item in metrics])),
            "Recall": float(np.mean([item.recall for item in metrics])),
        }
    else:
        aggregate = {"F1Score": 0.0, "Precision": 0.0, "Recall": 0.0}
    by_f1 = sorted(metrics, key=lambda item: -item.f1)  # the guide sorts labels by F1
    return {
        "Version": SUMMARY_VERSION,
        "EvaluationDetails": {
            "ProjectVersionArn": version_arn,
            "EvaluationEndTimestamp": finished.replace(tzinfo=None).isoformat(),
            "Labels": list(labels),
            "NumberOfTrainingImages": training_images,
            "NumberOfTestingImages": testing_images,
        },
        "AggregatedEvaluationResults": {**aggregate, **extra_aggregate},
        "LabelEvaluationResults": [
            {
                "Label": item.label,
                "NumberOfTestingImages": item.test_images,
                "Metrics": {
                    "Threshold": item.threshold,
                    "Precision": item.precision,
                    "Recall": item.recall,
                    "F1Score": item.f1,
                },
            }
            for item in by_f1
        ],
    }
