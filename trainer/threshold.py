"""The image threshold, and the cross-validated estimate of the F1 it will reach on unseen images.

Both work on out-of-fold raw scores: each normal training image scored against the memory bank
without its own patches, each anomalous image against the whole bank (anomalies never enter
it), i.e. the scores unseen images get.

**The rule** (`choose_threshold`). A handful of scores leaves a wide range of thresholds that
all classify them equally well, and the gap between the two closest opposite scores says
little about where new scores fall. So each class's scores are smoothed into a distribution
(a Gaussian kernel density, Silverman's bandwidth; the anomalous one at least as wide as the
normal one, since two or five anomalies say little about their spread), and the threshold
maximises the expected *recall minus false-alarm rate* under them (Youden's J; with
`favour_recall` a miss counts `RECALL_WEIGHT` times as much as a false alarm). It depends
on the two rates only, not on how many anomalous images the user happened to collect: the
share of anomalies in a training set is a collection choice, not the line's defect rate.
Thresholds whose expected criterion is within half of one image's step of the best are taken
as equally good, and the middle of them is chosen: when the classes are far apart this is the
middle of the gap, the threshold with the most room for new normal images that score a little
higher than the training ones (another lighting, JPEG frames from a camera).
A threshold that sits where scores are dense on both sides loses to one in a sparse region,
which is where unseen scores are also rare.

Without anomalies it is the normal tail rule (`threshold_from_normals`: the largest normal
score plus a margin).

**The estimate** (`cross_validate`). F1 needs a share of anomalies; the estimate is for a
*balanced* set, as many anomalous images as normal ones (the guide's minimum test set is
10 + 10), computed from the two rates: F1 = 2 r / (2 r + (1 - r) + f) for recall r and
false-alarm rate f, so precision at any other share follows from the reported rates. The
point estimate is repeated, stratified K-fold cross-validation of the rule itself: the
threshold is chosen on the other folds' scores and applied to the held-out fold, the
held-out verdicts of all folds are pooled into rates per repetition, and the estimate is the
mean over repetitions. The 90 % interval is an out-of-bootstrap interval of the whole rule:
the training scores are resampled (stratified, with replacement), the rule sets a threshold
on the resample, and the F1 it reaches on the images the resample left out is recorded; the
interval spans the middle 90 % of these. It shows both how much the threshold would move with
other training images and how few images judge it, which is why it is wide with ten anomalies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lookout_edge.trainer.metrics import auroc, threshold_from_normals

FOLDS = 5
REPEATS = 20
BOOTSTRAP = 400
INTERVAL = 0.90
# Candidate thresholds on the smoothed scores' range.
CANDIDATES = 1024
# With `favour_recall`, a missed defect costs this many false alarms.
RECALL_WEIGHT = 4.0
# The logistic calibration puts the median normal training score at this anomaly score.
NORMAL_MEDIAN_SCORE = 0.1
ESTIMATE_DESCRIPTION = (
    "cross-validated estimate for a balanced set (as many anomalous as normal images), "
    f"{REPEATS} x {FOLDS}-fold; interval: out-of-bootstrap of the threshold rule"
)


def _bandwidth(values: np.ndarray) -> float:
    """Silverman's rule of thumb: 0.9 · min(sd, IQR / 1.34) · n^(-1/5)."""
    if values.size < 2:
        return 0.0
    spread = float(values.std(ddof=1))
    quartiles = np.percentile(values, [25, 75])
    iqr = float(quartiles[1] - quartiles[0]) / 1.34
    robust = min(spread, iqr) if iqr > 0 else spread
    return 0.9 * robust * values.size ** (-0.2)


def _tail_above(values: np.ndarray, bandwidth: float, thresholds: np.ndarray) -> np.ndarray:
    """P(score >= t) for each t under the Gaussian kernel density of `values`."""
    z = (values[None, :] - thresholds[:, None]) / (bandwidth * math.sqrt(2.0))
    return np.asarray(0.5 * (1.0 + _erf(z))).mean(axis=1)


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz and Stegun 7.1.26: |error| < 1.5e-7, ample for rates.
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-(x**2)))


def balanced_threshold(normal: np.ndarray, anomalous: np.ndarray, favour_recall: bool = False) -> float:
    """The threshold maximising expected recall (weighted) minus false-alarm rate; see the module."""
    scale = max(float(np.ptp(np.concatenate([normal, anomalous]))), 1e-6)
    h_normal = max(_bandwidth(normal), 1e-3 * scale)
    h_anomalous = max(_bandwidth(anomalous), h_normal)
    low = min(float(normal.min()), float(anomalous.min())) - 3 * h_anomalous
    high = max(float(normal.max()), float(anomalous.max())) + 3 * h_anomalous
    thresholds = np.linspace(low, high, CANDIDATES)
    recall = _tail_above(anomalous, h_anomalous, thresholds)
    false_alarms = _tail_above(normal, h_normal, thresholds)
    gain = (RECALL_WEIGHT if favour_recall else 1.0) * recall - false_alarms
    # Thresholds whose expected gain is within half the smallest step one image makes
    # (1 / the larger class's count) of the best are equally good on these images; the middle
    # of them is the one farthest from both classes.
    tie = 0.5 / max(normal.size, anomalous.size)
    best = np.flatnonzero(gain >= gain.max() - tie)
    return float(thresholds[best].mean())


def choose_threshold(normal: np.ndarray, anomalous: np.ndarray, favour_recall: bool = False) -> float:
    """The raw threshold (score >= threshold is anomalous) from out-of-fold scores; see the module."""
    normal = np.asarray(normal, dtype=np.float64)
    anomalous = np.asarray(anomalous, dtype=np.float64)
    if normal.size == 0:
        raise ValueError("at least one normal score is needed to set a threshold")
    if anomalous.size == 0:
        return threshold_from_normals(normal)
    return balanced_threshold(normal, anomalous, favour_recall)


def logistic_scale(normal_raw: np.ndarray, centre: float) -> float:
    """The logistic calibration's scale for raw threshold `centre`: the median normal score maps to
    NORMAL_MEDIAN_SCORE (the package's 0..1 scores keep normal images well below the threshold)."""
    spread = centre - float(np.median(normal_raw))
    if spread <= 0:
        spread = float(np.std(normal_raw)) or 1.0
    return spread / math.log(1 / NORMAL_MEDIAN_SCORE - 1)


@dataclass(frozen=True)
class Calibration:
    """What the out-of-fold scores of a model's images set: its raw threshold, the logistic
    scale of its 0..1 scores, and the cross-validated estimate of its verdicts."""

    centre: float
    scale: float
    estimate: Estimate


def calibration_from_scores(
    normal_raw: np.ndarray, anomalous_raw: np.ndarray, favour_recall: bool, seed: int
) -> Calibration:
    """The threshold rule, the calibration and the estimate on out-of-fold raw scores."""
    centre = choose_threshold(normal_raw, anomalous_raw, favour_recall)
    estimate = cross_validate(normal_raw, anomalous_raw, favour_recall, seed)
    return Calibration(centre, logistic_scale(normal_raw, centre), estimate)


def balanced_f1(recall: np.ndarray | float, false_alarm_rate: np.ndarray | float) -> np.ndarray:
    """F1 of a set with as many anomalous as normal images, from the two rates."""
    recall = np.asarray(recall, dtype=np.float64)
    denominator = 2 * recall + (1 - recall) + np.asarray(false_alarm_rate, dtype=np.float64)
    return np.asarray(2 * recall / np.maximum(denominator, 1e-12))


@dataclass(frozen=True)
class Estimate:
    """Cross-validated verdict quality; rates are None where undefined (e.g. F1 without anomalies)."""

    f1: float | None
    f1_interval: tuple[float, float] | None
    precision: float | None  # of a balanced set
    recall: float | None
    false_alarm_rate: float
    verdicts: np.ndarray  # [N + A] the first repetition's out-of-fold verdicts (normals first)
    folds: int
    repeats: int

    def metrics(self) -> dict[str, Any]:
        """The manifest's `metrics.classification`."""
        return {
            "f1": self.f1,
            "f1_interval": list(self.f1_interval) if self.f1_interval else None,
            "f1_interval_level": INTERVAL,
            "precision": self.precision,
            "recall": self.recall,
            "false_alarm_rate": self.false_alarm_rate,
            "estimate": ESTIMATE_DESCRIPTION,
        }


def _stratified_folds(normal: int, anomalous: int, folds: int, rng: np.random.Generator) -> np.ndarray:
    """Each class dealt round-robin over the folds in a random order, the anomalies starting where
    the normals stopped so that fold sizes stay even."""
    fold_of = np.empty(normal + anomalous, dtype=np.intp)
    fold_of[:normal] = rng.permutation(normal) % folds
    fold_of[normal:] = (rng.permutation(anomalous) + normal) % folds
    return fold_of


def _out_of_bootstrap_interval(
    normal: np.ndarray, anomalous: np.ndarray, favour_recall: bool, rng: np.random.Generator
) -> tuple[float, float]:
    values = []
    for _ in range(BOOTSTRAP):
        pick_normal = rng.integers(0, normal.size, normal.size)
        pick_anomalous = rng.integers(0, anomalous.size, anomalous.size)
        left_normal = np.setdiff1d(np.arange(normal.size), pick_normal)
        left_anomalous = np.setdiff1d(np.arange(anomalous.size), pick_anomalous)
        if not left_normal.size or not left_anomalous.size:
            continue
        threshold = choose_threshold(normal[pick_normal], anomalous[pick_anomalous], favour_recall)
        recall = float((anomalous[left_anomalous] >= threshold).mean())
        false_alarms = float((normal[left_normal] >= threshold).mean())
        values.append(float(balanced_f1(recall, false_alarms)))
    if not values:  # one image of a class: nothing is ever left out
        return 0.0, 1.0
    tail = (1 - INTERVAL) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def cross_validate(
    normal: np.ndarray,
    anomalous: np.ndarray,
    favour_recall: bool = False,
    seed: int = 0,
    folds: int = FOLDS,
    repeats: int = REPEATS,
) -> Estimate:
    """Repeated stratified K-fold estimate of the rule's F1 on unseen images; see the module."""
    normal = np.asarray(normal, dtype=np.float64)
    anomalous = np.asarray(anomalous, dtype=np.float64)
    folds = max(2, min(folds, normal.size))
    rng = np.random.default_rng(seed)
    truth = np.r_[np.zeros(normal.size, bool), np.ones(anomalous.size, bool)]
    scores = np.r_[normal, anomalous]
    verdicts = np.zeros((repeats, scores.size), dtype=bool)
    for repeat in range(repeats):
        fold_of = _stratified_folds(normal.size, anomalous.size, folds, rng)
        for fold in range(folds):
            held = fold_of == fold
            threshold = choose_threshold(scores[~held & ~truth], scores[~held & truth], favour_recall)
            verdicts[repeat, held] = scores[held] >= threshold
    false_alarm_rate = verdicts[:, ~truth].mean(axis=1)
    if not anomalous.size:
        return Estimate(None, None, None, None, float(false_alarm_rate.mean()), verdicts[0], folds, repeats)
    recall = verdicts[:, truth].mean(axis=1)
    f1 = float(balanced_f1(recall, false_alarm_rate).mean())
    low, high = _out_of_bootstrap_interval(normal, anomalous, favour_recall, rng)
    flagged = recall + false_alarm_rate
    precision = recall / np.where(flagged > 0, flagged, np.nan)
    return Estimate(
        f1=f1,
        # The interval holds the point estimate (it may sit outside the bootstrap's middle 90 %
        # when the rule is nearly perfect on every resample).
        f1_interval=(min(low, f1), max(high, f1)),
        precision=float(np.nanmean(precision)) if np.isfinite(precision).any() else None,
        recall=float(recall.mean()),
        false_alarm_rate=float(false_alarm_rate.mean()),
        verdicts=verdicts[0],
        folds=folds,
        repeats=repeats,
    )


def estimate_metrics(
    estimate: Estimate, normal_raw: np.ndarray, anomalous_raw: np.ndarray, what: str
) -> dict[str, Any]:
    """The manifest's `metrics`: the cross-validated estimate of the threshold rule on these
    out-of-fold raw scores, and their AUROC; `what` says which images they are."""
    metrics: dict[str, Any] = {
        "estimate": what,
        "images": {"normal": len(normal_raw), "anomalous": len(anomalous_raw)},
        "classification": estimate.metrics(),
    }
    if len(anomalous_raw):
        truth = np.r_[np.zeros(len(normal_raw)), np.ones(len(anomalous_raw))]
        metrics["auroc"] = auroc(truth, np.r_[normal_raw, anomalous_raw])
    return metrics
