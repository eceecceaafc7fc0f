"""Training: a labelled dataset in, an evaluated model package out.

1. Split. With a test set (``--test``, or ``train/`` + ``test/`` folders) the whole dataset
   trains; otherwise a seeded, stratified split holds out `TEST_NORMAL_FRACTION` of the
   normal and `TEST_ANOMALOUS_FRACTION` of the anomalous images for evaluation, as Lookout
   for Vision did with a single dataset. The test images take no part in training.
2. Features of every image (trainer/features.py).
3. Memory bank: greedy coreset of the training normals' patches (trainer/patchcore.py).
4. Calibration. Each training normal is scored against the bank without its own patches
   (what an unseen normal image would get); anomalous training images against the whole
   bank. The raw threshold maximises F1 on these scores, or, with normal images only,
   follows `threshold_from_normals`. A logistic curve maps the raw threshold to the contract's
   DEFAULT_THRESHOLD (0.5), which the manifest records, and the
   median normal score to 0.1.
5. Segmentation (masks given): the head of trainer/segmentation.py, its pixel threshold
   chosen on two-fold cross-fitted predictions over the anomalous training images.
6. Export the graph, evaluate it on the test set with ONNX Runtime, and write the package
   with its evaluation atomically.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lookout_edge.contract import DEFAULT_THRESHOLD
from lookout_edge.package import write_package
from lookout_edge.trainer.datasets import Dataset, DatasetError, Sample, load_dataset
from lookout_edge.trainer.evaluate import evaluate_model
from lookout_edge.trainer.export import TrainedModel, build_model_graph
from lookout_edge.trainer.features import FeatureExtractor, layout_for
from lookout_edge.trainer.metrics import threshold_from_normals, threshold_max_f1
from lookout_edge.trainer.patchcore import anomaly_grid, greedy_coreset, raw_score
from lookout_edge.trainer.segmentation import (
    SegmentationHead,
    best_pixel_threshold,
    patch_targets,
    train_head,
)
from lookout_edge.trainer.weights import load_pretrained_weights

log = logging.getLogger(__name__)

TEST_NORMAL_FRACTION = 1 / 3
TEST_ANOMALOUS_FRACTION = 1 / 2
# The logistic calibration puts the median normal training score at this anomaly score.
NORMAL_MEDIAN_SCORE = 0.1
# Background patches used to train the segmentation head: one in this many (they are plentiful).
NORMAL_PATCH_STRIDE = 3


@dataclass(frozen=True)
class TrainOptions:
    short_side: int = 256  # network input's short side, in pixels
    coreset_ratio: float = 0.1
    coreset_max: int = 3000
    favour_recall: bool = False
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    package: Path
    evaluation: dict[str, Any]
    seconds: dict[str, float]


def split_dataset(dataset: Dataset, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded split, stratified by normal/anomalous: (training part, test part)."""
    rng = np.random.default_rng(seed)
    train: list[Sample] = []
    test: list[Sample] = []
    for anomalous, fraction in ((False, TEST_NORMAL_FRACTION), (True, TEST_ANOMALOUS_FRACTION)):
        group = [sample for sample in dataset.samples if sample.is_anomalous == anomalous]
        order = rng.permutation(len(group))
        held_out = round(len(group) * fraction)
        test += [group[i] for i in sorted(order[:held_out])]
        train += [group[i] for i in sorted(order[held_out:])]
    return replace(dataset, samples=tuple(train)), replace(dataset, samples=tuple(test))


def _calibration(
    normal_raw: np.ndarray, anomalous_raw: np.ndarray, favour_recall: bool
) -> tuple[float, float]:
    """(centre, scale) of the logistic calibration from held-out raw scores."""
    if len(anomalous_raw):
        labels = np.concatenate([np.zeros(len(normal_raw)), np.ones(len(anomalous_raw))])
        centre = threshold_max_f1(
            labels, np.concatenate([normal_raw, anomalous_raw]), favour_recall=favour_recall
        )
    else:
        centre = threshold_from_normals(normal_raw)
    spread = centre - float(np.median(normal_raw))
    if spread <= 0:
        spread = float(np.std(normal_raw)) or 1.0
    return float(centre), spread / math.log(1 / NORMAL_MEDIAN_SCORE - 1)


class _Trainer:
    def __init__(self, dataset: Dataset, options: TrainOptions) -> None:
        self.dataset = dataset
        self.options = options
        self.layout = layout_for(dataset.height, dataset.width, options.short_side)
        self.weights = load_pretrained_weights()
        self.extract = FeatureExtractor(self.weights, self.layout)

    def features(self, samples: tuple[Sample, ...]) -> list[np.ndarray]:
        return [self.extract(self.dataset.load_image(sample)) for sample in samples]

    def fit(self, samples: tuple[Sample, ...]) -> TrainedModel:
        normals = [s for s in samples if not s.is_anomalous]
        anomalous = [s for s in samples if s.is_anomalous]
        if not normals:
            raise DatasetError(
                ["the training set holds no normal images; PatchCore learns from normal images"]
            )
        normal_features = self.features(tuple(normals))
        anomalous_features = self.features(tuple(anomalous))

        patches = np.concatenate([f.T for f in normal_features])
        origin = np.repeat(np.arange(len(normals)), self.layout.patches)
        size = min(self.options.coreset_max, max(1, int(len(patches) * self.options.coreset_ratio)))
        chosen = greedy_coreset(patches, size, self.options.seed)
        bank, bank_origin = patches[chosen], origin[chosen]
        log.info("memory bank: %d of %d normal patches", len(bank), len(patches))

        grid = self.layout.grid
        normal_maps = [
            anomaly_grid(features, bank, grid, excluded=bank_origin == index)
            for index, features in enumerate(normal_features)
        ]
        anomalous_maps = [anomaly_grid(features, bank, grid) for features in anomalous_features]
        centre, scale = _calibration(
            np.array([raw_score(m) for m in normal_maps]),
            np.array([raw_score(m) for m in anomalous_maps]),
            self.options.favour_recall,
        )
        model = TrainedModel(self.layout, bank, centre, scale)
        if self.dataset.is_segmentation and anomalous:
            head = self.segmentation_head(
                normals, normal_features, normal_maps, anomalous, anomalous_features, anomalous_maps
            )
            model = replace(model, head=head)
        return model

    def _label_map(self, sample: Sample) -> np.ndarray:
        label_map = self.dataset.load_label_map(sample)
        assert label_map is not None, "segmentation datasets give every image a label map"
        return label_map

    def segmentation_head(
        self,
        normals: list[Sample],
        normal_features: list[np.ndarray],
        normal_maps: list[np.ndarray],
        anomalous: list[Sample],
        anomalous_features: list[np.ndarray],
        anomalous_maps: list[np.ndarray],
    ) -> SegmentationHead:
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
        inputs, targets = [], []
        for features, grid_map, truth in zip(anomalous_features, anomalous_maps, truths, strict=True):
            target = patch_targets(truth, labels, grid)
            # Every patch touching a defect, and the background as thinly as on normal images.
            chosen = (target[0] < 1.0) | (np.arange(self.layout.patches) % NORMAL_PATCH_STRIDE == 0)
            inputs.append(np.concatenate([features, grid_map.reshape(1, -1)])[:, chosen])
            targets.append(target[:, chosen])

        def fit(indices: list[int]) -> SegmentationHead:
            return train_head(
                np.concatenate([normal_inputs, *(inputs[i] for i in indices)], axis=1),
                np.concatenate([normal_targets, *(targets[i] for i in indices)], axis=1),
                seed=self.options.seed,
            )

        everything = list(range(len(anomalous)))
        size = (self.dataset.height, self.dataset.width)
        if len(anomalous) >= 2:
            halves = [everything[0::2], everything[1::2]]
            maps, held_out_truths = [], []
            for fold, other in ((halves[0], halves[1]), (halves[1], halves[0])):
                head = fit(fold)
                for i in other:
                    maps.append(
                        head.pixel_maps(anomalous_features[i], anomalous_maps[i].reshape(-1), grid, size)
                    )
                    held_out_truths.append(truths[i])
            threshold = best_pixel_threshold(maps, held_out_truths, labels)
        else:
            threshold = 0.5
        return replace(fit(everything), pixel_threshold=threshold)


def train(
    dataset_path: Path,
    out_dir: Path,
    component_name: str,
    test_path: Path | None = None,
    options: TrainOptions = TrainOptions(),
) -> TrainResult:
    """Train, evaluate and package a model; the package appears at `out_dir` complete or not at all."""
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    split = load_dataset(dataset_path)
    if test_path is not None:
        test_split = load_dataset(test_path, check_counts=False)
        test = test_split.train if test_split.test is None else test_split.test
        train_set = split.train
    elif split.test is not None:
        train_set, test = split.train, split.test
    else:
        train_set, test = split_dataset(split.train, options.seed)
    if (test.width, test.height) != (train_set.width, train_set.height):
        sizes = f"{test.width}x{test.height} and {train_set.width}x{train_set.height}"
        raise DatasetError([f"the test images and the training images differ in size: {sizes}"])
    seconds["load"] = time.perf_counter() - began

    trainer = _Trainer(train_set, options)
    model = trainer.fit(train_set.samples)
    graph = build_model_graph(trainer.weights, model).SerializeToString()
    seconds["fit"] = time.perf_counter() - began - seconds["load"]

    evaluated = evaluate_model(graph, test, train_set.labels)
    seconds["evaluate"] = time.perf_counter() - began - seconds["load"] - seconds["fit"]
    manifest = {
        "component_name": component_name,
        "model_arn": f"lookout-edge:{component_name}",
        "model_type": "segmentation" if model.head is not None else "classification",
        "image": {"width": train_set.width, "height": train_set.height},
        "threshold": DEFAULT_THRESHOLD,
        "labels": [{"name": label.name, "color": label.color} for label in train_set.labels]
        if model.head is not None
        else [],
        "training": {
            "method": "PatchCore on EfficientNet-Lite0 (ImageNet) stage 2+4 features",
            "network_size": list(model.layout.network_size),
            "memory_bank": len(model.bank),
            "raw_threshold": model.centre,
            "raw_scale": model.scale,
            "pixel_threshold": model.head.pixel_threshold if model.head else None,
            "images": {"normal": train_set.normal_count, "anomalous": train_set.anomalous_count},
            "test_images": {"normal": test.normal_count, "anomalous": test.anomalous_count},
            "options": {
                "short_side": options.short_side,
                "coreset_ratio": options.coreset_ratio,
                "coreset_max": options.coreset_max,
                "favour_recall": options.favour_recall,
                "seed": options.seed,
            },
        },
        "metrics": evaluated.metrics,
    }
    files = {"model.onnx": graph, **evaluated.files()}
    package = write_package(out_dir, manifest, files)
    seconds["total"] = time.perf_counter() - began
    return TrainResult(package=package, evaluation=evaluated.metrics, seconds=seconds)
