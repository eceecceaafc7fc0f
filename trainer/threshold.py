"""The image threshold, and the cross-validated estimate of the F1 it will reach on unseen images.

Both work on out-of-fold raw scores: each normal training image scored against the memory bank
without its own patches, each anomalous image against the whole bank (anomalies never enter
it), i.e. the scores unseen images get.

**The rule** (`choose_threshold`). A handful of scores leaves a wide range of thresholds that
all classify them equally well, and the gap between the two closest opposite scores says
little about where new scores fall. So each class is summarised by the distribution a *new*
score of that class follows, given the training scores: the Student-t posterior predictive of a
normal sample (location the mean, scale the standard deviation times sqrt(1 + 1/n), n - 1
degrees of freedom), which carries the uncertainty that few images leave about both the
class's centre and its spread. With two or five anomalies it has one or four degrees of
freedom, so its lower tail is heavy: the rule expects unseen defects that score lower than any
it was shown. The anomalous one is at least as wide as the normal one, and anomalous scores are
capped at the normals' mean plus `ANOMALY_CAP` normal scales before it is fitted: far beyond the
normals a defect only says that the class is far, and one broken part scoring a hundred times
higher must not stretch the fitted distribution away from where it meets the normals. The
threshold maximises the expected *recall minus false-alarm rate* under the two distributions
(Youden's J; with `favour_recall` a miss counts `RECALL_WEIGHT` times as much as a false
alarm): it sits where the two predictive densities cross, and never below the normals' mean
(flagging most good parts is no operating point). It depends on the two rates only,
not on how many anomalous images the user happened to collect: the share of anomalies in a
training set is a collection choice, not the line's defect rate.

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
# Candidate thresholds from the normals' mean to 3 anomalous scales above the highest score.
CANDIDATES = 1024
# Anomalous scores are capped this many normal predictive scales above the normals' mean.
ANOMALY_CAP = 10.0
# Beyond this many degrees of freedom the Student t tail is taken as the normal one.
GAUSSIAN_DEGREES = 100
# With `favour_recall`, a missed defect costs this many false alarms.
RECALL_WEIGHT = 4.0
# The logistic calibration puts the median normal training score at this anomaly score.
NORMAL_MEDIAN_SCORE = 0.1
ESTIMATE_DESCRIPTION = (
    "cross-validated estimate for a balanced set (as many anomalous as normal images), "
    f"{REPEATS} x {FOLDS}-fold; interval: out-of-bootstrap of the threshold rule"
)


def student_t_tail(x: np.ndarray, degrees: int) -> np.ndarray:
    """P(T >= x) for a standard Student t with a whole number of degrees of freedom.

    The closed forms of Abramowitz and Stegun 26.7.3 / 26.7.4 (a finite series in cos(theta),
    theta = arctan(x / sqrt(degrees))); above `GAUSSIAN_DEGREES` the normal tail, which differs
    by less than 0.002 there.
    """
    x = np.asarray(x, dtype=np.float64)
    if degrees > GAUSSIAN_DEGREES:
        return np.asarray(0.5 * (1.0 - _erf(x / math.sqrt(2.0))))
    theta = np.arctan(x / math.sqrt(degrees))
    cos2 = np.cos(theta) ** 2
    if degrees % 2:  # odd: (2 / pi) (theta + sin cos (1 + 2/3 cos^2 + 2·4/(3·5) cos^4 + ...))
        term = np.ones_like(x)
        total = np.ones_like(x) if degrees > 1 else np.zeros_like(x)
        for k in range(1, (degrees - 1) // 2):
            term = term * (2 * k) / (2 * k + 1) * cos2
            total = total + term
        inside = 2.0 / math.pi * (theta + np.sin(theta) * np.cos(theta) * total)
    else:  # even: sin (1 + 1/2 cos^2 + 1·3/(2·4) cos^4 + ...)
        term = np.ones_like(x)
        total = np.ones_like(x)
        for k in range(1, degrees // 2):
            term = term * (2 * k - 1) / (2 * k) * cos2
            total = total + term
        inside = np.sin(theta) * total
    return np.asarray(0.5 * (1.0 - inside))


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz and Stegun 7.1.26: |error| < 1.5e-7, ample for rates.
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-(x**2)))


@dataclass(frozen=True)
class Predictive:
    """The Student-t posterior predictive of one class's next score."""

    location: float
    scale: float
    degrees: int

    @classmethod
    def of(cls, scores: np.ndarray, floor: float) -> Predictive:
        """The predictive of `scores`, its scale at least `floor` (one score has no spread)."""
        n = scores.size
        spread = float(scores.std(ddof=1)) * math.sqrt(1.0 + 1.0 / n) if n > 1 else 0.0
        return cls(float(scores.mean()), max(spread, floor), max(n - 1, 1))

    def tail(self, thresholds: np.ndarray) -> np.ndarray:
        """P(next score >= t) for each threshold t."""
        return student_t_tail((thresholds - self.location) / self.scale, self.degrees)


def balanced_threshold(normal: np.ndarray, anomalous: np.ndarray, favour_recall: bool = False) -> float:
    """The threshold maximising expected recall (weighted) minus false-alarm rate; see the module."""
    scale = max(float(np.ptp(np.concatenate([normal, anomalous]))), 1e-6)
    normals = Predictive.of(normal, 1e-3 * scale)
    capped = np.minimum(anomalous, normals.location + ANOMALY_CAP * normals.scale)
    anomalies = Predictive.of(capped, normals.scale)
    # Never below the normals' centre: a threshold that flags most good parts is no operating
    # point, and it is where a heavy anomalous tail would otherwise drag a weighted criterion.
    low = normals.location
    high = max(float(normal.max()), float(capped.max())) + 3 * anomalies.scale
    thresholds = np.linspace(low, high, CANDIDATES)
    gain = (RECALL_WEIGHT if favour_recall else 1.0) * anomalies.tail(thresholds) - normals.tail(thresholds)
    return float(thresholds[int(np.argmax(gain))])


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
