"""The trainer's state inside a model package (`trainer-state.npz`): what recalibrating and
updating a model need that the graph alone does not give back.

The agent never reads it; it is listed under the manifest's `files` like every file, so a
changed byte is caught. It holds:

- the model (trainer/export.py `TrainedModel`): layout, memory bank, logistic calibration,
  segmentation head, inspection region, so that the graph is rebuilt with `build_model_graph`
  without retraining;
- for each training image a content hash of its pixels, and for each bank row the normal image
  it came from: an image recognised by its hash is scored out of fold (against the bank without
  its own patches), so calibrating on the training images reproduces the training threshold;
- the per-position map normalisation (trainer/normalise.py: gain A and offset B per patch);
- the training images' out-of-fold blurred maps before normalisation (normals' leave-one-out
  maps, n x grid float32, small beside the bank): their raw scores under the model
  (`normal_raw`, `anomalous_raw`) are computed from them, `update` measures the normalisation
  again on the union of the stored and the added normals' maps and pools the scores to choose
  the threshold on the union;
- for segmentation models, the head's training inputs and targets (float16: they only feed a
  retraining), the patch position of each anomalous input column (so that `update` can read the
  distance input again from the maps once the normalisation changed) and the two cross-fitting
  heads (each trained on every other anomalous image);
- the training options (TrainOptions' fields) and the graph's SHA-256, so that a state file
  copied from another package is refused.

The file is a compressed `.npz` of plain arrays plus one JSON string; it is read with
`allow_pickle=False`, so a hostile file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from lookout_edge.package import ModelPackage, PackageError
from lookout_edge.trainer.export import TrainedModel
from lookout_edge.trainer.features import FeatureLayout
from lookout_edge.trainer.normalise import MapNormalisation
from lookout_edge.trainer.region import Region
from lookout_edge.trainer.segmentation import SegmentationHead

STATE_NAME = "trainer-state.npz"
STATE_VERSION = 2  # 2: map normalisation and maps instead of raw scores
_KIND = "lookout-edge trainer state"


def image_hash(image: np.ndarray) -> str:
    """SHA-256 of an image's decoded pixels and shape: the same picture re-encoded keeps its hash."""
    digest = hashlib.sha256(f"{image.shape}".encode())
    digest.update(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class HeadTraining:
    """What the segmentation head was trained on, per trainer/train.py's selection of patches."""

    normal_inputs: np.ndarray  # [C + 1, n]: patch features and distance of normal images (background)
    anomalous_inputs: tuple[np.ndarray, ...]  # per anomalous image (training order), [C + 1, n_i]
    anomalous_targets: tuple[np.ndarray, ...]  # per anomalous image, [K + 1, n_i] label fractions
    anomalous_positions: tuple[np.ndarray, ...]  # per anomalous image, [n_i] patch index of each column
    # Cross-fitting: fold_heads[k] was trained on the normals and the anomalous images i with
    # fold_of[i] == k, so fold_heads[1 - fold_of[i]] never saw image i (None below two images).
    fold_of: np.ndarray  # [A] 0 or 1
    fold_heads: tuple[SegmentationHead, SegmentationHead] | None

    def predicting_head(self, index: int) -> SegmentationHead | None:
        """The cross-fitting head that did not see anomalous image `index`, if there is one."""
        if self.fold_heads is None:
            return None
        return self.fold_heads[1 - int(self.fold_of[index])]


@dataclass(frozen=True)
class TrainerState:
    model: TrainedModel
    options: dict[str, Any]  # TrainOptions' fields
    normal_hashes: tuple[str, ...]  # training order
    anomalous_hashes: tuple[str, ...]
    bank_origin: np.ndarray  # [M] index into normal_hashes of the image each bank row came from
    normal_maps: np.ndarray  # [N, rows, cols] float32 leave-one-out blurred maps, not normalised
    anomalous_maps: np.ndarray  # [A, rows, cols] blurred maps against the whole bank
    head_training: HeadTraining | None = None

    @property
    def normal_raw(self) -> np.ndarray:
        """[N] the normal images' out-of-fold raw scores under the model."""
        return self.model.raw_scores(self.normal_maps)

    @property
    def anomalous_raw(self) -> np.ndarray:
        """[A] the anomalous images' raw scores under the model."""
        return self.model.raw_scores(self.anomalous_maps)

    def excluded_rows(self, digest: str) -> np.ndarray:
        """The bank rows that came from the image with this hash (none for an unseen image)."""
        if digest not in self.normal_hashes:
            return np.zeros(len(self.bank_origin), dtype=bool)
        return self.bank_origin == self.normal_hashes.index(digest)


def save_state(state: TrainerState, graph: bytes) -> bytes:
    """The state file's bytes, bound to `graph` (the package's model.onnx) by its SHA-256."""
    model = state.model
    meta = {
        "kind": _KIND,
        "version": STATE_VERSION,
        "graph_sha256": hashlib.sha256(graph).hexdigest(),
        "layout": {
            "image_height": model.layout.image_height,
            "image_width": model.layout.image_width,
            "network_size": list(model.layout.network_size),
            "grid": list(model.layout.grid),
            "channels": model.layout.channels,
        },
        "centre": model.centre,
        "scale": model.scale,
        "pixel_threshold": model.head.pixel_threshold if model.head is not None else None,
        "options": state.options,
        "region": None
        if model.region is None
        else {"given_as": model.region.given_as, "source": model.region.source},
    }
    arrays: dict[str, np.ndarray] = {
        "meta": np.array(json.dumps(meta, sort_keys=True, default=str)),  # paths as strings
        "bank": model.bank.astype(np.float32),
        "bank_origin": state.bank_origin.astype(np.int64),
        "normal_hashes": np.array(state.normal_hashes, dtype="<U64"),
        "anomalous_hashes": np.array(state.anomalous_hashes, dtype="<U64"),
        "normal_maps": state.normal_maps.astype(np.float32),
        "anomalous_maps": state.anomalous_maps.astype(np.float32),
    }
    if model.normalisation is not None:
        arrays["normalisation_gain"] = model.normalisation.gain.astype(np.float32)
        arrays["normalisation_offset"] = model.normalisation.offset.astype(np.float32)
    if model.region is not None:
        arrays["region_pixels"] = model.region.pixels.astype(np.bool_)
    if model.head is not None:
        arrays["head_weight"] = model.head.weight.astype(np.float32)
        arrays["head_bias"] = model.head.bias.astype(np.float32)
    training = state.head_training
    if training is not None:
        arrays["head_normal_inputs"] = training.normal_inputs.astype(np.float16)
        arrays["head_anomalous_inputs"] = _concatenated(
            training.anomalous_inputs, len(training.normal_inputs)
        )
        arrays["head_anomalous_targets"] = _concatenated(
            training.anomalous_targets, len(model.head.weight) if model.head is not None else 0
        )
        arrays["head_anomalous_columns"] = np.array([a.shape[1] for a in training.anomalous_inputs], np.int64)
        arrays["head_anomalous_positions"] = np.concatenate(
            [np.zeros(0, np.int64), *training.anomalous_positions]
        ).astype(np.int64)
        arrays["head_anomalous_fold"] = training.fold_of.astype(np.int64)
        if training.fold_heads is not None:
            arrays["fold_weight"] = np.stack([h.weight for h in training.fold_heads]).astype(np.float32)
            arrays["fold_bias"] = np.stack([h.bias for h in training.fold_heads]).astype(np.float32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _concatenated(parts: tuple[np.ndarray, ...], rows: int) -> np.ndarray:
    if not parts:
        return np.zeros((rows, 0), dtype=np.float16)
    return np.concatenate(parts, axis=1).astype(np.float16)


def load_state(package: ModelPackage) -> TrainerState:
    """Read and check the state of a package whose files were verified; PackageError says what is wrong."""
    entry = next((f for f in package.files if f.path == (package.directory / STATE_NAME).resolve()), None)
    if entry is None:
        raise PackageError(
            f"{package.directory} has no {STATE_NAME}: the model was trained by an older version of "
            "lookout-edge, which did not keep what recalibration needs; retrain it with `lookout-edge train`"
        )
    where = entry.path
    try:
        with np.load(where, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise PackageError(f"{where} cannot be read as a trainer state ({exc}); retrain the model") from None
    try:
        state = _decode(meta, arrays)
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"{where} is not a valid trainer state ({exc}); retrain the model") from None
    if meta["graph_sha256"] != package.model_file.sha256:
        raise PackageError(
            f"{where} belongs to another model: it was written with a graph whose SHA-256 is "
            f"{meta['graph_sha256'][:12]}…, this package's {package.model_file.path.name} is "
            f"{package.model_file.sha256[:12]}…; use the package the trainer wrote, or retrain"
        )
    layout = state.model.layout
    if (layout.image_width, layout.image_height) != (package.width, package.height):
        raise PackageError(
            f"{where} describes {layout.image_width}x{layout.image_height} images, the manifest "
            f"{package.width}x{package.height}; the package is inconsistent: retrain the model"
        )
    return state


def _decode(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> TrainerState:
    if meta.get("kind") != _KIND:
        raise ValueError("it is not a lookout-edge trainer state")
    if meta.get("version") != STATE_VERSION:
        raise ValueError(f"state version {meta.get('version')}, this lookout-edge reads {STATE_VERSION}")
    shape = meta["layout"]
    layout = FeatureLayout(
        image_height=int(shape["image_height"]),
        image_width=int(shape["image_width"]),
        network_size=(int(shape["network_size"][0]), int(shape["network_size"][1])),
        grid=(int(shape["grid"][0]), int(shape["grid"][1])),
        channels=int(shape["channels"]),
    )
    bank = arrays["bank"].astype(np.float32)
    origin = arrays["bank_origin"].astype(np.intp)
    normal_hashes = tuple(str(h) for h in arrays["normal_hashes"])
    anomalous_hashes = tuple(str(h) for h in arrays["anomalous_hashes"])
    normal_maps = arrays["normal_maps"].astype(np.float32)
    anomalous_maps = arrays["anomalous_maps"].astype(np.float32)
    _expect(bank.ndim == 2 and bank.shape[1] == layout.channels, "the bank does not match the layout")
    _expect(origin.shape == (len(bank),), "bank_origin does not match the bank")
    _expect(
        bool(origin.size == 0 or (origin.min() >= 0 and origin.max() < len(normal_hashes))), "bad origins"
    )
    _expect(normal_maps.shape == (len(normal_hashes), *layout.grid), "normal maps do not match the images")
    _expect(anomalous_maps.shape == (len(anomalous_hashes), *layout.grid), "anomalous maps do not match")
    normalisation = None
    if "normalisation_gain" in arrays:
        normalisation = MapNormalisation(
            arrays["normalisation_gain"].astype(np.float32), arrays["normalisation_offset"].astype(np.float32)
        )
        shapes = {normalisation.gain.shape, normalisation.offset.shape}
        _expect(shapes == {layout.grid}, "the map normalisation is not the grid's size")
    head = None
    if "head_weight" in arrays:
        head = SegmentationHead(
            arrays["head_weight"].astype(np.float32),
            arrays["head_bias"].astype(np.float32),
            float(meta["pixel_threshold"]),
        )
        _expect(head.weight.shape[1] == layout.channels + 1, "the head does not match the layout")
        _expect(head.bias.shape == head.weight.shape[:1], "the head's bias does not match its weight")
    region = None
    if meta["region"] is not None:
        pixels = arrays["region_pixels"].astype(np.bool_)
        _expect(pixels.shape == (layout.image_height, layout.image_width), "the region is not the image size")
        region = Region(pixels, str(meta["region"]["given_as"]), str(meta["region"]["source"]))
    model = TrainedModel(
        layout, bank, float(meta["centre"]), float(meta["scale"]), head, region, normalisation
    )
    training = None
    if "head_normal_inputs" in arrays and head is not None:
        columns = arrays["head_anomalous_columns"].astype(np.intp)
        fold_of = arrays["head_anomalous_fold"].astype(np.intp)
        _expect(len(columns) == len(anomalous_hashes), "head inputs do not match the anomalous images")
        _expect(fold_of.shape == columns.shape and bool(np.isin(fold_of, (0, 1)).all()), "bad folds")
        splits = np.cumsum(columns)[:-1]
        inputs = arrays["head_anomalous_inputs"].astype(np.float32)
        targets = arrays["head_anomalous_targets"].astype(np.float32)
        positions = arrays["head_anomalous_positions"].astype(np.intp)
        _expect(
            inputs.shape[1] == targets.shape[1] == positions.shape[0] == columns.sum(),
            "head inputs and targets disagree",
        )
        _expect(bool(((positions >= 0) & (positions < layout.patches)).all()), "bad head input positions")
        fold_heads = None
        if "fold_weight" in arrays:
            weights, biases = arrays["fold_weight"], arrays["fold_bias"]
            _expect(weights.shape == (2, *head.weight.shape), "the fold heads do not match the head")
            fold_heads = (
                SegmentationHead(weights[0], biases[0], head.pixel_threshold),
                SegmentationHead(weights[1], biases[1], head.pixel_threshold),
            )
        training = HeadTraining(
            normal_inputs=arrays["head_normal_inputs"].astype(np.float32),
            anomalous_inputs=tuple(np.split(inputs, splits, axis=1)) if len(columns) else (),
            anomalous_targets=tuple(np.split(targets, splits, axis=1)) if len(columns) else (),
            anomalous_positions=tuple(np.split(positions, splits)) if len(columns) else (),
            fold_of=fold_of,
            fold_heads=fold_heads,
        )
    return TrainerState(
        model=model,
        options=dict(meta["options"]),
        normal_hashes=normal_hashes,
        anomalous_hashes=anomalous_hashes,
        bank_origin=origin,
        normal_maps=normal_maps,
        anomalous_maps=anomalous_maps,
        head_training=training,
    )


def _expect(condition: bool, problem: str) -> None:
    if not condition:
        raise ValueError(problem)
