"""Box metrics on cases small enough to count by hand (trainer/labels/box_metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lookout_edge.custom_labels import LOCALISATION, LabelSpec, Prediction, decode
from lookout_edge.trainer.labels.box_metrics import (
    TruthBox,
    average_precision,
    best_f1_threshold,
    evaluate_boxes,
    match_label,
)
from lookout_edge.trainer.labels.dataset import Box

A = (0.1, 0.1, 0.2, 0.2)
B = (0.6, 0.6, 0.3, 0.2)


def shifted(box: tuple[float, float, float, float], dx: float) -> tuple[float, float, float, float]:
    return (box[0] + dx, box[1], box[2], box[3])


def iou_of_shift(dx: float, width: float) -> float:
    """IoU of two equal boxes of `width` shifted horizontally by `dx`."""
    overlap = width - dx
    return overlap / (2 * width - overlap)


def test_perfect_predictions_score_one() -> None:
    truths = [[TruthBox("dent", A)], [TruthBox("dent", B), TruthBox("scratch", A)]]
    predictions = [[Prediction("dent", 0.9, A)], [Prediction("dent", 0.8, B), Prediction("scratch", 0.7, A)]]
    result = evaluate_boxes(predictions, truths, ("dent", "scratch"))
    assert result.mean_average_precision == pytest.approx(1.0)
    assert (result.precision, result.recall, result.f1) == (1.0, 1.0, 1.0)
    assert result.mean_average_recall == pytest.approx(1.0)
    assert result.label("dent").threshold == 0.8  # the lowest confidence that keeps every hit
    assert result.label("scratch").threshold == 0.7


def test_a_miss_lowers_recall_only() -> None:
    truths = [[TruthBox("dent", A), TruthBox("dent", B)]]
    result = evaluate_boxes([[Prediction("dent", 0.9, A)]], truths, ("dent",)).label("dent")
    assert (result.precision, result.recall) == (1.0, 0.5)
    assert result.f1 == pytest.approx(2 / 3)
    assert result.average_precision == pytest.approx(0.5)


def test_a_false_positive_below_the_hit_is_left_out_by_the_assumed_threshold() -> None:
    truths = [[TruthBox("dent", A)], []]  # the second image is a negative
    predictions = [[Prediction("dent", 0.9, A)], [Prediction("dent", 0.4, B)]]
    result = evaluate_boxes(predictions, truths, ("dent",)).label("dent")
    assert result.threshold == 0.9
    assert (result.precision, result.recall, result.f1) == (1.0, 1.0, 1.0)
    assert result.average_precision == pytest.approx(1.0)  # the false positive comes after full recall


def test_a_false_positive_above_the_hit_costs_precision_and_ap() -> None:
    truths = [[TruthBox("dent", A)], []]
    predictions = [[Prediction("dent", 0.6, A)], [Prediction("dent", 0.9, B)]]
    result = evaluate_boxes(predictions, truths, ("dent",)).label("dent")
    assert result.threshold == 0.6
    assert (result.precision, result.recall) == (0.5, 1.0)
    assert result.average_precision == pytest.approx(0.5)


def test_a_fixed_threshold_replaces_the_assumed_one() -> None:
    truths = [[TruthBox("dent", A)], []]
    predictions = [[Prediction("dent", 0.6, A)], [Prediction("dent", 0.9, B)]]
    result = evaluate_boxes(predictions, truths, ("dent",), thresholds={"dent": 0.7}).label("dent")
    assert (result.threshold, result.precision, result.recall, result.f1) == (0.7, 0.0, 0.0, 0.0)


def test_a_duplicate_is_a_false_positive_unless_suppressed() -> None:
    truths = [[TruthBox("dent", A)]]
    duplicate = shifted(A, 0.02)  # IoU with A = 0.18 / 0.22 > 0.5
    predictions = [Prediction("dent", 0.9, A), Prediction("dent", 0.8, duplicate)]
    matches = match_label("dent", [predictions], truths)
    assert matches.correct.tolist() == [True, False]
    assert matches.counts_at(0.8) == (1, 1, 0)

    outputs = {
        "box_scores": np.array([[0.9], [0.8]], np.float32),
        "boxes": np.array([A, duplicate], np.float32),
    }
    decoded = decode(LOCALISATION, [LabelSpec("dent", 0.5)], outputs)
    assert [prediction.confidence for prediction in decoded] == [pytest.approx(0.9)]
    result = evaluate_boxes([decoded], truths, ("dent",)).label("dent")
    assert (result.precision, result.recall) == (1.0, 1.0)


@pytest.mark.parametrize(("dx", "found"), [(0.066, True), (0.0675, False)])
def test_iou_just_over_and_under_one_half(dx: float, found: bool) -> None:
    assert (iou_of_shift(dx, 0.2) >= 0.5) is found  # 0.5 exactly at dx = 0.2 / 3
    truths = [[TruthBox("dent", A)]]
    result = evaluate_boxes([[Prediction("dent", 0.9, shifted(A, dx))]], truths, ("dent",)).label("dent")
    assert result.recall == (1.0 if found else 0.0)


def test_each_truth_is_matched_once_and_to_the_most_confident_prediction() -> None:
    truths = [[TruthBox("dent", A), TruthBox("dent", shifted(A, 0.3))]]
    predictions = [[Prediction("dent", 0.5, shifted(A, 0.01)), Prediction("dent", 0.9, shifted(A, 0.04))]]
    # Both reach A only; the more confident (though less overlapping) one takes it.
    matches = match_label("dent", predictions, truths)
    assert matches.confidences.tolist() == [0.9, 0.5]
    assert matches.correct.tolist() == [True, False]


def test_labels_do_not_match_each_other() -> None:
    truths = [[TruthBox("dent", A)]]
    result = evaluate_boxes([[Prediction("scratch", 0.9, A)]], truths, ("dent", "scratch"))
    assert result.label("dent").recall == 0.0
    assert result.label("scratch").precision == 0.0
    assert result.f1 == 0.0


def test_best_f1_threshold_and_all_point_average_precision() -> None:
    # Ranked: hit, miss, hit, hit, miss over 4 truths.
    # threshold 0.9: P 1, R 1/4, F1 0.4;  0.7: P 2/3, R 1/2, F1 4/7;  0.6: P 3/4, R 3/4, F1 0.75
    # threshold 0.5: P 3/5, R 3/4, F1 2/3.  Best F1 at 0.6.
    boxes = [(0.05 + 0.2 * index, 0.1, 0.1, 0.1) for index in range(5)]
    truths = [[TruthBox("dent", boxes[index]) for index in (0, 2, 3, 4)]]
    confidences = (0.9, 0.8, 0.7, 0.6, 0.5)
    hits = (0, 1, 2, 3, 1)  # the box each prediction lies on; 1 has no truth, and 0.5 repeats it
    predictions = [[Prediction("dent", c, boxes[h]) for c, h in zip(confidences, hits, strict=True)]]
    matches = match_label("dent", predictions, truths)
    assert matches.correct.tolist() == [True, False, True, True, False]
    assert best_f1_threshold(matches) == 0.6
    # Envelope precision 1 on recall 0..1/4 and 3/4 on 1/4..3/4; recall never reaches 1.
    assert average_precision(matches) == pytest.approx(0.25 * 1 + 0.5 * 0.75)
    result = evaluate_boxes(predictions, truths, ("dent",)).label("dent")
    assert (result.precision, result.recall, result.f1) == (0.75, 0.75, 0.75)


def test_equal_confidences_enter_together() -> None:
    truths = [[TruthBox("dent", A)]]
    predictions = [[Prediction("dent", 0.7, B), Prediction("dent", 0.7, A)]]
    matches = match_label("dent", predictions, truths)
    assert best_f1_threshold(matches) == 0.7
    assert average_precision(matches) == pytest.approx(0.5)  # one threshold: P 1/2 at R 1


def test_average_recall_rewards_tight_boxes() -> None:
    truths = [[TruthBox("dent", (0.0, 0.0, 0.4, 0.4))]]
    loose = (0.0, 0.0, 0.4, 0.52)  # IoU 0.4 * 0.4 / (0.4 * 0.52) = 0.77: found at 0.5..0.75 (6 of 10)
    result = evaluate_boxes([[Prediction("dent", 0.9, loose)]], truths, ("dent",)).label("dent")
    assert result.average_recall == pytest.approx(0.6)
    assert result.recall == 1.0


def test_nothing_to_find_and_nothing_found() -> None:
    result = evaluate_boxes([[]], [[]], ("dent",))
    label = result.label("dent")
    assert (label.threshold, label.precision, label.recall, label.average_precision) == (1.0, 0.0, 0.0, 0.0)


def test_truth_from_pixels() -> None:

    truth = TruthBox.from_pixels(Box("dent", 32, 24, 64, 48), 320, 240)
    assert truth == TruthBox("dent", (0.1, 0.1, 0.2, 0.2))
