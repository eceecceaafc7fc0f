"""New versions of a trained model without retraining it: `calibrate` and `update`.

Both read the package's trainer state (trainer/state.py), rebuild the graph with
trainer/export.py's `build_model_graph`, and write a new package next to the input, atomically
(`write_package`); the input package is only read. The new manifest says where it came from
(`lineage`) and what changed, and its `model_arn` carries the next version number.

**calibrate** re-chooses the image threshold, and for a segmentation model the head's pixel
threshold, from a labelled dataset, keeping the memory bank and the head's weights. Its images
are scored the way the training images were, out of fold: an image the model was trained on
(recognised by the hash of its pixels) is scored against the bank without its own patches, and
its mask predicted by the cross-fitting head that did not see it. Calibrating on the training
images therefore gives back the training thresholds, and a dataset mixing the training images
with new ones pools both. The thresholds follow the trainer's rules (trainer/threshold.py,
`best_pixel_threshold`), and the estimate in the manifest is their cross-validation on these
images.

**update** adds images to the model. Added normal images' patches join the memory bank: the
greedy coreset is taken again over the bank and the new patches, to the trainer's size rule
on the union. The threshold is chosen again on the union of out-of-fold scores: the stored ones
of the training images and those of the added images against the new bank. Anomalous images
enter the calibration and, with their masks, the segmentation head, which is retrained on its
stored inputs and the new ones. Images the model already holds are recognised and skipped, so
an update that adds nothing rebuilds the same graph. Two approximations, measured against a full
retrain in docs/trainer.md: the training images' scores are not recomputed against the larger
bank (their features are not kept), and the head's pixel threshold is kept (choose it again with
`calibrate` on labelled images the head did not see).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lookout_edge.contract import DEFAULT_THRESHOLD
from lookout_edge.package import (
    MANIFEST_NAME,
    SELF_CHECK_KEY,
    ModelPackage,
    PackageError,
    read_package,
    write_package,
)
from lookout_edge.trainer.datasets import Dataset, DatasetError, Sample, load_dataset
from lookout_edge.trainer.evaluate import evaluate_model, label_remap
from lookout_edge.trainer.export import TrainedModel, build_model_graph
from lookout_edge.trainer.features import FeatureExtractor, FeatureLayout
from lookout_edge.trainer.normalise import fit_normalisation
from lookout_edge.trainer.patchcore import anomaly_grid, calibrated_score, greedy_coreset
from lookout_edge.trainer.region import REGION_FILE, mask_pixel_maps
from lookout_edge.trainer.segmentation import (
    SegmentationHead,
    best_pixel_threshold,
    patch_targets,
    train_head,
)
from lookout_edge.trainer.selfcheck import choose_references, reference_checks
from lookout_edge.trainer.state import (
    STATE_NAME,
    HeadTraining,
    TrainerState,
    image_hash,
    load_state,
    save_state,
)
from lookout_edge.trainer.threshold import Estimate, calibration_from_scores, estimate_metrics
from lookout_edge.trainer.train import NORMAL_PATCH_STRIDE, anomalous_head_patches
from lookout_edge.trainer.weights import load_pretrained_weights

_VERSION = re.compile(r"([:/])(\d+)$")


@dataclass(frozen=True)
class Revised:
    package: Path
    evaluation: dict[str, Any]  # the new graph on the given images (evaluation.json)
    changes: dict[str, Any]  # what differs from the input package: {key: {"from": ..., "to": ...}}
    seconds: float


@dataclass(frozen=True)
class _Image:
    """One image of the given dataset, with what the model makes of it."""

    sample: Sample
    pixels: np.ndarray
    digest: str
    features: np.ndarray  # [C, P]


class _Source:
    """The input package: manifest, trainer state, and the feature extractor of its layout."""

    def __init__(self, package_dir: Path, out_dir: Path) -> None:
        package_dir, out_dir = Path(package_dir), Path(out_dir)
        source, target = package_dir.resolve(), out_dir.resolve()
        if target == source or source in target.parents or target in source.parents:
            raise PackageError(
                f"--out {out_dir} would replace the input package {package_dir}, sit inside it or hold "
                "it; a new version is written beside it: choose another directory"
            )
        self.package: ModelPackage = read_package(package_dir)
        self.package.verify_files()
        self.state: TrainerState = load_state(self.package)
        self.manifest: dict[str, Any] = json.loads((package_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        self.weights = load_pretrained_weights()
        self.extract = FeatureExtractor(self.weights, self.state.model.layout)

    def dataset(self, path: Path) -> Dataset:
        """Every labelled image of `path` (train/ and test/ alike), at the model's image size."""
        split = load_dataset(Path(path), check_counts=False)
        dataset = split.train
        if split.test is not None:
            dataset = replace(dataset, samples=dataset.samples + split.test.samples)
        package = self.package
        if (dataset.width, dataset.height) != (package.width, package.height):
            raise DatasetError(
                [
                    f"the images of {path} are {dataset.width}x{dataset.height}, but the model "
                    f"{package.component_name} takes {package.width}x{package.height} images: give images "
                    "of the size it was trained on, cropped or resized the same way"
                ]
            )
        if package.is_segmentation and dataset.is_segmentation:
            label_remap(dataset.labels, package.labels)  # raises naming unknown labels
        return dataset

    def images(self, dataset: Dataset) -> list[_Image]:
        images = []
        for sample in dataset.samples:
            pixels = dataset.load_image(sample)
            images.append(_Image(sample, pixels, image_hash(pixels), self.extract(pixels)))
        return images

    def revision(
        self,
        operation: str,
        dataset_path: Path,
        model: TrainedModel,
        state: TrainerState,
        estimate: Estimate,
        scores: tuple[np.ndarray, np.ndarray],
        dataset: Dataset,
        references: Sequence[_Image],
        details: dict[str, Any],
        out_dir: Path,
    ) -> tuple[Path, dict[str, Any], dict[str, Any]]:
        """Build, evaluate and write the new version; (its directory, evaluation, changes)."""
        graph = build_model_graph(self.weights, model).SerializeToString()
        labels = self.package.labels if model.head is not None else ()
        evaluated = evaluate_model(graph, dataset, labels)
        if model.region is not None:  # the report shows where the model looks, as train's
            items = [replace(item, region=model.region.pixels) for item in evaluated.items]
            evaluated = replace(evaluated, items=items)
        evaluated.metrics["evaluated_on"] = details["evaluated_on"]
        self_check, self_check_files = _self_check(graph, model, state, references)

        old = self.manifest
        old_training = old.get("training", {})
        training = {
            **old_training,
            "memory_bank": len(model.bank),
            "raw_threshold": model.centre,
            "raw_scale": model.scale,
            "pixel_threshold": model.head.pixel_threshold if model.head is not None else None,
            "images": {"normal": len(state.normal_hashes), "anomalous": len(state.anomalous_hashes)},
            "options": {**old_training.get("options", {}), "favour_recall": state.options["favour_recall"]},
        }
        changes = {
            key: {"from": old_training.get(key), "to": value}
            for key, value in training.items()
            if old_training.get(key) != value
        }
        if old.get("threshold") != DEFAULT_THRESHOLD:
            changes["threshold"] = {"from": old.get("threshold"), "to": DEFAULT_THRESHOLD}
        metrics = estimate_metrics(estimate, *scores, details["estimate"])
        metrics[f"{operation}_images"] = evaluated.metrics
        parent_arn = str(old.get("model_arn") or f"lookout-edge:{self.package.component_name}")
        step = {
            "operation": operation,
            "parent": {"model_arn": parent_arn, "model_sha256": self.package.model_file.sha256},
            "dataset": str(Path(dataset_path).resolve()),
            "images": details["images"],
            "changed": changes,
        }
        manifest = {
            key: value for key, value in old.items() if key not in ("format_version", "model_file", "files")
        }
        manifest.update(
            model_arn=next_version(parent_arn),
            threshold=DEFAULT_THRESHOLD,
            training=training,
            metrics=metrics,
            lineage=[*old.get("lineage", []), step],
        )
        manifest[SELF_CHECK_KEY] = self_check
        files = {
            "model.onnx": graph,
            **evaluated.files(),
            **self_check_files,
            STATE_NAME: save_state(state, graph),
        }
        if model.region is not None:
            files[REGION_FILE] = model.region.png()
        return write_package(Path(out_dir), manifest, files), evaluated.metrics, changes


def next_version(model_arn: str) -> str:
    """`…:3` or `…/3` → `…:4` / `…/4`; an ARN without a version is version 1, so it gets `:2`."""
    match = _VERSION.search(model_arn)
    if match is None:
        return f"{model_arn}:2"
    return f"{model_arn[: match.start()]}{match.group(1)}{int(match.group(2)) + 1}"


def _self_check(
    graph: bytes, model: TrainedModel, state: TrainerState, images: Sequence[_Image]
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Fresh self-check references for the new graph, chosen among the given images by their
    out-of-fold scores under the new model (trainer/selfcheck.py)."""
    grid = model.layout.grid
    raw = model.raw_scores(
        [
            anomaly_grid(image.features, model.bank, grid, state.excluded_rows(image.digest))
            for image in images
        ]
    )
    scores = calibrated_score(raw, model.centre, model.scale)
    picked = choose_references(list(scores), [image.sample.is_anomalous for image in images])
    if not picked:
        raise DatasetError(
            [
                "none of the given images scores far enough from the new threshold to serve as a "
                "self-check reference; add a few clearly normal images to the dataset"
            ]
        )
    return reference_checks(graph, [(images[i].sample.image_path.name, images[i].pixels) for i in picked])


def calibrate(
    package_dir: Path, dataset_path: Path, out_dir: Path, favour_recall: bool | None = None
) -> Revised:
    """Re-choose the image (and pixel) threshold of a package on a labelled dataset; see the module.

    `favour_recall` None keeps the model's own choice.
    """
    began = time.perf_counter()
    source = _Source(package_dir, out_dir)
    state, model = source.state, source.state.model
    dataset = source.dataset(dataset_path)
    if dataset.normal_count < 2:
        raise DatasetError(
            [
                f"{dataset_path} holds {dataset.normal_count} normal images; calibration needs at least 2 "
                "(and, to set a threshold that holds, a few dozen normal and a few anomalous ones)"
            ]
        )
    images = source.images(dataset)
    grid = model.layout.grid
    # Blurred maps; scores and masks apply the stored normalisation, as the graph does.
    maps = [anomaly_grid(i.features, model.bank, grid, state.excluded_rows(i.digest)) for i in images]
    normal = [index for index, image in enumerate(images) if not image.sample.is_anomalous]
    anomalous = [index for index, image in enumerate(images) if image.sample.is_anomalous]
    normal_raw = model.raw_scores([maps[i] for i in normal])
    anomalous_raw = model.raw_scores([maps[i] for i in anomalous])
    recall = bool(state.options["favour_recall"]) if favour_recall is None else favour_recall
    seed = int(state.options["seed"])
    calibration = calibration_from_scores(normal_raw, anomalous_raw, recall, seed)
    estimate = calibration.estimate
    head = model.head
    pixel_note = "kept: the model has no segmentation head"
    if head is not None:
        pixel_threshold = _pixel_threshold(
            source, dataset, [images[i] for i in anomalous], [model.normalised(maps[i]) for i in anomalous]
        )
        if pixel_threshold is None:
            pixel_note = "kept: the dataset has no anomalous images with masks"
        else:
            head = replace(head, pixel_threshold=pixel_threshold)
            pixel_note = f"chosen on {len(anomalous)} anomalous images with masks"
    new_model = replace(model, centre=calibration.centre, scale=calibration.scale, head=head)
    # The state keeps describing the training images: calibration changes thresholds only.
    new_state = replace(state, model=new_model, options={**state.options, "favour_recall": recall})
    known = sum(
        image.digest in state.normal_hashes or image.digest in state.anomalous_hashes for image in images
    )
    details = {
        "evaluated_on": "the calibration images (the thresholds were chosen on them)",
        "estimate": "cross-validated on the calibration images (out-of-fold scores)",
        "images": {"normal": len(normal), "anomalous": len(anomalous), "already_in_training": known},
        "pixel_threshold": pixel_note,
    }
    package, evaluation, changes = source.revision(
        "calibration",
        dataset_path,
        new_model,
        new_state,
        estimate,
        (normal_raw, anomalous_raw),
        dataset,
        images,
        details,
        out_dir,
    )
    return Revised(package, evaluation, changes, time.perf_counter() - began)


def _pixel_threshold(
    source: _Source, dataset: Dataset, anomalous: list[_Image], maps: list[np.ndarray]
) -> float | None:
    """The pixel threshold for the best mean IoU on the anomalous images' masks (`maps`: their
    normalised grid maps), each mask predicted by a head that did not train on it (the
    cross-fitting head for a training image)."""
    state, model = source.state, source.state.model
    head = model.head
    if head is None or not dataset.is_segmentation or not anomalous:
        return None
    remap = label_remap(dataset.labels, source.package.labels)
    size = (model.layout.image_height, model.layout.image_width)
    predicted, truths = [], []
    for image, grid_map in zip(anomalous, maps, strict=True):
        label_map = dataset.load_label_map(image.sample)
        assert label_map is not None, "segmentation datasets give every image a label map"
        chosen = head
        if image.digest in state.anomalous_hashes and state.head_training is not None:
            chosen = state.head_training.predicting_head(state.anomalous_hashes.index(image.digest)) or head
        pixel_maps = chosen.pixel_maps(image.features, grid_map.reshape(-1), model.layout.grid, size)
        predicted.append(mask_pixel_maps(model.region, pixel_maps))
        truths.append(remap[label_map])
    return best_pixel_threshold(predicted, truths, len(source.package.labels))


def update(package_dir: Path, dataset_path: Path, out_dir: Path) -> Revised:
    """Add a dataset's images to a package's model; see the module."""
    began = time.perf_counter()
    source = _Source(package_dir, out_dir)
    state, model = source.state, source.state.model
    dataset = source.dataset(dataset_path)
    images = source.images(dataset)
    _refuse_relabelled(state, images)
    known = set(state.normal_hashes) | set(state.anomalous_hashes)
    added: list[_Image] = []
    for image in images:
        if image.digest not in known:
            known.add(image.digest)
            added.append(image)
    normals = [image for image in added if not image.sample.is_anomalous]
    anomalous = [image for image in added if image.sample.is_anomalous]
    if model.head is not None and anomalous and not dataset.is_segmentation:
        raise DatasetError(
            [
                f"{source.package.component_name} is a segmentation model: the anomalous images it learns "
                "from need masks; give a Ground Truth manifest with anomaly-mask-ref for each"
            ]
        )
    recall, seed = bool(state.options["favour_recall"]), int(state.options["seed"])
    new_state = _added(source, state, normals, anomalous, dataset) if added else state
    normal_raw, anomalous_raw = new_state.normal_raw, new_state.anomalous_raw
    calibration = calibration_from_scores(normal_raw, anomalous_raw, recall, seed)
    estimate = calibration.estimate
    new_model = replace(new_state.model, centre=calibration.centre, scale=calibration.scale)
    new_state = replace(new_state, model=new_model)
    details = {
        "evaluated_on": "the images given to update (now part of the model: in-sample)",
        "estimate": "cross-validated on the training and added images (out-of-fold scores)",
        "images": {
            "normal": len(normals),
            "anomalous": len(anomalous),
            "already_in_training": len(images) - len(added),
        },
    }
    package, evaluation, changes = source.revision(
        "update",
        dataset_path,
        new_model,
        new_state,
        estimate,
        (normal_raw, anomalous_raw),
        dataset,
        images,
        details,
        out_dir,
    )
    return Revised(package, evaluation, changes, time.perf_counter() - began)


def _refuse_relabelled(state: TrainerState, images: list[_Image]) -> None:
    """An image the model learnt as normal must not come back as anomalous (or the reverse):
    update adds images, it cannot take one out of the memory bank or the head."""
    learnt = {digest: False for digest in state.normal_hashes} | {
        digest: True for digest in state.anomalous_hashes
    }
    relabelled = [
        f"{image.sample.image_path} ({'anomalous' if image.sample.is_anomalous else 'normal'} here)"
        for image in images
        if learnt.get(image.digest, image.sample.is_anomalous) != image.sample.is_anomalous
    ]
    if relabelled:
        raise DatasetError(
            [
                f"{len(relabelled)} images are in the model with the other label; update cannot unlearn "
                "an image: retrain with the corrected labels\n"
                + "\n".join(f"  {line}" for line in relabelled)
            ]
        )


def _added(
    source: _Source, state: TrainerState, normals: list[_Image], anomalous: list[_Image], dataset: Dataset
) -> TrainerState:
    """The state with the added images in the bank, the scores and the head (thresholds not yet set)."""
    model, options = state.model, state.options
    layout, grid = model.layout, model.layout.grid
    bank, origin = model.bank, state.bank_origin
    first_new = len(state.normal_hashes)
    if normals:
        patches = np.concatenate([bank, *(image.features.T for image in normals)])
        origin = np.concatenate([origin, first_new + np.repeat(np.arange(len(normals)), layout.patches)])
        total = (first_new + len(normals)) * layout.patches
        size = min(int(options["coreset_max"]), max(1, int(total * float(options["coreset_ratio"]))))
        chosen = greedy_coreset(patches, size, int(options["seed"]))
        bank, origin = patches[chosen], origin[chosen]
    normal_grids = np.array(
        [
            anomaly_grid(image.features, bank, grid, excluded=origin == first_new + index)
            for index, image in enumerate(normals)
        ],
        np.float32,
    ).reshape(len(normals), *grid)
    anomalous_grids = np.array(
        [anomaly_grid(image.features, bank, grid) for image in anomalous], np.float32
    ).reshape(len(anomalous), *grid)
    all_normal_grids = np.concatenate([state.normal_maps, normal_grids])
    # Measured again on the stored maps of the training normals and the added normals' maps.
    new_model = replace(model, bank=bank, normalisation=fit_normalisation(all_normal_grids))
    head, training = new_model.head, state.head_training
    if head is not None and training is not None:
        remap = label_remap(dataset.labels, source.package.labels) if dataset.is_segmentation else None
        added = _HeadInputs(
            normals,
            list(new_model.normalised(normal_grids)),
            anomalous,
            list(new_model.normalised(anomalous_grids)),
            dataset,
            remap,
        )
        training = _redistanced(
            training, new_model.normalised(state.normal_maps), new_model.normalised(state.anomalous_maps)
        )
        training = _head_training(training, added, head.weight.shape[0] - 1, layout)
        head, training = _retrained(training, head, int(options["seed"]))
    return replace(
        state,
        model=replace(new_model, head=head),
        normal_hashes=state.normal_hashes + tuple(image.digest for image in normals),
        anomalous_hashes=state.anomalous_hashes + tuple(image.digest for image in anomalous),
        bank_origin=origin,
        normal_maps=all_normal_grids,
        anomalous_maps=np.concatenate([state.anomalous_maps, anomalous_grids]),
        head_training=training,
    )


def _redistanced(training: HeadTraining, normal_maps: np.ndarray, anomalous_maps: np.ndarray) -> HeadTraining:
    """The head's stored inputs with their distance row (the last) read again from the training
    images' normalised maps: the normalisation was measured again, and the head must learn the
    distances in the units the new graph gives it."""
    keep = np.arange(0, normal_maps.shape[1] * normal_maps.shape[2], NORMAL_PATCH_STRIDE)
    normal_inputs = training.normal_inputs.copy()
    assert normal_inputs.shape[1] == len(normal_maps) * len(keep), "one column per kept normal patch"
    normal_inputs[-1] = normal_maps.reshape(len(normal_maps), -1)[:, keep].reshape(-1)
    inputs = []
    for stored, grid_map, positions in zip(
        training.anomalous_inputs, anomalous_maps, training.anomalous_positions, strict=True
    ):
        moved = stored.copy()
        moved[-1] = grid_map.reshape(-1)[positions]
        inputs.append(moved)
    return replace(training, normal_inputs=normal_inputs, anomalous_inputs=tuple(inputs))


@dataclass(frozen=True)
class _HeadInputs:
    """The added images, their normalised anomaly maps against the new bank, and where their masks
    come from."""

    normals: list[_Image]
    normal_maps: list[np.ndarray]
    anomalous: list[_Image]
    anomalous_maps: list[np.ndarray]
    dataset: Dataset
    remap: np.ndarray | None  # the dataset's label indices -> the model's


def _head_training(
    training: HeadTraining, added: _HeadInputs, labels: int, layout: FeatureLayout
) -> HeadTraining:
    """The head's training data with the added images, selected as trainer/train.py selects them:
    every NORMAL_PATCH_STRIDE-th patch of normal images, and of anomalous images every patch
    touching a defect plus the background as thinly."""
    patches = layout.patches
    keep = np.arange(0, patches, NORMAL_PATCH_STRIDE)
    normal_inputs = [training.normal_inputs]
    for image, grid_map in zip(added.normals, added.normal_maps, strict=True):
        normal_inputs.append(np.concatenate([image.features, grid_map.reshape(1, -1)])[:, keep])
    inputs, targets = list(training.anomalous_inputs), list(training.anomalous_targets)
    positions = list(training.anomalous_positions)
    folds = [int(fold) for fold in training.fold_of]
    for image, grid_map in zip(added.anomalous, added.anomalous_maps, strict=True):
        truth = added.dataset.load_label_map(image.sample)
        assert truth is not None and added.remap is not None, "segmentation datasets give label maps"
        target = patch_targets(added.remap[truth], labels, layout.grid)
        chosen = anomalous_head_patches(target)
        inputs.append(np.concatenate([image.features, grid_map.reshape(1, -1)])[:, chosen])
        targets.append(target[:, chosen])
        positions.append(chosen)
        folds.append(_next_fold(targets[:-1], folds, target))
    return HeadTraining(
        normal_inputs=np.concatenate(normal_inputs, axis=1),
        anomalous_inputs=tuple(inputs),
        anomalous_targets=tuple(targets),
        anomalous_positions=tuple(positions),
        fold_of=np.array(folds, dtype=np.intp),
        fold_heads=training.fold_heads,
    )


def _dominant(target: np.ndarray) -> int:
    return int(target[1:].sum(axis=1).argmax()) + 1


def _next_fold(targets: list[np.ndarray], folds: list[int], target: np.ndarray) -> int:
    """The cross-fitting fold of an added anomalous image: the one with fewer images of its label
    (then fewer images), so that both heads keep seeing every label, as in training."""
    label = _dominant(target)
    same = [fold for fold, other in zip(folds, targets, strict=True) if _dominant(other) == label]
    return min((0, 1), key=lambda fold: (same.count(fold), folds.count(fold), fold))


def _retrained(
    training: HeadTraining, head: SegmentationHead, seed: int
) -> tuple[SegmentationHead, HeadTraining]:
    """The head and the cross-fitting heads trained again on `training`; the pixel threshold is kept."""
    labels = head.weight.shape[0]
    normal_targets = np.zeros((labels, training.normal_inputs.shape[1]))
    normal_targets[0] = 1.0

    def fit(indices: list[int]) -> SegmentationHead:
        fitted = train_head(
            np.concatenate(
                [training.normal_inputs, *(training.anomalous_inputs[i] for i in indices)], axis=1
            ),
            np.concatenate([normal_targets, *(training.anomalous_targets[i] for i in indices)], axis=1),
            seed=seed,
        )
        return replace(fitted, pixel_threshold=head.pixel_threshold)

    count = len(training.anomalous_inputs)
    folds = [[i for i in range(count) if training.fold_of[i] == fold] for fold in (0, 1)]
    fold_heads = (fit(folds[0]), fit(folds[1])) if count >= 2 and all(folds) else None
    return fit(list(range(count))), replace(training, fold_heads=fold_heads)
