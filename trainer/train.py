"""Training: a labelled dataset in, an evaluated model package out.

Every labelled image serves the delivered model: nothing is held out.

1. Features of every training image (trainer/features.py), extracted once.
2. Memory bank: greedy coreset of all the normal images' patches (trainer/bank.py; streamed
   in two stages for thousands of images).
3. Out-of-fold maps and scores. Each normal image is scored against the bank without its own
   patches (what an unseen normal image gets), each anomalous image against the whole bank
   (anomalies never enter it). The normals' maps measure the per-position normalisation
   (trainer/normalise.py), and every score and the segmentation head's distance input come
   from the normalised maps, as in the graph.
4. Threshold and estimate (trainer/threshold.py): the raw threshold comes from the
   out-of-fold scores of all images; repeated stratified cross-validation of that rule gives
   the F1 to expect on unseen images and its interval. A logistic curve maps the raw threshold
   to the contract's DEFAULT_THRESHOLD (0.5), which the manifest records, and the median
   normal score to 0.1.
5. Segmentation (masks given): the head of trainer/segmentation.py on all anomalous images,
   its pixel threshold chosen on two-fold cross-fitted predictions over them.
6. Export the graph. With a test set (``--test``, or ``train/`` + ``test/`` folders) it is
   evaluated there with ONNX Runtime; without one, the report shows the out-of-fold results.
   The package is written with its evaluation atomically.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lookout_edge.contract import DEFAULT_THRESHOLD, verdict_label_map
from lookout_edge.package import SELF_CHECK_KEY, AnomalyLabel, write_package
from lookout_edge.trainer.bank import BankBuilder, BankOptions
from lookout_edge.trainer.datasets import (
    Dataset,
    DatasetError,
    DatasetSplit,
    Sample,
    check_counts,
    load_dataset,
)
from lookout_edge.trainer.evaluate import Evaluated, evaluate_model
from lookout_edge.trainer.export import TrainedModel, build_model_graph
from lookout_edge.trainer.features import FeatureExtractor, layout_for
from lookout_edge.trainer.metrics import auroc, classification_metrics, pixel_auroc, segmentation_metrics
from lookout_edge.trainer.normalise import fit_normalisation
from lookout_edge.trainer.patchcore import anomaly_grid, calibrated_score
from lookout_edge.trainer.progress import QUIET, Progress
from lookout_edge.trainer.region import REGION_FILE, load_region, mask_pixel_maps
from lookout_edge.trainer.report import ReportItem
from lookout_edge.trainer.segmentation import (
    SegmentationHead,
    best_pixel_threshold,
    patch_targets,
    train_head,
)
from lookout_edge.trainer.selfcheck import choose_references, reference_checks
from lookout_edge.trainer.state import STATE_NAME, HeadTraining, TrainerState, image_hash, save_state
from lookout_edge.trainer.threshold import Estimate, calibration_from_scores, estimate_metrics
from lookout_edge.trainer.weights import load_pretrained_weights

log = logging.getLogger(__name__)

# Background patches used to train the segmentation head: one in this many (they are plentiful).
NORMAL_PATCH_STRIDE = 3


@dataclass(frozen=True)
class TrainOptions:
    short_side: int = 256  # network input's short side, in pixels
    coreset_ratio: float = 0.1
    coreset_max: int = 3000
    favour_recall: bool = False
    seed: int = 0
    region: Path | None = None  # the inspection region's file (trainer/region.py)


@dataclass(frozen=True)
class TrainResult:
    package: Path
    evaluation: dict[str, Any]
    seconds: dict[str, float]


@dataclass(frozen=True)
class CrossFitted:
    """Anomalous images' segmentation from heads that did not see them (two-fold)."""

    truths: list[np.ndarray]  # [H, W] label maps
    anomaly: list[np.ndarray]  # [H, W] P(anomaly)
    predicted: list[np.ndarray]  # [H, W] label maps at the pixel threshold


@dataclass(frozen=True)
class Fitted:
    """The delivered model and what the training images tell about it on unseen images."""

    model: TrainedModel
    normals: tuple[Sample, ...]
    anomalous: tuple[Sample, ...]
    normal_raw: np.ndarray  # out-of-fold raw scores
    anomalous_raw: np.ndarray
    estimate: Estimate
    segmentation: CrossFitted | None
    state: TrainerState | None = None  # what `calibrate` and `update` start from (trainer/state.py)


def _full(features: np.ndarray) -> np.ndarray:
    """Features in float32, whatever they are stored in."""
    return features.astype(np.float32, copy=False)


class _Trainer:
    def __init__(self, dataset: Dataset, options: TrainOptions, progress: Progress = QUIET) -> None:
        self.dataset = dataset
        self.options = options
        self.region = load_region(options.region, dataset.width, dataset.height)
        self.layout = layout_for(dataset.height, dataset.width, options.short_side)
        self.weights = load_pretrained_weights()
        self.extract = FeatureExtractor(self.weights, self.layout)
        self.hashes: dict[Path, str] = {}  # image path -> trainer/state.py's image_hash
        self.progress = progress

    def features(
        self,
        samples: tuple[Sample, ...],
        step: str,
        storage: type[np.floating[Any]],
        bank: BankBuilder | None = None,
    ) -> list[np.ndarray]:
        """Each sample's [C, P] patch features, extracted once, kept as `storage` and also added
        to `bank`.

        With a streamed bank (thousands of images) they are kept in float16, halving the
        largest array of training; scoring computes in float32 (`_full`).
        """
        features = []
        for sample in self.progress.each(step, samples):
            image = self.dataset.load_image(sample)
            self.hashes[sample.image_path] = image_hash(image)
            extracted = self.extract(image)
            if bank is not None:
                bank.add(extracted)
            features.append(extracted.astype(storage, copy=False))
        return features

    def fit(self, samples: tuple[Sample, ...]) -> Fitted:
        normals = tuple(s for s in samples if not s.is_anomalous)
        anomalous = tuple(s for s in samples if s.is_anomalous)
        if not normals:
            raise DatasetError(
                ["the training set holds no normal images; PatchCore learns from normal images"]
            )
        options = self.options
        builder = BankBuilder(
            BankOptions(options.coreset_ratio, options.coreset_max, options.seed),
            expected_images=len(normals),
            patches_per_image=self.layout.patches,
        )
        storage = np.float16 if builder.streamed else np.float32
        normal_features = self.features(normals, "features of normal images", storage, builder)
        anomalous_features = self.features(anomalous, "features of anomalous images", storage)
        bank, bank_origin = builder.build()
        log.info(
            "memory bank: %d of %d normal patches%s",
            len(bank),
            len(normals) * self.layout.patches,
            " (streamed coreset)" if builder.streamed else "",
        )

        grid = self.layout.grid
        normal_grids = _stacked(
            [
                anomaly_grid(_full(features), bank, grid, excluded=bank_origin == index)
                for index, features in enumerate(self.progress.each("scoring normal images", normal_features))
            ],
            grid,
        )
        anomalous_grids = _stacked(
            [
                anomaly_grid(_full(features), bank, grid)
                for features in self.progress.each("scoring anomalous images", anomalous_features)
            ],
            grid,
        )
        # The normalisation is measured on the leave-one-out maps of the normals, and everything
        # after it (scores, threshold, segmentation head) sees the normalised maps, as the graph.
        uncalibrated = TrainedModel(
            self.layout, bank, 0.0, 1.0, region=self.region, normalisation=fit_normalisation(normal_grids)
        )
        normal_raw = uncalibrated.raw_scores(normal_grids)
        anomalous_raw = uncalibrated.raw_scores(anomalous_grids)
        calibration = calibration_from_scores(normal_raw, anomalous_raw, options.favour_recall, options.seed)
        estimate = calibration.estimate
        model = replace(uncalibrated, centre=calibration.centre, scale=calibration.scale)
        crossfitted = None
        head_training: HeadTraining | None = None
        if self.dataset.is_segmentation and anomalous:
            head, crossfitted, head_training = self.segmentation_head(
                normal_features,
                list(model.normalised(normal_grids)),
                anomalous,
                anomalous_features,
                list(model.normalised(anomalous_grids)),
            )
            model = replace(model, head=head)
        state = TrainerState(
            model=model,
            options=asdict(self.options),
            normal_hashes=tuple(self.hashes[s.image_path] for s in normals),
            anomalous_hashes=tuple(self.hashes[s.image_path] for s in anomalous),
            bank_origin=bank_origin,
            normal_maps=normal_grids,
            anomalous_maps=anomalous_grids,
            head_training=head_training,
        )
        return Fitted(model, normals, anomalous, normal_raw, anomalous_raw, estimate, crossfitted, state)

    def _label_map(self, sample: Sample) -> np.ndarray:
        label_map = self.dataset.load_label_map(sample)
        assert label_map is not None, "segmentation datasets give every image a label map"
        return label_map

    def segmentation_head(
        self,
        normal_features: list[np.ndarray],
        normal_maps: list[np.ndarray],
        anomalous: tuple[Sample, ...],
        anomalous_features: list[np.ndarray],
        anomalous_maps: list[np.ndarray],
    ) -> tuple[SegmentationHead, CrossFitted | None, HeadTraining]:
        labels = len(self.dataset.labels)
        grid = self.layout.grid
        keep = np.arange(0, self.layout.patches, NORMAL_PATCH_STRIDE)
        normal_inputs = np.concatenate(
            [
                np.concatenate([f, m.reshape(1, -1)])[:, keep]
                for f, m in zip(normal_features, normal_maps, strict=True)
            ],
            axis=1,
        )
        normal_targets = np.zeros((labels + 1, normal_inputs.shape[1]))
        normal_targets[0] = 1.0
        truths = [self._label_map(sample) for sample in anomalous]
        inputs, targets, positions = [], [], []
        for features, grid_map, truth in zip(anomalous_features, anomalous_maps, truths, strict=True):
            target = patch_targets(truth, labels, grid)
            chosen = anomalous_head_patches(target)
            inputs.append(np.concatenate([features, grid_map.reshape(1, -1)])[:, chosen])
            targets.append(target[:, chosen])
            positions.append(chosen)

        def fit(indices: list[int]) -> SegmentationHead:
            return train_head(
                np.concatenate([normal_inputs, *(inputs[i] for i in indices)], axis=1),
                np.concatenate([normal_targets, *(targets[i] for i in indices)], axis=1),
                seed=self.options.seed,
            )

        everything = list(range(len(anomalous)))
        size = (self.dataset.height, self.dataset.width)
        if len(anomalous) < 2:
            return (
                fit(everything),
                None,
                HeadTraining(
                    normal_inputs,
                    tuple(inputs),
                    tuple(targets),
                    tuple(positions),
                    np.zeros(len(inputs), np.intp),
                    None,
                ),
            )
        maps: list[tuple[np.ndarray, np.ndarray]] = [(np.empty(0), np.empty(0))] * len(anomalous)
        first, second = _two_folds_by_label(truths)
        fold_heads = []
        for fold, other in ((first, second), (second, first)):
            head = fit(fold)
            fold_heads.append(head)
            for i in other:
                pixel_maps = head.pixel_maps(anomalous_features[i], anomalous_maps[i].reshape(-1), grid, size)
                maps[i] = mask_pixel_maps(self.region, pixel_maps)
        head = replace(fit(everything), pixel_threshold=best_pixel_threshold(maps, truths, labels))
        crossfitted = CrossFitted(
            truths=truths,
            anomaly=[anomaly for anomaly, _ in maps],
            predicted=[head.label_map(anomaly, label) for anomaly, label in maps],
        )
        fold_of = np.isin(np.arange(len(anomalous)), second).astype(np.intp)
        head_training = HeadTraining(
            normal_inputs,
            tuple(inputs),
            tuple(targets),
            tuple(positions),
            fold_of,
            (fold_heads[0], fold_heads[1]),
        )
        return head, crossfitted, head_training


def anomalous_head_patches(target: np.ndarray) -> np.ndarray:
    """The patch indices of an anomalous image the head trains on, from its targets [K + 1, P]:
    every patch touching a defect, and the background as thinly as on normal images."""
    patches = target.shape[1]
    return np.flatnonzero((target[0] < 1.0) | (np.arange(patches) % NORMAL_PATCH_STRIDE == 0))


def _stacked(grid_maps: list[np.ndarray], grid: tuple[int, int]) -> np.ndarray:
    """[n, rows, cols] float32, also for no map at all."""
    return np.array(grid_maps, dtype=np.float32).reshape(len(grid_maps), *grid)


def _two_folds_by_label(truths: list[np.ndarray]) -> tuple[list[int], list[int]]:
    """Two halves of the anomalous images, each label's images dealt alternately into both.

    A head fitted on one half predicts the other; dealing by position instead can put every
    image of a label into one half (datasets are often sorted or interleaved by label), and a
    head that never saw a label cannot paint it.
    """
    dominant = [int(np.bincount(t.reshape(-1), minlength=2)[1:].argmax()) + 1 for t in truths]
    halves: tuple[list[int], list[int]] = ([], [])
    dealt = 0
    for label in sorted(set(dominant)):
        for index in (i for i, d in enumerate(dominant) if d == label):
            halves[dealt % 2].append(index)
            dealt += 1
    return sorted(halves[0]), sorted(halves[1])


def _out_of_fold_evaluation(dataset: Dataset, fitted: Fitted, labels: tuple[AnomalyLabel, ...]) -> Evaluated:
    """The report without a test set: every training image with its out-of-fold score and verdict.

    Verdicts are those of the first cross-validation repetition (the threshold chosen without
    the image's fold); masks are those of the cross-fitted segmentation heads, on anomalous
    images only (normal images trained every head).
    """
    model = fitted.model
    samples = fitted.normals + fitted.anomalous
    raw = np.r_[fitted.normal_raw, fitted.anomalous_raw]
    scores = calibrated_score(raw, model.centre, model.scale)
    verdicts = fitted.estimate.verdicts
    truth = np.array([sample.is_anomalous for sample in samples])
    segmentation = fitted.segmentation
    predicted_maps: list[np.ndarray] = []
    items = []
    for index, sample in enumerate(samples):
        true_map = predicted_map = None
        if segmentation is not None and sample.is_anomalous:
            at = index - len(fitted.normals)
            true_map = segmentation.truths[at]
            predicted_map = verdict_label_map(segmentation.predicted[at], bool(verdicts[index]))
            predicted_maps.append(predicted_map)
        items.append(
            ReportItem(
                name=sample.image_path.name,
                image=dataset.load_image(sample),
                is_anomalous=sample.is_anomalous,
                score=float(scores[index]),
                predicted=bool(verdicts[index]),
                label_map_true=true_map,
                label_map_pred=predicted_map,
                labels=labels if predicted_map is not None else (),
                region=None if fitted.model.region is None else fitted.model.region.pixels,
            )
        )
    metrics: dict[str, Any] = {
        "threshold": DEFAULT_THRESHOLD,
        "evaluated_on": "the training images, out of fold (no test set)",
        "images": {"normal": int((~truth).sum()), "anomalous": int(truth.sum())},
        "classification": classification_metrics(truth, verdicts),
    }
    if truth.any():
        metrics["auroc"] = auroc(truth, raw)
    if segmentation is not None:
        metrics["pixel_auroc"] = pixel_auroc(segmentation.truths, segmentation.anomaly)
        metrics["segmentation"] = segmentation_metrics(
            segmentation.truths, predicted_maps, [label.name for label in labels]
        )
    return Evaluated(metrics, items)


def train(
    dataset_path: Path,
    out_dir: Path,
    component_name: str,
    test_path: Path | None = None,
    options: TrainOptions = TrainOptions(),
    progress: Progress = QUIET,
) -> TrainResult:
    """Train, evaluate and package a model; the package appears at `out_dir` complete or not at all.

    `progress` shows the long steps (features, scoring) as they go; the CLI enables it on a
    terminal.
    """
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    split = load_dataset(dataset_path, check_counts=test_path is None)
    test: Dataset | None = split.test
    train_set = split.train
    if test_path is not None:
        test_split = load_dataset(test_path, check_counts=False)
        test = test_split.train if test_split.test is None else test_split.test
        check_counts(DatasetSplit(train_set, test))
    if test is not None and (test.width, test.height) != (train_set.width, train_set.height):
        sizes = f"{test.width}x{test.height} and {train_set.width}x{train_set.height}"
        raise DatasetError([f"the test images and the training images differ in size: {sizes}"])
    seconds["load"] = time.perf_counter() - began

    trainer = _Trainer(train_set, options, progress)
    fitted = trainer.fit(train_set.samples)
    model = fitted.model
    graph = build_model_graph(trainer.weights, model).SerializeToString()
    seconds["fit"] = time.perf_counter() - began - seconds["load"]

    metrics = estimate_metrics(
        fitted.estimate,
        fitted.normal_raw,
        fitted.anomalous_raw,
        "cross-validated on the training images (out-of-fold scores)",
    )
    labels = train_set.labels if model.head is not None else ()
    if test is None:
        evaluated = _out_of_fold_evaluation(train_set, fitted, labels)
    else:
        # The report shows where the model looks.
        region = None if model.region is None else model.region.pixels
        evaluated = evaluate_model(graph, test, train_set.labels, region=region)
        metrics["test"] = evaluated.metrics
    # The package checks itself (trainer/selfcheck.py): a few training images, the graph's outputs.
    samples = fitted.normals + fitted.anomalous
    out_of_fold = calibrated_score(np.r_[fitted.normal_raw, fitted.anomalous_raw], model.centre, model.scale)
    picked = choose_references(list(out_of_fold), [sample.is_anomalous for sample in samples])
    self_check, self_check_files = reference_checks(
        graph, [(samples[i].image_path.name, train_set.load_image(samples[i])) for i in picked]
    )
    seconds["evaluate"] = time.perf_counter() - began - seconds["load"] - seconds["fit"]
    manifest = {
        "component_name": component_name,
        "model_arn": f"lookout-edge:{component_name}",
        "model_type": "segmentation" if model.head is not None else "classification",
        "image": {"width": train_set.width, "height": train_set.height},
        "threshold": DEFAULT_THRESHOLD,
        "labels": [{"name": label.name, "color": label.color} for label in labels],
        "region": None if model.region is None else model.region.manifest(),
        "training": {
            "method": "PatchCore on EfficientNet-Lite0 (ImageNet) stage 2+4 features",
            "network_size": list(model.layout.network_size),
            "memory_bank": len(model.bank),
            "raw_threshold": model.centre,
            "raw_scale": model.scale,
            "pixel_threshold": model.head.pixel_threshold if model.head else None,
            "images": {"normal": train_set.normal_count, "anomalous": train_set.anomalous_count},
            "test_images": None
            if test is None
            else {"normal": test.normal_count, "anomalous": test.anomalous_count},
            "options": {
                "short_side": options.short_side,
                "coreset_ratio": options.coreset_ratio,
                "coreset_max": options.coreset_max,
                "favour_recall": options.favour_recall,
                "seed": options.seed,
            },
        },
        "metrics": metrics,
        SELF_CHECK_KEY: self_check,
    }
    files = {"model.onnx": graph, **evaluated.files(), **self_check_files}
    if model.region is not None:
        files[REGION_FILE] = model.region.png()
    if fitted.state is not None:
        files[STATE_NAME] = save_state(fitted.state, graph)
    package = write_package(out_dir, manifest, files)
    seconds["total"] = time.perf_counter() - began
    return TrainResult(package=package, evaluation=evaluated.metrics, seconds=seconds)
