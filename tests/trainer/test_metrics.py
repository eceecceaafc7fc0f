from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lookout_edge.trainer.metrics import (
    auroc,
    classification_metrics,
    pixel_auroc,
    segmentation_metrics,
    threshold_from_normals,
    threshold_max_f1,
)

# Scores drawn from a few values so that ties are common.
tied_scores = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
labelled_scores = st.lists(st.tuples(st.booleans(), tied_scores), min_size=2, max_size=40).filter(
    lambda pairs: len({label for label, _ in pairs}) == 2
)


def _split(pairs: list[tuple[bool, float]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([label for label, _ in pairs]), np.array([score for _, score in pairs])


def _f_beta(labels: np.ndarray, scores: np.ndarray, threshold: float, beta2: float) -> float:
    flagged = scores >= threshold
    tp = np.sum(flagged & labels)
    fp = np.sum(flagged & ~labels)
    fn = np.sum(~flagged & labels)
    return float((1 + beta2) * tp / ((1 + beta2) * tp + beta2 * fn + fp))


# --- auroc ---------------------------------------------------------------------------------------


def test_auroc_hand_computed() -> None:
    # Pairs (positive, negative): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3 of 4.
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75


def test_auroc_counts_ties_as_half() -> None:
    assert auroc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.9])) == pytest.approx(
        (0.5 + 1 + 1 + 1) / 4
    )


@given(labelled_scores)
def test_auroc_matches_pairwise_definition(pairs: list[tuple[bool, float]]) -> None:
    labels, scores = _split(pairs)
    wins = [
        1.0 if p > n else 0.5 if p == n else 0.0
        for p, n in itertools.product(scores[labels], scores[~labels])
    ]
    assert auroc(labels, scores) == pytest.approx(sum(wins) / len(wins), abs=1e-12)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1]])
def test_auroc_needs_both_classes(labels: list[int]) -> None:
    with pytest.raises(ValueError, match="both normal and anomalous"):
        auroc(np.array(labels), np.linspace(0, 1, len(labels)))


def test_auroc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="finite"):
        auroc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="shape"):
        auroc(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="0/1"):
        auroc(np.array([0, 2]), np.array([0.1, 0.2]))


# --- thresholds ----------------------------------------------------------------------------------


def test_threshold_sits_in_the_middle_of_the_separating_gap() -> None:
    assert threshold_max_f1(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.6, 0.8])) == pytest.approx(0.4)


def test_favour_recall_trades_false_alarms_for_catches() -> None:
    labels = np.array([1, 1, 0, 0, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    # F1 is 0.8 flagging >= 0.8 and 0.75 flagging all; F2 prefers flagging all (0.88 vs 0.71).
    assert threshold_max_f1(labels, scores) == pytest.approx(0.75)
    assert threshold_max_f1(labels, scores, favour_recall=True) == pytest.approx(0.25)


@pytest.mark.parametrize(("top", "expected"), [(0.9, 0.65), (0.7, 0.2), (0.8, 0.6)])
def test_equal_f1_prefers_the_widest_gap_then_the_higher(top: float, expected: float) -> None:
    # Flagging only `top` and flagging everything both give F1 = 2/3.
    labels = np.array([1, 1, 0, 0])
    scores = np.array([top, 0.4, 0.4, 0.4])
    assert threshold_max_f1(labels, scores) == pytest.approx(expected)


@settings(max_examples=200)
@given(labelled_scores, st.booleans())
def test_threshold_reaches_the_best_f_of_any_cut(
    pairs: list[tuple[bool, float]], favour_recall: bool
) -> None:
    labels, scores = _split(pairs)
    beta2 = 4.0 if favour_recall else 1.0
    threshold = threshold_max_f1(labels, scores, favour_recall)
    best = max(_f_beta(labels, scores, float(t), beta2) for t in np.unique(scores))
    assert _f_beta(labels, scores, threshold, beta2) == pytest.approx(best, abs=1e-12)
    assert threshold not in set(scores.tolist()) or threshold == 0.0


def test_threshold_max_f1_rejects_degenerate_input() -> None:
    with pytest.raises(ValueError, match="both normal and anomalous"):
        threshold_max_f1(np.array([0, 0]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="finite"):
        threshold_max_f1(np.array([0, 1]), np.array([0.1, np.nan]))


def test_threshold_max_f1_on_raw_distances() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    assert threshold_max_f1(labels, np.array([25.0, 31.0, 35.0, 38.0, 44.0])) == pytest.approx(36.5)


def test_threshold_from_normals_rule() -> None:
    assert threshold_from_normals(np.array([0.1, 0.2, 0.3])) == pytest.approx(0.3 + 0.1)
    assert threshold_from_normals(np.array([0.5])) == pytest.approx(0.52)
    assert threshold_from_normals(np.array([0.3, 0.3, 0.3])) == pytest.approx(0.32)
    assert threshold_from_normals(np.array([0.97, 0.99])) == pytest.approx(1.01)
    # Raw distances: the spread is the margin, the floor scales with the scores.
    assert threshold_from_normals(np.array([30.0, 32.0, 34.0])) == pytest.approx(36.0)
    assert threshold_from_normals(np.array([50.0])) == pytest.approx(51.0)


@given(st.lists(st.floats(0.0, 0.95), min_size=1, max_size=30))
def test_threshold_from_normals_flags_no_seen_normal(scores: list[float]) -> None:
    assert threshold_from_normals(np.array(scores)) > max(scores)


def test_threshold_from_normals_needs_scores() -> None:
    with pytest.raises(ValueError, match="at least one"):
        threshold_from_normals(np.array([]))


# --- classification ------------------------------------------------------------------------------


def _verdicts(tp: int, fp: int, tn: int, fn: int) -> tuple[np.ndarray, np.ndarray]:
    labels = [1] * tp + [0] * fp + [0] * tn + [1] * fn
    predicted = [1] * tp + [1] * fp + [0] * tn + [0] * fn
    return np.array(labels), np.array(predicted)


@pytest.mark.parametrize(
    ("counts", "precision", "recall", "f1"),
    [
        # The guide's examples: P 0.9 / R 1.0 -> F1 0.947; 0.30 / 1.0 -> 0.46; 0.95 / 0.20 -> 0.33.
        ((9, 1, 5, 0), 0.9, 1.0, 0.947),
        ((3, 7, 5, 0), 0.3, 1.0, 0.46),
        ((19, 1, 5, 76), 0.95, 0.2, 0.33),
        ((85, 15, 0, 0), 0.85, 1.0, 0.919),
    ],
)
def test_classification_metrics_match_the_guide(
    counts: tuple[int, int, int, int], precision: float, recall: float, f1: float
) -> None:
    metrics = classification_metrics(*_verdicts(*counts))
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"]) == counts
    assert metrics["precision"] == pytest.approx(precision)
    assert metrics["recall"] == pytest.approx(recall)
    assert metrics["f1"] == pytest.approx(f1, abs=0.005)


def test_classification_degenerate_cases_are_none() -> None:
    def scores(tp: int, fp: int, tn: int, fn: int) -> tuple[float | None, ...]:
        metrics = classification_metrics(*_verdicts(tp, fp, tn, fn))
        return metrics["precision"], metrics["recall"], metrics["f1"]

    assert scores(0, 0, 3, 2) == (None, 0.0, 0.0)  # anomalies exist, none flagged
    assert scores(0, 2, 3, 0) == (0.0, None, 0.0)  # no anomaly, false alarms
    assert scores(0, 0, 3, 0) == (None, None, None)  # no anomaly, none flagged


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=50))
def test_classification_matches_definitions(pairs: list[tuple[bool, bool]]) -> None:
    labels, predicted = np.array([t for t, _ in pairs]), np.array([p for _, p in pairs])
    metrics = classification_metrics(labels, predicted)
    tp = sum(t and p for t, p in pairs)
    assert metrics["tp"] + metrics["fp"] == sum(p for _, p in pairs)
    assert metrics["tp"] + metrics["fn"] == sum(t for t, _ in pairs)
    assert metrics["tp"] + metrics["fp"] + metrics["tn"] + metrics["fn"] == len(pairs)
    precision, recall = metrics["precision"], metrics["recall"]
    if precision and recall:
        assert metrics["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
        assert precision == pytest.approx(tp / sum(p for _, p in pairs))


def test_classification_rejects_mismatched_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="non-empty"):
        classification_metrics(np.array([]), np.array([]))


# --- segmentation --------------------------------------------------------------------------------


def test_segmentation_counts_on_tiny_maps() -> None:
    truth = [np.array([[0, 1], [1, 2]], np.uint8), np.array([[1, 1], [1, 0]], np.uint8)]
    pred = [np.array([[0, 1], [2, 2]], np.uint8), np.array([[0, 0], [0, 0]], np.uint8)]
    result = segmentation_metrics(iter(truth), iter(pred), ["scratch", "dent"])
    scratch, dent = result["labels"]
    # scratch: image 1 tp 1, fn 1 (predicted dent); image 2 fn 3.
    assert (scratch["tp"], scratch["fp"], scratch["fn"], scratch["test_images"]) == (1, 0, 4, 2)
    assert scratch["precision"] == 1.0
    assert scratch["recall"] == pytest.approx(1 / 5)
    assert scratch["iou"] == pytest.approx(1 / 5)
    # Per image: 1/2 then 0/3; the guide's average IoU averages images, not pixels.
    assert scratch["average_iou"] == pytest.approx(0.25)
    # dent: image 1 tp 1, fp 1; image 2 absent from truth and prediction, so not averaged.
    assert (dent["tp"], dent["fp"], dent["fn"], dent["test_images"]) == (1, 1, 0, 1)
    assert dent["f1"] == pytest.approx(2 / 3)
    assert dent["average_iou"] == pytest.approx(0.5)
    assert result["mean_iou"] == pytest.approx((0.25 + 0.5) / 2)
    assert (result["images"], result["pixels"]) == (2, 8)


def test_segmentation_mask_on_a_clean_image_counts_as_zero_overlap() -> None:
    truth = [np.zeros((2, 2), np.uint8), np.array([[1, 0], [0, 0]], np.uint8)]
    pred = [np.array([[1, 0], [0, 0]], np.uint8), np.array([[1, 0], [0, 0]], np.uint8)]
    (label,) = segmentation_metrics(truth, pred, ["crack"])["labels"]
    assert label["average_iou"] == pytest.approx(0.5)
    assert label["test_images"] == 1


def test_segmentation_label_never_seen_is_none() -> None:
    maps = [np.array([[0, 1]], np.uint8)]
    result = segmentation_metrics(maps, maps, ["crack", "stain"])
    stain = result["labels"][1]
    undefined = {key for key, value in stain.items() if value is None}
    assert undefined == {"precision", "recall", "f1", "iou", "average_iou"}
    assert result["mean_iou"] == 1.0


@settings(max_examples=50)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3))
def test_segmentation_matches_pixel_definitions(seed: int, labels: int) -> None:
    rng = np.random.default_rng(seed)
    shapes = [tuple(rng.integers(1, 6, size=2)) for _ in range(rng.integers(1, 4))]
    truth = [rng.integers(0, labels + 1, size=s).astype(np.uint8) for s in shapes]
    pred = [rng.integers(0, labels + 1, size=s).astype(np.uint8) for s in shapes]
    result = segmentation_metrics(truth, pred, [f"l{i}" for i in range(1, labels + 1)])
    t, p = np.concatenate([m.ravel() for m in truth]), np.concatenate([m.ravel() for m in pred])
    for label, metrics in enumerate(result["labels"], start=1):
        tp = int(np.sum((t == label) & (p == label)))
        fp = int(np.sum((t != label) & (p == label)))
        fn = int(np.sum((t == label) & (p != label)))
        assert (metrics["tp"], metrics["fp"], metrics["fn"]) == (tp, fp, fn)
        if tp + fp + fn:
            assert metrics["iou"] == pytest.approx(tp / (tp + fp + fn))
        ious = [
            np.sum((a == label) & (b == label)) / np.sum((a == label) | (b == label))
            for a, b in zip(truth, pred, strict=True)
            if np.any((a == label) | (b == label))
        ]
        assert metrics["average_iou"] == (pytest.approx(np.mean(ious)) if ious else None)


def test_segmentation_rejects_bad_maps() -> None:
    good = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match=r"image 0: predicted map must hold integers 0\.\.1"):
        segmentation_metrics([good], [np.full((2, 2), 2, np.uint8)], ["crack"])
    with pytest.raises(ValueError, match="image 1: maps must be 2-D and alike"):
        segmentation_metrics([good, good], [good, np.zeros((3, 2), np.uint8)], ["crack"])
    with pytest.raises(ValueError, match="no label maps"):
        segmentation_metrics([], [], ["crack"])
    with pytest.raises(ValueError):
        segmentation_metrics([good, good], [good], ["crack"])


# --- pixel auroc ---------------------------------------------------------------------------------


def _pixel_data(seed: int, images: int, side: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    masks = [rng.random((side, side)) < 0.05 for _ in range(images)]
    maps = [mask * 0.8 + rng.random(mask.shape) for mask in masks]
    return masks, maps


def test_pixel_auroc_is_exact_within_budget() -> None:
    masks, maps = _pixel_data(0, 3, 16)
    expected = auroc(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))
    assert pixel_auroc(masks, maps) == expected


def test_subsampled_pixel_auroc_is_close_and_repeatable() -> None:
    masks, maps = _pixel_data(1, 20, 64)
    exact = pixel_auroc(masks, maps)
    sampled = pixel_auroc(masks, maps, max_pixels=20_000)
    assert sampled != exact  # the subsample was really taken
    assert sampled == pytest.approx(exact, abs=0.01)
    assert pixel_auroc(masks, maps, max_pixels=20_000) == sampled


def test_pixel_auroc_rejects_degenerate_input() -> None:
    with pytest.raises(ValueError, match="both normal and anomalous"):
        pixel_auroc([np.zeros((4, 4))], [np.ones((4, 4))])
    with pytest.raises(ValueError, match="differ"):
        pixel_auroc([np.zeros((4, 4))], [np.ones((4, 3))])
    with pytest.raises(ValueError, match="as many masks as maps"):
        pixel_auroc([np.zeros((4, 4))], [])
