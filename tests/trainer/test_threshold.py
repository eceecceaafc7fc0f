"""The threshold rule and its cross-validated estimate, on synthetic score sets."""

from __future__ import annotations

import numpy as np
import pytest

from lookout_edge.trainer.metrics import threshold_from_normals, threshold_max_f1
from lookout_edge.trainer.threshold import balanced_f1, choose_threshold, cross_validate, student_t_tail


def scores(normal: int, anomalous: int, seed: int = 0, gap: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Normal scores ~ N(10, 1); anomalous ones ~ N(10 + gap, 1.5)."""
    rng = np.random.default_rng(seed)
    return rng.normal(10.0, 1.0, normal), rng.normal(10.0 + gap, 1.5, anomalous)


def unseen_f1(threshold: float, gap: float = 4.0, count: int = 100_000) -> float:
    """F1 at `threshold` on a large fresh balanced sample (as many anomalous as normal scores)."""
    normal, anomalous = scores(count, count, seed=99, gap=gap)
    return float(balanced_f1((anomalous >= threshold).mean(), (normal >= threshold).mean()))


def test_without_anomalies_it_is_the_normal_tail_rule() -> None:
    normal, _ = scores(30, 0)
    assert choose_threshold(normal, np.empty(0)) == threshold_from_normals(normal)
    estimate = cross_validate(normal, np.empty(0))
    assert estimate.f1 is None and estimate.f1_interval is None and estimate.recall is None
    assert estimate.false_alarm_rate < 0.1


@pytest.mark.parametrize("anomalous", [2, 5, 50])
def test_the_threshold_transfers_to_unseen_scores(anomalous: int) -> None:
    """Over many resampled training sets of 30 normal scores, F1 on unseen scores stays near
    the best any threshold reaches, and above the F1-optimal cut on the training scores."""
    best = max(unseen_f1(t) for t in np.linspace(10, 16, 121))
    achieved, midpoint = [], []
    for seed in range(30):
        normal, anomalies = scores(30, anomalous, seed=seed)
        achieved.append(unseen_f1(choose_threshold(normal, anomalies)))
        labels = np.r_[np.zeros(normal.size), np.ones(anomalies.size)]
        midpoint.append(unseen_f1(threshold_max_f1(labels, np.r_[normal, anomalies])))
    assert np.mean(achieved) >= {2: 0.98, 5: 0.99, 50: 0.99}[anomalous] * best
    assert np.mean(achieved) >= np.mean(midpoint)


@pytest.mark.parametrize("anomalous", [5, 10])
def test_one_extreme_defect_does_not_move_the_threshold(anomalous: int) -> None:
    """A broken part scoring far above everything else says only that the class is far: the
    threshold, and so F1 on unseen scores, stays where the other defects put it."""
    kept = []
    for seed in range(30):
        normal, anomalies = scores(30, anomalous, seed=seed)
        extreme = anomalies.copy()
        extreme[0] = 100.0
        with_it = unseen_f1(choose_threshold(normal, extreme))
        kept.append(with_it / unseen_f1(choose_threshold(normal, anomalies)))
    assert np.mean(kept) >= 0.99


@pytest.mark.parametrize(
    ("x", "degrees", "tail"),
    [
        (12.706, 1, 0.025),
        (4.303, 2, 0.025),
        (3.182, 3, 0.025),
        (2.228, 10, 0.025),
        (3.169, 10, 0.005),
        (2.045, 29, 0.025),
        (1.960, 1000, 0.025),
        (-2.228, 10, 0.975),
        (0.0, 7, 0.5),
    ],
)
def test_the_student_t_tail_matches_the_tables(x: float, degrees: int, tail: float) -> None:
    assert float(student_t_tail(np.array([x]), degrees)[0]) == pytest.approx(tail, abs=2e-5)


def test_two_anomalies_give_an_estimate_with_an_interval() -> None:
    normal, anomalous = scores(30, 2)
    assert normal.max() < choose_threshold(normal, anomalous) < anomalous.max()
    estimate = cross_validate(normal, anomalous)
    assert estimate.f1 is not None and estimate.f1_interval is not None
    low, high = estimate.f1_interval
    assert 0.0 <= low <= estimate.f1 <= high <= 1.0


def test_with_fifty_anomalies_the_interval_covers_the_unseen_f1() -> None:
    covered = 0
    for seed in range(20):
        normal, anomalous = scores(30, 50, seed=seed, gap=3.0)
        estimate = cross_validate(normal, anomalous, seed=seed)
        assert estimate.f1_interval is not None
        truth = unseen_f1(choose_threshold(normal, anomalous), gap=3.0)
        covered += estimate.f1_interval[0] <= truth <= estimate.f1_interval[1]
    assert covered >= 16


def test_favour_recall_lowers_the_threshold() -> None:
    normal, anomalous = scores(30, 10, gap=2.5)
    assert choose_threshold(normal, anomalous, favour_recall=True) < choose_threshold(normal, anomalous)


def test_favour_recall_never_flags_most_good_parts() -> None:
    """Heavily overlapping classes with a few anomalies: a miss costing four false alarms must
    still not put the threshold below the bulk of the normal scores."""
    for seed in range(30):
        normal, anomalous = scores(30, 5, seed=seed, gap=1.5)
        assert (normal >= choose_threshold(normal, anomalous, favour_recall=True)).mean() <= 0.6


def test_the_estimate_is_seeded() -> None:
    normal, anomalous = scores(30, 10, gap=2.5)
    first, again = cross_validate(normal, anomalous, seed=3), cross_validate(normal, anomalous, seed=3)
    assert (first.f1, first.f1_interval) == (again.f1, again.f1_interval)
    np.testing.assert_array_equal(first.verdicts, again.verdicts)
