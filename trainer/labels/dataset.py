"""Rekognition Custom Labels datasets, loaded and checked by the rules of the Custom Labels guide.

`load_label_dataset` accepts:

- a folder whose sub-folders are label names: an image-level (classification) dataset. As in the guide
  (« データセットの作成 »), an image takes the name of the child folder it is in, however deep; images
  directly in the folder have no label and are not used;
- a folder with ``train/`` and ``test/``, each laid out as above: separate training and test sets;
- a SageMaker Ground Truth manifest (« マニフェストファイル »): one JSON line per image, ``source-ref``
  (relative to the manifest's folder, absolute, ``file://`` or ``s3://``, see `trainer.groundtruth`) and
  label attributes, each with its ``<attribute>-metadata``. Image-level attributes hold an integer and their
  metadata a ``class-name`` and ``type: groundtruth/image-classification``; several of them on a line make a
  multi-label line. An object-detection attribute holds ``image_size`` and ``annotations`` (pixel boxes with
  a ``class_id`` of the metadata's ``class-map``) and its metadata ``type: groundtruth/object-detection``.
  ``test=`` gives the test set as another manifest (or folder).

Without a test set the training images are split 80/20 as the guide does, stratified by label.

The rules, from « マニフェストファイルの検証ルール », the JSON-line errors and « ガイドラインとクォータ »
(numbers are line numbers of the Japanese guide, ../shared/seeds/002_d8d439cc12778442.txt):

- line-level errors (the line, or file of a folder, is invalid): invalid JSON, blank lines included
  (3363, 6536); no ``source-ref`` (6252) or one of another scheme (6269); an attribute without its
  ``-metadata`` or the reverse (6290); a ``type`` other than the two above (7034); malformed attributes or
  metadata (6355, 6390): an image-level value that is not an integer, a missing ``class-name``, a
  ``confidence`` outside 0..1; ``objects`` without a confidence per annotation (6445); a ``class_id``
  missing from the ``class-map`` (6474); label names over 256 characters (7146); more than 50 labels or 50
  boxes on an image (16519, 16521, 6801); boxes of which none is valid (6692); images that are missing
  (3388), not PNG or JPEG by content, over 15 MB, of an aspect ratio above 20:1 (6566, 16524-16525), with
  a side outside 64…4096 px (6588, 16522-16523), or whose ``image_size`` is not their size;
- invalid lines up to 20 % of a manifest's lines (all rules together, blank lines counted) are left out
  with a warning; above 20 % the set is refused (3362, 3388-3389, 5943);
- box-level errors leave the box out and keep the line (5571): boxes off the image or negative (6655),
  boxes of 1 px or less, measured after the training resize of images larger than 1280 px (6760);
- lines without label attributes are ignored, not counted as invalid (6889, 5573);
- a manifest mixing image-level and object-location lines needs `kind`, and the lines of the other
  format are left out (6179);
- dataset-level errors: an empty manifest (3387); manifests over 1 GB or 250,000 lines (3366-3367);
  ``s3://`` images in several buckets (5964); fewer than 2 labels in a classification set or 1 in a
  localisation set, training and test alike, more than 250 (16510-16512, 16536); a label without training
  images (16513); test labels overlapping the training labels by less than 50 % (3364, 6147); an image in
  both the training and the test set (3395), or twice in one set (by path or content);
- the automatic split gives every label of 2 images or more at least one test image; a test set without
  the minimum labels is refused (6024).

Where the guide contradicts itself or is silent, we chose:

- minimum labels: the quotas (2 for image-level sets, 1 for localisation; 16510-16511) over the
  validation table's 2 for both (3370) and line 6181's reverse;
- sizes and aspect ratio: the quotas' inclusive 64…4096 px and 20:1 over "larger than 64" and
  "under 20:1" (6570-6574); 15 MB read as 15 MiB; the 1280 px training resize keeps the aspect ratio;
- localisation images without boxes are kept as negative images (the quotas allow 0 boxes, 16520),
  though 6915-6965 calls them unused; an image twice in one set is an error;
- not enforced: ``human-annotated`` and ``creation-date`` (marked required), and the test quota of
  1,000 images per label (16540).

Loading reads every image (header and bytes, for the duplicate checks) and writes nothing but the local
copies of ``s3://`` images. Every problem of a stage is collected before `LabelDatasetError` is raised.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from lookout_edge.images import to_rgb888
from lookout_edge.trainer.datasets import DatasetError
from lookout_edge.trainer.groundtruth import SOURCE_REF, LineParser, default_s3_cache, fetch_s3

KINDS = ("classification", "multi-label", "localisation")
CLASSIFICATION_TYPE = "groundtruth/image-classification"
DETECTION_TYPE = "groundtruth/object-detection"
IMAGE_FORMATS = ("PNG", "JPEG")
MIN_SIDE, MAX_SIDE = 64, 4096
MAX_ASPECT_RATIO = 20
MAX_IMAGE_BYTES = 15 * 1024 * 1024
MAX_MANIFEST_BYTES = 1024**3
MAX_MANIFEST_LINES = 250_000
MIN_LABELS = {"classification": 2, "multi-label": 2, "localisation": 1}
MAX_LABELS = 250
MAX_LABELS_PER_IMAGE = 50
MAX_BOXES_PER_IMAGE = 50
MAX_LABEL_NAME = 256
MIN_LABEL_OVERLAP = 0.5
TRAINING_RESIZE_SIDE = 1280
TEST_FRACTION = 0.2
# Keys that Custom Labels adds to validation manifests; they are not label attributes.
_RESERVED_KEYS = frozenset({"errors", "warnings", "cl-errors", "cl-metadata"})
_METADATA = "-metadata"


class LabelDatasetError(DatasetError):
    """A Custom Labels dataset that cannot be used; `problems` holds one message per kind of
    problem, naming its offenders (as for the anomaly trainer's datasets)."""


@dataclass(frozen=True)
class Box:
    """A bounding box in pixels of its image."""

    label: str
    left: float
    top: float
    width: float
    height: float


@dataclass(frozen=True)
class LabelledImage:
    source: str  # the source-ref as written, or the file's path for folder datasets
    path: Path
    width: int
    height: int
    labels: tuple[str, ...]  # sorted; localisation: the labels of the boxes
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class LabelDataset:
    kind: str
    labels: tuple[str, ...]  # sorted, unique
    train: tuple[LabelledImage, ...]
    test: tuple[LabelledImage, ...]
    test_split_automatic: bool
    # Lines left out (invalid lines within the guide's 20 %, ignored lines, dropped boxes) and split notes.
    warnings: tuple[str, ...] = field(default=())


def load_label_dataset(
    path: Path,
    kind: str | None = None,
    *,
    test: Path | None = None,
    s3_cache: Path | None = None,
    seed: int = 0,
) -> LabelDataset:
    """Load and check a label folder or manifest (and `test`); raise `LabelDatasetError` listing what to fix.

    `kind` (one of `KINDS`) is inferred when None. `seed` makes the automatic 80/20 split reproducible;
    `s3_cache` is where ``s3://`` images are downloaded.
    """
    if kind is not None and kind not in KINDS:
        raise LabelDatasetError([f"kind {kind!r} is not one of {', '.join(KINDS)}"])
    sets = _read_sets(Path(path), test, s3_cache or default_s3_cache())
    _raise_if([problem for part in sets for problem in part.fatal])
    _raise_if([problem for part in sets for problem in _bucket_problems(part)])
    warnings: list[str] = []
    problems: list[str] = []
    for part in sets:
        _inspect_images(part)
        part_problems, part_warnings = _tolerance(part)
        problems += part_problems
        warnings += part_warnings
    _raise_if(problems)
    chosen, ignored = _choose_kind(sets, kind)
    warnings += ignored
    images = [_labelled_images(part, chosen) for part in sets]
    _raise_if(_duplicate_problems(sets))
    train = images[0]
    if len(sets) > 1:
        test_images = images[1]
        _raise_if(_label_problems(chosen, train, test_images, automatic=False))
    else:
        train, test_images, split_notes = _split(train, seed)
        warnings += split_notes
        _raise_if(_label_problems(chosen, train, test_images, automatic=True))
    labels = tuple(sorted({label for image in train for label in image.labels}))
    return LabelDataset(chosen, labels, tuple(train), tuple(test_images), len(sets) == 1, tuple(warnings))


def dataset_kind(path: Path, test: Path | None = None) -> str:
    """The kind `load_label_dataset` infers, from the manifest lines and folders alone: no image is
    read, so a caller can choose the trainer cheaply and leave the checking to the full load.
    `LabelDatasetError` when the lines say nothing, or contradict each other."""
    sets = _read_sets(Path(path), test, default_s3_cache())
    _raise_if([problem for part in sets for problem in part.fatal])
    return _choose_kind(sets, None)[0]


def read_rgb(image: LabelledImage) -> np.ndarray:
    """The image as [H, W, 3] uint8 RGB; gray (8 or 16 bits) by the rule of lookout_edge.images."""
    try:
        with Image.open(image.path) as opened:
            pixels = to_rgb888(opened)
    except (OSError, ValueError) as exc:
        raise LabelDatasetError([f"{image.path} cannot be read: {exc}"]) from None
    if pixels.shape[:2] != (image.height, image.width):
        raise LabelDatasetError(
            [
                f"{image.path} is now {pixels.shape[1]}x{pixels.shape[0]}, not {image.width}x{image.height}: "
                "it changed after the dataset was loaded"
            ]
        )
    return pixels


def _split(
    images: Sequence[LabelledImage], seed: int = 0
) -> tuple[list[LabelledImage], list[LabelledImage], list[str]]:
    """Move 20 % of `images` to a test set, stratified by label; return (train, test, notes).

    Labels are served rarest first: each label of n >= 2 images gets round(n / 5) test images (at least
    1), taken in an order shuffled by `seed`, and an image is never moved when that would leave one of its
    labels without training images. Images without labels (negative localisation images) are split 80/20
    among themselves. Both sets keep the order of `images`.
    """
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    counts = Counter(label for image in images for label in image.labels)
    in_train = counts.copy()
    in_test: Counter[str] = Counter()
    chosen: set[int] = set()
    for label in sorted(
        (label for label in counts if counts[label] >= 2), key=lambda name: (counts[name], name)
    ):
        wanted = max(1, round(counts[label] * TEST_FRACTION))
        for index in order:
            if in_test[label] >= wanted:
                break
            labels = images[index].labels
            if index in chosen or label not in labels or any(in_train[name] <= 1 for name in labels):
                continue
            chosen.add(index)
            in_test.update(labels)
            in_train.subtract(labels)
    negatives = [index for index in order if not images[index].labels]
    chosen.update(negatives[: round(len(negatives) * TEST_FRACTION)])
    train = [image for index, image in enumerate(images) if index not in chosen]
    test = [image for index, image in enumerate(images) if index in chosen]
    alone = sorted(label for label, count in counts.items() if count < 2)
    notes = []
    if alone:
        notes.append(
            _listing(
                f"{len(alone)} labels have a single image, which stays in the training set: the automatic "
                "test set cannot evaluate them (add images)",
                alone,
            )
        )
    return train, test, notes


# Reading sets: manifests and folders


@dataclass
class _Entry:
    """A usable line (or file) of a set; its image is inspected after parsing."""

    where: str  # "line 3", or the file's path relative to its set folder
    source: str
    path: Path
    classes: tuple[str, ...] | None  # image-level labels; None: no image-classification attribute
    boxes: tuple[Box, ...] | None  # None: no object-detection attribute
    image_size: tuple[int, int] | None = None  # (width, height) given by the bounding-box attribute
    dropped: list[tuple[str, str]] = field(default_factory=list)  # boxes left out: (kind, item)
    width: int = 0
    height: int = 0
    digest: str = ""


@dataclass
class _Set:
    name: str  # "training" or "test"
    origin: Path  # the manifest or the folder
    unit: str  # "line" or "file"
    total: int = 0  # dataset objects: every line of a manifest (blank ones too), every file of a folder
    entries: list[_Entry] = field(default_factory=list)
    invalid: dict[str, list[str]] = field(default_factory=dict)  # kind -> offenders; these count to 20 %
    ignored: dict[str, list[str]] = field(default_factory=dict)  # kind -> offenders; these do not
    fatal: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # S3 download failures, shown with the listings

    def reject(self, kind: str, item: str) -> None:
        self.invalid.setdefault(kind, []).append(item)

    def ignore(self, kind: str, item: str) -> None:
        self.ignored.setdefault(kind, []).append(item)


class _Invalid(Exception):
    """A line-level error: the line is left out (and counted against the guide's 20 %)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class _Unannotated(_Invalid):
    """A line without label attributes: ignored, and not counted against the 20 %."""


# Titles of the listings; {n} is the number of offenders, {units} "lines" or "files".
_TITLES = {
    "bad_json": "{n} {units} are not JSON objects (ERROR_INVALID_JSON_LINE; blank lines count too)",
    "no_source": "{n} {units} have no 'source-ref' string, the image to use (ERROR_MISSING_SOURCE_REF)",
    "bad_ref": "{n} {units} have a 'source-ref' that is not a path, a file:// or an s3:// URI "
    "(ERROR_INVALID_SOURCE_REF_FORMAT)",
    "no_attribute": "{n} {units} have a label attribute without its '-metadata', or a '-metadata' without "
    "its attribute (ERROR_NO_LABEL_ATTRIBUTES)",
    "bad_type": "{n} {units} have a '-metadata' 'type' that is neither "
    f"{CLASSIFICATION_TYPE} nor {DETECTION_TYPE} (ERROR_UNSUPPORTED_USE_CASE_TYPE)",
    "bad_attribute": "{n} {units} have a malformed label attribute (ERROR_INVALID_LABEL_ATTRIBUTE_FORMAT)",
    "bad_metadata": "{n} {units} have a malformed '-metadata' "
    "(ERROR_INVALID_LABEL_ATTRIBUTE_METADATA_FORMAT)",
    "no_confidence": "{n} {units} lack a 'confidence' in '-metadata' 'objects' for each annotation "
    "(ERROR_MISSING_BOUNDING_BOX_CONFIDENCE)",
    "no_class_id": "{n} {units} have annotations whose class_id is not in the 'class-map' "
    "(ERROR_MISSING_CLASS_MAP_ID)",
    "long_name": "{n} {units} have a label name longer than "
    f"{MAX_LABEL_NAME} characters (ERROR_INVALID_LABEL_NAME_LENGTH)",
    "too_many_labels": "{n} {units} give an image more than "
    f"{MAX_LABELS_PER_IMAGE} labels, the guide's maximum (remove labels)",
    "too_many_boxes": "{n} {units} have more than "
    f"{MAX_BOXES_PER_IMAGE} bounding boxes (ERROR_TOO_MANY_BOUNDING_BOXES)",
    "no_valid_boxes": "{n} {units} have bounding boxes, none of them valid (ERROR_NO_VALID_ANNOTATIONS)",
    "missing": "{n} {units} refer to an image that does not exist or cannot be read (source-ref not found)",
    "not_image": "{n} {units} are not PNG or JPEG images, judged by content; renaming is not enough "
    "(ERROR_INVALID_IMAGE)",
    "file_size": "{n} {units} have an image over 15 MB (ERROR_INVALID_IMAGE)",
    "dimension": "{n} {units} have an image with a side outside "
    f"{MIN_SIDE}…{MAX_SIDE} px (ERROR_INVALID_IMAGE_DIMENSION)",
    "aspect": "{n} {units} have an image whose aspect ratio is above "
    f"{MAX_ASPECT_RATIO}:1 (ERROR_INVALID_IMAGE)",
    "size_mismatch": "{n} {units} have an image_size that is not the size of the image (fix image_size "
    "and the boxes)",
    "unannotated": "{n} {units} have no label attribute and are not used (WARNING_UNANNOTATED_RECORD)",
    "unlabelled_file": "{n} {units} are not in a label folder, so they have no label and are not used",
    "off_frame": "{n} bounding boxes are off the image or negative and are left out "
    "(ERROR_INVALID_BOUNDING_BOX)",
    "too_small": "{n} bounding boxes are 1 px or less wide or high (measured after the training resize "
    f"to {TRAINING_RESIZE_SIDE} px) and are left out (ERROR_BOUNDING_BOX_TOO_SMALL)",
    "other_format": "{n} {units} are not in the format of the chosen kind and are left out",
}


def _read_sets(path: Path, test: Path | None, s3_cache: Path) -> list[_Set]:
    if path.is_dir():
        folders = _subfolders(path)
        if "train" in folders and "test" in folders:
            if test is not None:
                return [
                    _fatal_set(path, f"{path} has train/ and test/ folders, and a test set was also given")
                ]
            return [_read_folder(folders["train"], "training"), _read_folder(folders["test"], "test")]
    sets = [_read_any(path, "training", s3_cache)]
    if test is not None:
        sets.append(_read_any(Path(test), "test", s3_cache))
    return sets


def _read_any(path: Path, name: str, s3_cache: Path) -> _Set:
    return _read_folder(path, name) if path.is_dir() else _read_manifest(path, name, s3_cache)


def _fatal_set(origin: Path, problem: str) -> _Set:
    return _Set("training", origin, "line", fatal=[problem])


def _subfolders(path: Path) -> dict[str, Path]:
    return {
        child.name.lower(): child
        for child in sorted(path.iterdir())
        if child.is_dir() and not child.name.startswith(".")
    }


def _read_folder(root: Path, name: str) -> _Set:
    """Label every file by the child folder of `root` it is in (deeper folder names are not used)."""
    part = _Set(name, root, "file")
    labels = [child for child in sorted(root.iterdir()) if child.is_dir() and not child.name.startswith(".")]
    for child in sorted(root.iterdir()):
        if child.is_file() and not child.name.startswith("."):
            part.total += 1
            part.ignore("unlabelled_file", child.name)
    for folder in labels:
        for file in sorted(folder.rglob("*")):
            hidden = any(piece.startswith(".") for piece in file.relative_to(folder).parts)
            if not file.is_file() or hidden:
                continue
            part.total += 1
            where = str(file.relative_to(root))
            if len(folder.name) > MAX_LABEL_NAME:
                part.reject("long_name", where)
                continue
            part.entries.append(_Entry(where, str(file), file, (folder.name,), None))
    if not labels:
        part.fatal.append(
            f"{root} has no label folders: put the images of each label in a folder named after it"
        )
    elif part.total == 0:
        part.fatal.append(f"{root} has no images in its label folders")
    return part


def _read_manifest(manifest: Path, name: str, s3_cache: Path) -> _Set:
    part = _Set(name, manifest, "line")
    try:
        size = manifest.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            part.fatal.append(f"{manifest} is {size / 1024**3:.1f} GB; the guide's maximum is 1 GB")
            return part
        text = manifest.read_bytes().decode("utf-8")
    except FileNotFoundError:
        part.fatal.append(f"{manifest} does not exist")
        return part
    except UnicodeDecodeError as exc:
        part.fatal.append(f"{manifest} is not UTF-8 ({exc})")
        return part
    except OSError as exc:
        part.fatal.append(f"{manifest} cannot be read: {exc}")
        return part
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        part.fatal.append(f"{manifest} is empty: add one JSON line per image")
    elif len(lines) > MAX_MANIFEST_LINES:
        part.fatal.append(f"{manifest} has {len(lines)} lines; the guide's maximum is {MAX_MANIFEST_LINES}")
    else:
        resolver = LineParser(manifest.parent, s3_cache)
        part.total = len(lines)
        for number, raw in enumerate(lines, start=1):
            try:
                part.entries.append(_parse_line(f"line {number}", raw, resolver))
            except _Unannotated as exc:
                part.ignore(exc.kind, exc.detail)
            except _Invalid as exc:
                part.reject(exc.kind, exc.detail)
    return part


def _parse_line(where: str, raw: str, resolver: LineParser) -> _Entry:
    if not raw.strip():
        raise _Invalid("bad_json", f"{where}: blank line")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _Invalid("bad_json", f"{where}: {exc.msg} at column {exc.colno}") from None
    if not isinstance(data, dict):
        raise _Invalid("bad_json", f"{where}: a JSON {type(data).__name__}, not an object")
    source = data.get(SOURCE_REF)
    if not isinstance(source, str) or not source:
        raise _Invalid("no_source", where)
    path = resolver.resolve(source, where)
    if path is None:
        raise _Invalid("bad_ref", f"{where}: {source}")
    entry = _Entry(where, source, path, None, None)
    pairs = _attributes(data, where)
    if not pairs:
        raise _Unannotated("unannotated", where)
    classes: list[str] = []
    boxes: list[Box] = []
    for name, metadata in pairs:
        use_case = metadata.get("type")
        if use_case == CLASSIFICATION_TYPE:
            classes.append(_class_name(name, data[name], metadata, where))
        elif use_case == DETECTION_TYPE:
            boxes += _boxes(entry, name, data[name], metadata)
        else:
            raise _Invalid("bad_type", f"{where}: {name}{_METADATA} type {json.dumps(use_case)}")
    if len(set(classes)) > MAX_LABELS_PER_IMAGE:
        raise _Invalid("too_many_labels", f"{where}: {len(set(classes))} labels")
    if classes:
        entry.classes = tuple(sorted(set(classes)))
    if entry.image_size is not None:
        entry.boxes = tuple(boxes)
    return entry


def _attributes(data: dict[str, Any], where: str) -> list[tuple[str, dict[str, Any]]]:
    """The line's (attribute, metadata) pairs, in line order."""
    keys = [key for key in data if key != SOURCE_REF and key not in _RESERVED_KEYS]
    attributes = [key for key in keys if not key.endswith(_METADATA)]
    described = {key[: -len(_METADATA)] for key in keys if key.endswith(_METADATA)}
    unpaired = [f"{key} without {key}{_METADATA}" for key in attributes if key not in described]
    unpaired += [f"{key}{_METADATA} without {key}" for key in sorted(described - set(attributes))]
    if unpaired:
        raise _Invalid("no_attribute", f"{where}: {'; '.join(unpaired)}")
    pairs = []
    for key in attributes:
        metadata = data[key + _METADATA]
        if not isinstance(metadata, dict):
            raise _Invalid("bad_metadata", f"{where}: {key}{_METADATA} is not an object")
        pairs.append((key, metadata))
    return pairs


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _label_name(name: object, where: str, field_name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise _Invalid("bad_metadata", f"{where}: {field_name} is {json.dumps(name)}, not a label name")
    if len(name) > MAX_LABEL_NAME:
        raise _Invalid("long_name", f"{where}: {field_name} has {len(name)} characters")
    return name


def _class_name(name: str, value: object, metadata: dict[str, Any], where: str) -> str:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid("bad_attribute", f"{where}: {name} is {json.dumps(value)}, not an integer")
    confidence: Any = metadata.get("confidence")
    if not _is_number(confidence) or not 0 <= confidence <= 1:
        raise _Invalid(
            "bad_metadata", f"{where}: {name}{_METADATA} confidence is {json.dumps(confidence)}, not 0..1"
        )
    return _label_name(metadata.get("class-name"), where, f"{name}{_METADATA} class-name")


def _boxes(entry: _Entry, name: str, value: object, metadata: dict[str, Any]) -> list[Box]:
    """The valid boxes of an object-detection attribute; records left-out boxes in `entry.dropped`."""
    where = entry.where
    if not isinstance(value, dict):
        raise _Invalid("bad_attribute", f"{where}: {name} is not an object")
    width, height = _image_size(value.get("image_size"), where, name)
    if entry.image_size not in (None, (width, height)):
        raise _Invalid("bad_attribute", f"{where}: {name} image_size differs from the line's other attribute")
    entry.image_size = (width, height)
    annotations = value.get("annotations")
    if not isinstance(annotations, list):
        raise _Invalid("bad_attribute", f"{where}: {name} has no 'annotations' array")
    if len(annotations) > MAX_BOXES_PER_IMAGE:
        raise _Invalid("too_many_boxes", f"{where}: {len(annotations)} boxes")
    class_map = metadata.get("class-map")
    if not isinstance(class_map, dict):
        raise _Invalid("bad_metadata", f"{where}: {name}{_METADATA} has no 'class-map' object")
    objects = metadata.get("objects")
    if (
        not isinstance(objects, list)
        or len(objects) != len(annotations)
        or not all(isinstance(item, dict) and _is_number(item.get("confidence")) for item in objects)
    ):
        raise _Invalid("no_confidence", f"{where}: {len(annotations)} annotations")
    found = [
        _annotation(item, f"{where}: {name}.annotations[{index}]") for index, item in enumerate(annotations)
    ]
    unknown = sorted({str(class_id) for class_id, _ in found if str(class_id) not in class_map})
    if unknown:
        raise _Invalid("no_class_id", f"{where}: class_id {', '.join(unknown)}")
    scale = min(1.0, TRAINING_RESIZE_SIDE / max(width, height))
    boxes = []
    for index, (class_id, (left, top, box_width, box_height)) in enumerate(found):
        label = _label_name(class_map[str(class_id)], where, f"class-map[{class_id!r}]")
        shown = (
            f"{where}: {name}.annotations[{index}] {label!r} "
            f"left {left:g} top {top:g} {box_width:g}x{box_height:g}"
        )
        if min(left, top, box_width, box_height) < 0 or left + box_width > width or top + box_height > height:
            entry.dropped.append(("off_frame", f"{shown} in a {width}x{height} image"))
        elif box_width * scale <= 1 or box_height * scale <= 1:
            entry.dropped.append(("too_small", shown))
        else:
            boxes.append(Box(label, float(left), float(top), float(box_width), float(box_height)))
    if annotations and not boxes:
        raise _Invalid("no_valid_boxes", f"{where}: {len(annotations)} boxes")
    return boxes


def _image_size(value: object, where: str, name: str) -> tuple[int, int]:
    size = value[0] if isinstance(value, list) and len(value) == 1 else None
    fields: list[Any] = (
        [size.get(key) for key in ("width", "height", "depth")] if isinstance(size, dict) else []
    )
    if len(fields) != 3 or not all(isinstance(item, int) and not isinstance(item, bool) for item in fields):
        raise _Invalid(
            "bad_attribute",
            f"{where}: {name} image_size must be [{{width, height, depth}}], not {json.dumps(value)}",
        )
    return fields[0], fields[1]


def _annotation(item: object, where: str) -> tuple[int, tuple[float, float, float, float]]:
    keys = ("left", "top", "width", "height")
    if not isinstance(item, dict) or not all(_is_number(item.get(key)) for key in keys):
        raise _Invalid(
            "bad_attribute", f"{where} needs numbers left, top, width and height: {json.dumps(item)}"
        )
    class_id = item.get("class_id")
    if not isinstance(class_id, int) or isinstance(class_id, bool):
        raise _Invalid("bad_attribute", f"{where} class_id is {json.dumps(class_id)}, not an integer")
    left, top, width, height = (item[key] for key in keys)
    return class_id, (left, top, width, height)


# Images and the 20 % tolerance


def _bucket_problems(part: _Set) -> list[str]:
    buckets = Counter(
        urlparse(entry.source).netloc for entry in part.entries if entry.source.startswith("s3://")
    )
    if len(buckets) < 2:
        return []
    main = buckets.most_common(1)[0][0]
    others = [
        f"{entry.where}: {entry.source}"
        for entry in part.entries
        if entry.source.startswith("s3://") and urlparse(entry.source).netloc != main
    ]
    return [
        _listing(
            f"{part.origin}: the images are in {len(buckets)} S3 buckets, and the guide requires one "
            f"(ERROR_IMAGES_IN_MULTIPLE_S3_BUCKETS); {buckets[main]} lines use {main}, these do not",
            others,
        )
    ]


def _inspect_images(part: _Set) -> None:
    """Download the set's s3:// images, then keep the entries whose image passes every rule."""
    wanted = {entry.source: entry.path for entry in part.entries if entry.source.startswith("s3://")}
    part.notes += fetch_s3(wanted)
    kept = []
    for entry in part.entries:
        problem = _image_problem(entry)
        if problem is not None:
            part.reject(*problem)
            continue
        for kind, item in entry.dropped:
            part.ignore(kind, item)
        kept.append(entry)
    part.entries = kept


def _image_problem(entry: _Entry) -> tuple[str, str] | None:
    """(kind, item) of the first rule the entry's image breaks; records its size and digest otherwise."""
    shown = f"{entry.where}: {entry.source}" if entry.where.startswith("line ") else entry.where
    try:
        size = entry.path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            return "file_size", f"{shown} ({size / 1024**2:.1f} MB)"
        data = entry.path.read_bytes()
    except OSError:
        return "missing", shown
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format, (width, height) = image.format, image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return "not_image", f"{shown} (not an image)"
    if image_format not in IMAGE_FORMATS:
        return "not_image", f"{shown} ({image_format})"
    if not all(MIN_SIDE <= side <= MAX_SIDE for side in (width, height)):
        return "dimension", f"{shown} ({width}x{height})"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return "aspect", f"{shown} ({width}x{height})"
    if entry.image_size not in (None, (width, height)):
        size_given = "x".join(map(str, entry.image_size or ()))
        return "size_mismatch", f"{shown}: image_size {size_given}, the image {width}x{height}"
    entry.width, entry.height, entry.digest = width, height, hashlib.sha256(data).hexdigest()
    return None


def _tolerance(part: _Set) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a set: invalid lines over 20 % refuse it, up to 20 % are left out."""
    invalid = _listings(part, part.invalid)
    ignored = _listings(part, part.ignored)
    count = sum(len(items) for items in part.invalid.values())
    if not count:
        return [], ignored + part.notes
    share = f"{count} of {part.total} {part.unit}s ({count / part.total:.0%})"
    if count * 5 > part.total:
        head = (
            f"{part.origin}: {share} are invalid, more than the 20 % the guide tolerates "
            "(ERROR_TOO_MANY_INVALID_ROWS_IN_MANIFEST): fix or remove them"
        )
        return [head, *invalid, *part.notes], ignored
    head = f"{part.origin}: {share} are invalid and are left out (the guide tolerates up to 20 %)"
    return [], [head, *invalid, *ignored, *part.notes]


def _listings(part: _Set, found: dict[str, list[str]]) -> list[str]:
    return [
        _listing(f"{part.origin}: " + _TITLES[kind].format(n=len(items), units=part.unit + "s"), items)
        for kind, items in found.items()
    ]


def _listing(title: str, items: Iterable[str]) -> str:
    return title + ":\n" + "\n".join(f"  {item}" for item in items)


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise LabelDatasetError(problems)


# Kind, labels and overlaps


def _describe(part: _Set, entry: _Entry) -> str:
    return f"{part.name} {entry.where}"


def _choose_kind(sets: list[_Set], kind: str | None) -> tuple[str, list[str]]:
    """The dataset's kind, from `kind` or the lines; and warnings for the lines left out of it."""
    image_level = [_describe(part, e) for part in sets for e in part.entries if e.classes is not None]
    located = [_describe(part, e) for part in sets for e in part.entries if e.boxes is not None]
    several = [_describe(part, e) for part in sets for e in part.entries if e.classes and len(e.classes) > 1]
    if not image_level and not located:
        raise LabelDatasetError(["the dataset has no labelled images"])
    if kind is None:
        if image_level and located:
            fewer, name = (
                (image_level, "image-level") if len(image_level) <= len(located) else (located, "object")
            )
            raise LabelDatasetError(
                [
                    _listing(
                        f"the dataset mixes {len(image_level)} image-level ({CLASSIFICATION_TYPE}) and "
                        f"{len(located)} object-location ({DETECTION_TYPE}) lines: choose the kind "
                        "(classification, multi-label or localisation) or remove the lines of the other "
                        f"format; the {name} lines",
                        fewer,
                    )
                ]
            )
        kind = "localisation" if located else "multi-label" if several else "classification"
    problems = []
    if kind == "localisation" and not located:
        problems.append(
            f"kind 'localisation' needs object-location lines ({DETECTION_TYPE}), but the dataset has only "
            f"image-level labels ({CLASSIFICATION_TYPE}), which make a classification or multi-label dataset"
        )
    if kind != "localisation" and not image_level:
        problems.append(
            f"kind {kind!r} needs image-level labels ({CLASSIFICATION_TYPE}), but the dataset has only "
            f"object-location lines ({DETECTION_TYPE}), which make a localisation dataset"
        )
    if kind == "classification" and several:
        problems.append(
            _listing(
                f"{len(several)} lines give an image several labels: only kind 'multi-label' accepts "
                "them (or keep one label per line)",
                several,
            )
        )
    _raise_if(problems)
    return kind, _other_format(sets, kind)


def _other_format(sets: list[_Set], kind: str) -> list[str]:
    warnings = []
    for part in sets:
        keep: list[_Entry] = []
        left_out: list[_Entry] = []
        for entry in part.entries:
            fits = (entry.boxes if kind == "localisation" else entry.classes) is not None
            (keep if fits else left_out).append(entry)
        part.entries = keep
        if left_out:
            warnings += _listings(part, {"other_format": [entry.where for entry in left_out]})
    return warnings


def _labelled_images(part: _Set, kind: str) -> list[LabelledImage]:
    images = []
    for entry in part.entries:
        boxes = entry.boxes or ()
        labels = (
            tuple(sorted({box.label for box in boxes})) if kind == "localisation" else entry.classes or ()
        )
        boxes = boxes if kind == "localisation" else ()
        images.append(LabelledImage(entry.source, entry.path, entry.width, entry.height, labels, boxes))
    return images


def _duplicate_problems(sets: list[_Set]) -> list[str]:
    """The same image (by resolved path or by content) twice in a set, or in both sets."""
    within: list[str] = []
    across: list[str] = []
    training: dict[str, str] = {}
    for part in sets:
        seen: dict[str, str] = {}
        for entry in part.entries:
            keys = {"same file": str(entry.path.resolve()), "same content": entry.digest}
            earlier = _first_match(keys, seen)
            if earlier is not None:
                within.append(f"{part.name} {earlier[1]} and {entry.where} ({earlier[0]})")
            elif part.name == "test" and (other := _first_match(keys, training)) is not None:
                across.append(f"training {other[1]} and test {entry.where} ({other[0]})")
            for key in keys.values():
                seen.setdefault(key, entry.where)
        if part.name == "training":
            training = seen
    problems = []
    if within:
        problems.append(
            _listing(
                f"{len(within)} images are in a set more than once: keep one line per image, "
                "with all its labels",
                within,
            )
        )
    if across:
        problems.append(
            _listing(
                f"{len(across)} images are in both the training and the test set; the guide allows "
                "no overlap (remove them from one set)",
                across,
            )
        )
    return problems


def _first_match(keys: dict[str, str], seen: dict[str, str]) -> tuple[str, str] | None:
    """(how, where) of the first of `keys` already `seen`."""
    return next(((how, seen[key]) for how, key in keys.items() if key in seen), None)


def _label_problems(
    kind: str, train: Sequence[LabelledImage], test: Sequence[LabelledImage], *, automatic: bool
) -> list[str]:
    """The guide's label counts for each set, the labels without training images and the label overlap."""
    train_labels = {label for image in train for label in image.labels}
    test_labels = {label for image in test for label in image.labels}
    minimum = MIN_LABELS[kind]
    problems = []
    for name, labels in (("training", train_labels), ("test", test_labels)):
        if len(labels) < minimum:
            fix = (
                "the automatic split found too few images per label (ERROR_INSUFFICIENT_IMAGES_PER_LABEL_"
                "FOR_AUTOSPLIT): add images, at least 2 per label"
                if automatic and name == "test"
                else "add images of other labels (ERROR_MANIFEST_TOO_FEW_LABELS)"
            )
            shown = ", ".join(sorted(labels)) or "none"
            problems.append(
                f"the {name} set has {len(labels)} labels ({shown}); a {kind} set needs at least "
                f"{minimum}: {fix}"
            )
    if len(train_labels | test_labels) > MAX_LABELS:
        problems.append(
            f"the dataset has {len(train_labels | test_labels)} labels; the guide allows at most "
            f"{MAX_LABELS} (ERROR_MANIFEST_TOO_MANY_LABELS)"
        )
    if only_test := sorted(test_labels - train_labels):
        problems.append(
            _listing(
                f"{len(only_test)} labels are only in the test set; every label needs at least 1 "
                "training image",
                (
                    f"{label}: " + ", ".join(i.source for i in test if label in i.labels)
                    for label in only_test
                ),
            )
        )
    if not automatic and train_labels:
        common = len(train_labels & test_labels) / len(train_labels)
        if common < MIN_LABEL_OVERLAP:
            problems.append(
                _listing(
                    f"only {common:.0%} of the training labels are in the test set, less than the guide's "
                    f"{MIN_LABEL_OVERLAP:.0%} (ERROR_INSUFFICIENT_LABEL_OVERLAP): add test images of these "
                    "labels or remove them from the training set",
                    sorted(train_labels - test_labels),
                )
            )
    return problems
