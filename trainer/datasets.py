"""Labelled image datasets for training, loaded and checked by the rules of the Lookout for Vision guide.

`load_dataset` accepts three layouts:

- a folder with ``normal/`` and ``anomaly/`` sub-folders: images are labelled by the folder they are in
  (names compared without case; deeper sub-folder names are not used, as in the guide's automatic
  labelling). The guide cannot assign segmentation labels this way, so folders are classification-only;
- a folder with ``train/`` and ``test/``, each laid out as above: separate training and test sets;
- a SageMaker Ground Truth manifest file (see `trainer.groundtruth`), classification or segmentation.

Loading reads images and masks but writes nothing (except the local copies of ``s3://`` refs, see
`trainer.groundtruth`). Every rule is checked over the whole dataset before anything is reported, and a
`DatasetError` lists every offending file, so that one run shows everything there is to fix.

The rules, as read from the guide (« Préparation d'images pour un jeu de données », « Quotas »):

- images are PNG or JPEG (by content, not by extension), each side 64…4096 px, and all images of the
  training and test sets have one size; masks are PNG, the size of their image;
- every mask colour is in its line's ``internal-color-map``; the background may be white (#FFFFFF, the
  guide's rule), black (#000000, what real exports contain) or the line's ``BACKGROUND`` colour;
- a label has one colour and a colour one label across the manifest; at most 100 labels (quota);
- in a segmentation dataset every anomalous image has a mask painting at least one label, and normal
  images paint none (they may have no mask at all);
- minimum image counts. Without a separate test set: at least 20 normal and 10 anomalous images, and for
  segmentation at least 20 images of each anomaly label. With a separate test set: the training set needs
  at least 10 normal images (anomalous ones are optional), the test set at least 10 normal and 10
  anomalous images, and for segmentation each set needs at least 10 images of each label. Only images
  showing a single label count towards a label's minimum, as the guide says.

The guide's maximum counts (16,000 training images, 8 MB files, ...) are limits of the hosted service,
not of training, and are not enforced.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lookout_edge.images import to_rgb888
from lookout_edge.package import MAX_SIDE, MIN_SIDE, AnomalyLabel
from lookout_edge.trainer.groundtruth import parse_manifest

IMAGE_FORMATS = ("PNG", "JPEG")
BACKGROUND_COLORS = frozenset({"#FFFFFF", "#000000"})
MAX_LABELS = 100


class DatasetError(ValueError):
    """A dataset that cannot be used for training; `problems` holds one message per kind of problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("the dataset cannot be used:\n" + "\n".join(f"- {p}" for p in self.problems))


@dataclass(frozen=True)
class Sample:
    image_path: Path
    is_anomalous: bool
    mask_path: Path | None = None
    # Names of the labels painted on the mask (segmentation datasets only).
    anomaly_labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dataset:
    """Checked samples of one size; label i of a label map is ``labels[i - 1]``, 0 is the background."""

    samples: tuple[Sample, ...]
    labels: tuple[AnomalyLabel, ...]
    width: int
    height: int
    root: Path
    # Manifest images whose class name is neither "normal" nor "anomaly": ignored, as the guide says.
    unlabelled: tuple[Path, ...] = field(default=())

    @property
    def is_segmentation(self) -> bool:
        return bool(self.labels)

    @property
    def normal_count(self) -> int:
        return sum(not sample.is_anomalous for sample in self.samples)

    @property
    def anomalous_count(self) -> int:
        return sum(sample.is_anomalous for sample in self.samples)

    def label_counts(self) -> dict[str, int]:
        """Images per label, counting only images that show that label alone (the guide's minimums)."""
        counts = dict.fromkeys((label.name for label in self.labels), 0)
        for sample in self.samples:
            if len(sample.anomaly_labels) == 1:
                counts[sample.anomaly_labels[0]] += 1
        return counts

    def load_image(self, sample: Sample) -> np.ndarray:
        """The image as [H, W, 3] uint8 RGB; gray images (8 or 16 bits) by the rule of lookout_edge.images."""
        with Image.open(sample.image_path) as image:
            try:
                pixels = to_rgb888(image)
            except ValueError as exc:
                raise DatasetError([f"{sample.image_path}: {exc}"]) from None
        self._check_shape(sample.image_path, pixels.shape[:2])
        return pixels

    def load_label_map(self, sample: Sample) -> np.ndarray | None:
        """[H, W] uint8 label indices (0 = background); None for classification datasets."""
        if not self.is_segmentation:
            return None
        label_map = np.zeros((self.height, self.width), dtype=np.uint8)
        if sample.mask_path is None:
            return label_map
        packed = _pack(_mask_rgb(sample.mask_path))
        self._check_shape(sample.mask_path, packed.shape)
        for index, label in enumerate(self.labels, start=1):
            label_map[packed == _pack_color(label.color)] = index
        return label_map

    def _check_shape(self, path: Path, shape: tuple[int, ...]) -> None:
        if shape != (self.height, self.width):
            raise DatasetError(
                [
                    f"{path} is now {shape[1]}x{shape[0]}, not {self.width}x{self.height}: "
                    "it changed after the dataset was loaded"
                ]
            )


@dataclass(frozen=True)
class DatasetSplit:
    train: Dataset
    test: Dataset | None  # None: one dataset, which the trainer splits itself


def load_dataset(path: Path, *, check_counts: bool = True, s3_cache: Path | None = None) -> DatasetSplit:
    """Load and check a dataset folder or manifest; raise `DatasetError` listing everything to fix.

    `check_counts=False` skips the guide's minimum image counts, for quick experiments only: models
    trained on fewer images are poor. `s3_cache` is where ``s3://`` refs are downloaded.
    """
    parts = _collect(Path(path), s3_cache)
    return _check(parts, check_counts)


@dataclass
class _Record:
    sample: Sample
    labels: tuple[AnomalyLabel, ...] = ()  # the colour map of its manifest line, without background
    background: str | None = None
    where: str = ""  # "line N: " for manifest lines


@dataclass
class _Part:
    name: str  # "training" or "test"
    root: Path
    records: list[_Record]
    unlabelled: list[Path] = field(default_factory=list)


def _collect(path: Path, s3_cache: Path | None) -> list[_Part]:
    if path.is_file() or (not path.exists() and path.suffix == ".manifest"):
        parsed = parse_manifest(path, s3_cache)
        if parsed.problems:
            raise DatasetError(parsed.problems)
        part = _Part("training", path.parent, [])
        for entry in parsed.entries:
            if entry.is_anomalous is None:
                part.unlabelled.append(entry.image)
                continue
            sample = Sample(entry.image, entry.is_anomalous, entry.mask)
            part.records.append(_Record(sample, entry.labels, entry.background, f"line {entry.line}: "))
        return [part]
    if not path.is_dir():
        raise DatasetError([f"{path} does not exist"])
    folders = _subfolders(path)
    if "train" in folders and "test" in folders:
        return [_folder_part("training", folders["train"]), _folder_part("test", folders["test"])]
    if "normal" in folders or "anomaly" in folders:
        return [_folder_part("training", path)]
    raise DatasetError(
        [
            f"{path} is not a dataset: expected normal/ and anomaly/ folders, train/ and test/ folders "
            "that each hold normal/ and anomaly/, or a Ground Truth manifest file"
        ]
    )


def _subfolders(path: Path) -> dict[str, Path]:
    return {child.name.lower(): child for child in sorted(path.iterdir()) if child.is_dir()}


def _folder_part(name: str, root: Path) -> _Part:
    folders = _subfolders(root)
    if "normal" not in folders:
        raise DatasetError([f"{root} has no normal/ folder: put the images of normal objects there"])
    records = []
    for folder, is_anomalous in (("normal", False), ("anomaly", True)):
        if folder not in folders:
            continue
        base = folders[folder]
        for file in sorted(base.rglob("*")):
            hidden = any(part.startswith(".") for part in file.relative_to(base).parts)
            if file.is_file() and not hidden:
                records.append(_Record(Sample(file, is_anomalous)))
    return _Part(name, root, records)


def _listing(title: str, items: Iterable[str]) -> str:
    return title + ":\n" + "\n".join(f"  {item}" for item in items)


def _show(path: Path, part: _Part) -> str:
    try:
        return str(path.relative_to(part.root))
    except ValueError:
        return str(path)


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise DatasetError(problems)


def _check(parts: list[_Part], check_counts: bool) -> DatasetSplit:
    _raise_if(_file_problems(parts))
    width, height = _check_headers(parts)
    labels = _check_labels(parts)
    _check_masks(parts)
    datasets = [
        Dataset(
            samples=tuple(record.sample for record in part.records),
            labels=labels,
            width=width,
            height=height,
            root=part.root,
            unlabelled=tuple(part.unlabelled),
        )
        for part in parts
    ]
    split = DatasetSplit(datasets[0], datasets[1] if len(datasets) > 1 else None)
    if check_counts:
        _raise_if(_count_problems(split))
    return split


def _file_problems(parts: list[_Part]) -> list[str]:
    missing, duplicates = [], []
    for part in parts:
        seen: set[Path] = set()
        for record in part.records:
            sample = record.sample
            for kind, path in (("image", sample.image_path), ("mask", sample.mask_path)):
                if path is not None and not path.is_file():
                    missing.append(f"{record.where}{kind} {_show(path, part)}")
            if sample.image_path in seen:
                duplicates.append(f"{record.where}{_show(sample.image_path, part)}")
            seen.add(sample.image_path)
    problems = []
    if missing:
        problems.append(
            _listing(f"{len(missing)} files are missing (fix the refs or add the files)", missing)
        )
    if duplicates:
        problems.append(
            _listing(f"{len(duplicates)} images are listed more than once (keep one)", duplicates)
        )
    return problems


def _header(path: Path) -> tuple[str | None, tuple[int, int]]:
    """Format and size from the file header alone: PIL decodes pixels lazily."""
    try:
        with Image.open(path) as image:
            return image.format, image.size
    except (OSError, Image.DecompressionBombError):
        return None, (0, 0)


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _check_headers(parts: list[_Part]) -> tuple[int, int]:
    """Check formats and sizes of every image and mask; return the images' (width, height)."""
    bad_format, bad_side, bad_mask_format, bad_mask_size = [], [], [], []
    sizes: dict[str, tuple[int, int]] = {}
    for part in parts:
        for record in part.records:
            shown = record.where + _show(record.sample.image_path, part)
            image_format, size = _header(record.sample.image_path)
            if image_format not in IMAGE_FORMATS:
                bad_format.append(f"{shown} ({image_format or 'not an image'})")
                continue
            if not all(MIN_SIDE <= side <= MAX_SIDE for side in size):
                bad_side.append(f"{shown} ({_size(size)})")
            sizes[shown] = size
            if record.sample.mask_path is None:
                continue
            mask_shown = record.where + _show(record.sample.mask_path, part)
            mask_format, mask_size = _header(record.sample.mask_path)
            if mask_format != "PNG":
                bad_mask_format.append(f"{mask_shown} ({mask_format or 'not an image'})")
            elif mask_size != size:
                bad_mask_size.append(f"{mask_shown} is {_size(mask_size)}, its image {_size(size)}")
    problems = []
    if bad_format:
        problems.append(
            _listing(
                f"{len(bad_format)} images are not PNG or JPEG (convert them; renaming is not enough)",
                bad_format,
            )
        )
    if bad_side:
        problems.append(
            _listing(
                f"{len(bad_side)} images have a side outside {MIN_SIDE}…{MAX_SIDE} px (resize them)", bad_side
            )
        )
    counts = Counter(sizes.values())
    common = max(counts, key=lambda size: counts[size], default=(0, 0))
    odd = [f"{shown} ({_size(size)})" for shown, size in sizes.items() if size != common]
    if odd:
        problems.append(
            _listing(
                f"{len(odd)} images are not {_size(common)} like the other {counts[common]}; all training "
                "and test images must have one size (resize or crop them)",
                odd,
            )
        )
    if bad_mask_format:
        problems.append(
            _listing(
                f"{len(bad_mask_format)} masks are not PNG (convert them; renaming is not enough)",
                bad_mask_format,
            )
        )
    if bad_mask_size:
        problems.append(
            _listing(f"{len(bad_mask_size)} masks are not the size of their image", bad_mask_size)
        )
    _raise_if(problems)
    if not sizes:
        raise DatasetError(["the dataset has no images"])
    return common


def _check_labels(parts: list[_Part]) -> tuple[AnomalyLabel, ...]:
    """Merge the lines' colour maps into the dataset's labels, in order of first appearance.

    Within a line, colour-map entries are taken in numeric key order; lines in manifest order, training
    set before test set. The order is therefore stable for a given manifest.
    """
    by_name: dict[str, AnomalyLabel] = {}
    by_color: dict[str, str] = {}
    conflicts, on_background, without_mask = [], [], []
    for part in parts:
        for record in part.records:
            for label in record.labels:
                known = by_name.setdefault(label.name, label)
                if known.color != label.color:
                    conflicts.append(f"{record.where}'{label.name}' is {label.color}, not {known.color}")
                owner = by_color.setdefault(label.color, label.name)
                if owner != label.name:
                    conflicts.append(f"{record.where}{label.color} is '{label.name}', not '{owner}'")
                if label.color in BACKGROUND_COLORS | {record.background}:
                    on_background.append(f"{record.where}'{label.name}' is {label.color}")
    segmentation = any(record.sample.mask_path for part in parts for record in part.records)
    if segmentation:
        without_mask = [
            record.where + _show(record.sample.image_path, part)
            for part in parts
            for record in part.records
            if record.sample.is_anomalous and record.sample.mask_path is None
        ]
    problems = []
    if conflicts:
        problems.append(
            _listing(
                f"{len(conflicts)} colour map entries disagree with earlier lines; a label must have one "
                "colour and a colour one label (fix the internal-color-map)",
                sorted(set(conflicts), key=conflicts.index),
            )
        )
    if on_background:
        problems.append(
            _listing(
                f"{len(on_background)} labels use a background colour (#FFFFFF, #000000 or the line's "
                "BACKGROUND); give them another colour in the manifest and the masks",
                on_background,
            )
        )
    if without_mask:
        problems.append(
            _listing(
                f"{len(without_mask)} anomalous images have no mask, but other lines have masks: a "
                "segmentation dataset needs a mask for every anomalous image (add anomaly-mask-ref)",
                without_mask,
            )
        )
    if len(by_name) > MAX_LABELS:
        problems.append(f"{len(by_name)} anomaly labels; the guide allows at most {MAX_LABELS}")
    _raise_if(problems)
    return tuple(by_name.values())


def _check_masks(parts: list[_Part]) -> None:
    """Check mask colours against each line's colour map, and record which labels each mask paints."""
    unknown, empty, painted_normal = [], [], []
    for part in parts:
        for record in part.records:
            sample = record.sample
            if sample.mask_path is None:
                continue
            colors = _mask_colors(sample.mask_path)
            allowed = {label.color for label in record.labels} | BACKGROUND_COLORS | {record.background}
            shown = record.where + _show(sample.mask_path, part)
            if stray := sorted(colors - allowed):
                more = f" and {len(stray) - 8} more" if len(stray) > 8 else ""
                unknown.append(f"{shown}: {', '.join(stray[:8])}{more}")
            painted = tuple(label.name for label in record.labels if label.color in colors)
            if sample.is_anomalous and not painted:
                empty.append(shown)
            if not sample.is_anomalous and painted:
                painted_normal.append(f"{shown}: {', '.join(painted)}")
            record.sample = Sample(sample.image_path, sample.is_anomalous, sample.mask_path, painted)
    problems = []
    if unknown:
        problems.append(
            _listing(
                f"{len(unknown)} masks use colours that are not in their line's internal-color-map (fix the "
                "hex-color values or repaint the masks; the background may be #FFFFFF or #000000)",
                unknown,
            )
        )
    if empty:
        problems.append(
            _listing(
                f"{len(empty)} anomalous images have a mask that paints no anomaly label (paint the anomaly)",
                empty,
            )
        )
    if painted_normal:
        problems.append(
            _listing(
                f"{len(painted_normal)} normal images have a mask that paints anomaly labels (label them "
                "anomaly or clear the mask)",
                painted_normal,
            )
        )
    _raise_if(problems)


def check_counts(split: DatasetSplit) -> None:
    """Raise `DatasetError` when `split` falls short of the guide's minimum counts."""
    _raise_if(_count_problems(split))


def _count_problems(split: DatasetSplit) -> list[str]:
    """The guide's minimum counts; see the module docstring."""
    single = split.test is None
    per_label = 20 if single else 10
    sets = [("training set", split.train, 20 if single else 10, 10 if single else 0)]
    if split.test is not None:
        sets.append(("test set", split.test, 10, 10))
    setup = "without a separate test set" if single else "with a separate test set"
    problems = []
    for name, dataset, min_normal, min_anomalous in sets:
        for kind, count, minimum in (
            ("normal", dataset.normal_count, min_normal),
            ("anomalous", dataset.anomalous_count, min_anomalous),
        ):
            if count < minimum:
                problems.append(
                    f"the {name} has {count} {kind} images; {setup} it needs at least {minimum} "
                    f"(add {kind} images)"
                )
        if dataset.is_segmentation:
            counts = dataset.label_counts()
            short = [f"{label}: {count}" for label, count in counts.items() if count < per_label]
            if short:
                problems.append(
                    _listing(
                        f"in the {name}, {len(short)} labels have fewer than {per_label} images showing only "
                        f"that label, which {setup} is the minimum (add images, or remove the label "
                        "from the internal-color-map)",
                        short,
                    )
                )
    return problems


def _pack_color(color: str) -> int:
    return int(color[1:], 16)


def _pack(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W] uint32 0xRRGGBB, so that a colour compares in one operation."""
    channels = rgb.astype(np.uint32)
    return (channels[..., 0] << 16) | (channels[..., 1] << 8) | channels[..., 2]


def _palette(image: Image.Image) -> np.ndarray | None:
    """A palette image's 256 RGB entries (missing ones black, as PIL shows them), ignoring transparency."""
    values = image.getpalette()
    if image.mode != "P" or values is None:
        return None
    table = np.zeros((256, 3), dtype=np.uint8)
    entries = np.asarray(values, dtype=np.uint8).reshape(-1, 3)[:256]
    table[: len(entries)] = entries
    return table


def _mask_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        table = _palette(image)
        if table is not None:
            return table[np.asarray(image)]
        return np.asarray(image.convert("RGB"))


def _mask_colors(path: Path) -> set[str]:
    """The '#RRGGBB' colours a mask uses, read as RGB like the guide's troubleshooting snippet."""
    with Image.open(path) as image:
        table = _palette(image)
        if table is not None:
            used = np.flatnonzero(np.bincount(np.asarray(image).ravel(), minlength=256))
            rgb = table[used]
        else:
            converted = image.convert("RGB")
            found = converted.getcolors(256)  # fast for the few colours a mask should have
            if found is not None:
                rgb = np.asarray([color for _, color in found], dtype=np.uint8)
            else:
                rgb = np.unique(np.asarray(converted).reshape(-1, 3), axis=0)
    return {"#{:02X}{:02X}{:02X}".format(*map(int, color)) for color in rgb}
