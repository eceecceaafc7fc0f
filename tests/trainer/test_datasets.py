"""Dataset loading and checking: every accepted layout, every rule of the guide, the cookies dataset."""

from __future__ import annotations

import json
import shutil
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lookout_edge.package import AnomalyLabel
from lookout_edge.trainer.datasets import DatasetError, load_dataset
from lookout_edge.trainer.synthetic import MISSING, SCRATCH, write_synthetic_dataset

COOKIES = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "cookies"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data")


@pytest.fixture
def manifest(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic dataset (20 normal, 10 anomalous, 256x192), to damage at will."""
    shutil.copytree(pristine.parent, tmp_path / "data")
    return tmp_path / "data" / pristine.name


def read_lines(manifest: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def write_lines(manifest: Path, lines: list[dict[str, Any]]) -> Path:
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def edit(manifest: Path, change: Callable[[int, dict[str, Any]], None]) -> Path:
    lines = read_lines(manifest)
    for index, line in enumerate(lines):
        change(index, line)
    return write_lines(manifest, lines)


def problems_of(path: Path, **kwargs: Any) -> str:
    with pytest.raises(DatasetError) as caught:
        load_dataset(path, **kwargs)
    return str(caught.value)


# Accepted layouts


def test_normal_and_anomaly_folders_make_a_classification_dataset(manifest: Path) -> None:
    split = load_dataset(manifest.parent)
    dataset = split.train
    assert split.test is None
    assert (dataset.normal_count, dataset.anomalous_count) == (20, 10)
    assert (dataset.width, dataset.height) == (256, 192)
    assert not dataset.is_segmentation and dataset.labels == ()
    sample = dataset.samples[0]
    assert dataset.load_label_map(sample) is None
    image = dataset.load_image(sample)
    assert image.shape == (192, 256, 3) and image.dtype == np.uint8


def test_folder_names_ignore_case_and_deeper_folders(manifest: Path) -> None:
    root = manifest.parent
    (root / "anomaly").rename(root / "Anomaly")
    (root / "Anomaly" / "batch-2").mkdir()
    for image in sorted((root / "Anomaly").glob("anomaly-00[0-4].png")):
        image.rename(root / "Anomaly" / "batch-2" / image.name)
    (root / "normal" / ".DS_Store").write_bytes(b"\0")
    dataset = load_dataset(root).train
    assert (dataset.normal_count, dataset.anomalous_count) == (20, 10)


def build_train_test(manifest: Path, train_anomalous: int) -> Path:
    root = manifest.parent
    layout = root / "split"
    normals = sorted((root / "normal").glob("*.png"))
    anomalies = sorted((root / "anomaly").glob("*.png"))
    for folder, files in (
        ("train/normal", normals[:10]),
        ("train/anomaly", anomalies[:train_anomalous]),
        ("test/normal", normals[10:]),
        ("test/anomaly", anomalies),
    ):
        (layout / folder).mkdir(parents=True)
        for file in files:
            shutil.copy(file, layout / folder / file.name)
    return layout


def test_train_and_test_folders_make_two_datasets(manifest: Path) -> None:
    split = load_dataset(build_train_test(manifest, train_anomalous=0))
    assert split.test is not None
    assert (split.train.normal_count, split.train.anomalous_count) == (10, 0)
    assert (split.test.normal_count, split.test.anomalous_count) == (10, 10)
    assert split.test.root.name == "test"


def test_segmentation_manifest_with_a_background_entry(manifest: Path) -> None:
    dataset = load_dataset(manifest, check_counts=False).train
    assert dataset.is_segmentation
    assert dataset.labels == (SCRATCH, MISSING)  # first appearance, colour-map keys in numeric order
    assert dataset.label_counts() == {"scratch": 5, "missing": 5}
    for sample in dataset.samples:
        label_map = dataset.load_label_map(sample)
        assert label_map is not None and label_map.shape == (192, 256)
        if not sample.is_anomalous:
            assert sample.mask_path is None and not label_map.any()
            continue
        assert sample.mask_path is not None
        mask = np.asarray(Image.open(sample.mask_path).convert("RGB"))
        painted = (mask != 255).any(axis=2)
        expected = 1 + [label.name for label in dataset.labels].index(sample.anomaly_labels[0])
        assert painted.any()
        assert np.array_equal(label_map, np.where(painted, expected, 0))


def test_segmentation_minimums_per_label_without_test_set(tmp_path: Path) -> None:
    small = write_synthetic_dataset(tmp_path / "data", normal=20, anomalous=40, size=(96, 64))
    assert load_dataset(small).train.label_counts() == {"scratch": 20, "missing": 20}
    message = problems_of(write_synthetic_dataset(tmp_path / "less", anomalous=38, size=(96, 64)))
    assert "fewer than 20 images showing only that label" in message
    assert "scratch: 19" in message and "missing: 19" in message


def test_refs_may_be_absolute_or_file_uris(manifest: Path) -> None:
    root = manifest.parent

    def absolute(index: int, line: dict[str, Any]) -> None:
        image = root / line["source-ref"]
        line["source-ref"] = image.as_uri() if index % 2 else str(image)
        if "anomaly-mask-ref" in line:
            line["anomaly-mask-ref"] = (root / line["anomaly-mask-ref"]).as_uri()

    moved = edit(manifest, absolute).rename(root.parent / "elsewhere.manifest")
    dataset = load_dataset(moved, check_counts=False).train
    assert dataset.anomalous_count == 10 and dataset.label_counts() == {"scratch": 5, "missing": 5}


def to_s3(manifest: Path) -> Path:
    def s3(_: int, line: dict[str, Any]) -> None:
        for key in ("source-ref", "anomaly-mask-ref"):
            if key in line:
                line[key] = f"s3://bucket/dataset/{line[key]}"

    return edit(manifest, s3)


def test_s3_refs_without_boto3_say_how_to_fix(manifest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes `import boto3` raise ImportError
    message = problems_of(to_s3(manifest), s3_cache=manifest.parent / "cache")
    assert "40 s3:// objects (e.g. s3://bucket/dataset/anomaly/anomaly-000.png)" in message
    assert "pip install boto3" in message


def test_s3_refs_are_fetched_once_into_the_cache(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = manifest.parent
    downloads: list[str] = []

    class Client:
        def download_file(self, name: str, key: str, target: str) -> None:
            assert name == "bucket"
            downloads.append(key)
            shutil.copy(bucket / key.removeprefix("dataset/"), target)

    fake = types.ModuleType("boto3")
    fake.client = lambda service: Client()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "boto3", fake)
    s3_manifest = to_s3(manifest)
    cache = tmp_path / "cache"
    dataset = load_dataset(s3_manifest, check_counts=False, s3_cache=cache).train
    assert len(downloads) == 40  # 30 images, 10 masks
    assert dataset.samples[0].image_path == cache / "bucket" / "dataset" / "normal" / "normal-000.png"
    assert not list(cache.rglob(".partial-*"))
    load_dataset(s3_manifest, check_counts=False, s3_cache=cache)
    assert len(downloads) == 40


def test_unlabelled_class_names_are_ignored(manifest: Path) -> None:
    def unlabel(index: int, line: dict[str, Any]) -> None:
        if index in (0, 1):
            line["anomaly-label-metadata"]["class-name"] = "unknown"

    dataset = load_dataset(edit(manifest, unlabel), check_counts=False).train
    assert dataset.normal_count == 18
    assert [path.name for path in dataset.unlabelled] == ["normal-000.png", "normal-001.png"]


# Violations: each names every offending file


def save(path: Path, size: tuple[int, int], image_format: str = "PNG") -> None:
    Image.new("RGB", size, (128, 100, 90)).save(path, format=image_format)


def test_images_must_be_png_or_jpeg_by_content(manifest: Path) -> None:
    normal = manifest.parent / "normal"
    save(normal / "a.bmp", (256, 192), "BMP")
    save(normal / "renamed.png", (256, 192), "GIF")
    (normal / "notes.txt").write_text("not an image")
    message = problems_of(manifest.parent)
    assert "3 images are not PNG or JPEG" in message
    assert "normal/a.bmp (BMP)" in message and "normal/renamed.png (GIF)" in message
    assert "normal/notes.txt (not an image)" in message


def test_image_sides_must_be_64_to_4096(manifest: Path) -> None:
    save(manifest.parent / "normal" / "small.png", (63, 192))
    save(manifest.parent / "normal" / "wide.png", (4097, 64))
    message = problems_of(manifest.parent)
    assert "2 images have a side outside 64…4096 px" in message
    assert "normal/small.png (63x192)" in message and "normal/wide.png (4097x64)" in message


def test_images_must_share_one_size(manifest: Path) -> None:
    save(manifest.parent / "normal" / "odd-1.png", (200, 150))
    save(manifest.parent / "anomaly" / "odd-2.jpg", (192, 256), "JPEG")
    message = problems_of(manifest.parent)
    assert "2 images are not 256x192 like the other 30" in message
    assert "normal/odd-1.png (200x150)" in message and "anomaly/odd-2.jpg (192x256)" in message


def test_train_and_test_must_share_one_size(manifest: Path) -> None:
    layout = build_train_test(manifest, train_anomalous=0)
    for image in (layout / "test" / "normal").glob("*.png"):
        save(image, (128, 96))
    message = problems_of(layout)
    assert "10 images are not 256x192 like the other 20" in message


def test_masks_must_be_png_of_their_image_size(manifest: Path) -> None:
    masks = manifest.parent / "masks"
    for name in ("anomaly-000", "anomaly-001"):
        Image.open(masks / f"{name}.png").convert("RGB").save(masks / f"{name}.jpg", format="JPEG")
    save(masks / "anomaly-002.png", (128, 96))
    save(masks / "anomaly-003.png", (256, 191))

    def point_at_jpegs(index: int, line: dict[str, Any]) -> None:
        if line.get("anomaly-mask-ref", "").endswith(("000.png", "001.png")):
            line["anomaly-mask-ref"] = line["anomaly-mask-ref"].replace(".png", ".jpg")

    message = problems_of(edit(manifest, point_at_jpegs), check_counts=False)
    assert "2 masks are not PNG" in message
    assert "line 21: masks/anomaly-000.jpg (JPEG)" in message and "line 22: masks/anomaly-001.jpg" in message
    assert "2 masks are not the size of their image" in message
    assert "line 23: masks/anomaly-002.png is 128x96, its image 256x192" in message
    assert "line 24: masks/anomaly-003.png is 256x191" in message


def test_mask_colours_must_be_in_the_colour_map(manifest: Path) -> None:
    masks = manifest.parent / "masks"
    for name, color in (("anomaly-004.png", (0, 255, 0)), ("anomaly-007.png", (1, 2, 3))):
        mask = np.asarray(Image.open(masks / name)).copy()
        mask[:4, :4] = color
        Image.fromarray(mask).save(masks / name)
    message = problems_of(manifest, check_counts=False)
    assert "2 masks use colours that are not in their line's internal-color-map" in message
    assert "line 25: masks/anomaly-004.png: #00FF00" in message
    assert "line 28: masks/anomaly-007.png: #010203" in message


def test_palette_masks_are_compared_as_rgb(manifest: Path) -> None:
    masks = manifest.parent / "masks"
    for mask in masks.glob("*.png"):
        Image.open(mask).quantize(colors=4).save(mask, transparency=0)  # palette PNG, like real exports
    dataset = load_dataset(manifest, check_counts=False).train
    assert dataset.label_counts() == {"scratch": 5, "missing": 5}
    for sample in dataset.samples:
        label_map = dataset.load_label_map(sample)
        assert label_map is not None and bool(label_map.any()) == sample.is_anomalous


def test_malformed_json_lines_are_listed(manifest: Path) -> None:
    lines = manifest.read_text().splitlines()
    lines[1] = lines[1][:-1]
    lines[4] = "[1, 2]"
    manifest.write_text("\n".join(lines) + "\n")
    message = problems_of(manifest)
    assert "2 lines are not JSON objects" in message
    assert "line 2: Expecting ',' delimiter" in message and "line 5: a JSON list, not an object" in message


def test_missing_files_are_listed(manifest: Path) -> None:
    (manifest.parent / "normal" / "normal-003.png").unlink()
    (manifest.parent / "masks" / "anomaly-009.png").unlink()
    message = problems_of(manifest)
    assert "2 files are missing" in message
    assert (
        "line 4: image normal/normal-003.png" in message and "line 30: mask masks/anomaly-009.png" in message
    )


def test_anomaly_label_must_be_0_or_1(manifest: Path) -> None:
    def bad_value(index: int, line: dict[str, Any]) -> None:
        line["anomaly-label"] = {3: 2, 6: "1", 7: True}.get(index, line["anomaly-label"])

    message = problems_of(edit(manifest, bad_value))
    assert "3 lines have an anomaly-label that is not 0 or 1" in message
    assert "line 4: anomaly-label = 2" in message and 'line 7: anomaly-label = "1"' in message
    assert "line 8: anomaly-label = true" in message


def test_anomalous_images_need_masks_in_a_segmentation_dataset(manifest: Path) -> None:
    def drop_mask(index: int, line: dict[str, Any]) -> None:
        if index in (20, 25):
            del line["anomaly-mask-ref"], line["anomaly-mask-ref-metadata"]

    message = problems_of(edit(manifest, drop_mask), check_counts=False)
    assert "2 anomalous images have no mask" in message
    assert "line 21: anomaly/anomaly-000.png" in message and "line 26: anomaly/anomaly-005.png" in message


def test_masks_must_agree_with_the_class(manifest: Path) -> None:
    blank = manifest.parent / "masks" / "anomaly-000.png"
    Image.new("RGB", (256, 192), (255, 255, 255)).save(blank)

    def normal_with_mask(index: int, line: dict[str, Any]) -> None:
        if index == 0:
            line["anomaly-mask-ref"] = "masks/anomaly-001.png"
            line["anomaly-mask-ref-metadata"] = read_lines(manifest)[21]["anomaly-mask-ref-metadata"]

    message = problems_of(edit(manifest, normal_with_mask), check_counts=False)
    assert "1 anomalous images have a mask that paints no anomaly label" in message
    assert "line 21: masks/anomaly-000.png" in message
    assert "1 normal images have a mask that paints anomaly labels" in message
    assert "line 1: masks/anomaly-001.png: missing" in message


def test_a_label_has_one_colour(manifest: Path) -> None:
    def recolour(index: int, line: dict[str, Any]) -> None:
        if index in (21, 23):
            line["anomaly-mask-ref-metadata"]["internal-color-map"]["2"]["hex-color"] = "#000000"

    message = problems_of(edit(manifest, recolour), check_counts=False)
    assert "2 colour map entries disagree with earlier lines" in message
    assert "line 22: 'missing' is #000000, not #4363D8" in message and "line 24: 'missing'" in message
    assert "2 labels use a background colour" in message


def test_minimum_counts_without_a_test_set(tmp_path: Path) -> None:
    manifest = write_synthetic_dataset(
        tmp_path / "data", normal=19, anomalous=9, size=(96, 64), segmentation=False
    )
    message = problems_of(manifest)
    assert (
        "the training set has 19 normal images; without a separate test set it needs at least 20" in message
    )
    assert (
        "the training set has 9 anomalous images; without a separate test set it needs at least 10" in message
    )
    assert load_dataset(manifest, check_counts=False).train.anomalous_count == 9


def test_minimum_counts_with_a_test_set(manifest: Path) -> None:
    layout = build_train_test(manifest, train_anomalous=0)
    (layout / "train" / "normal" / "normal-000.png").unlink()
    (layout / "test" / "anomaly" / "anomaly-000.png").unlink()
    message = problems_of(layout)
    assert "the training set has 9 normal images; with a separate test set it needs at least 10" in message
    assert "the test set has 9 anomalous images; with a separate test set it needs at least 10" in message


def test_something_that_is_not_a_dataset(tmp_path: Path) -> None:
    assert "does not exist" in problems_of(tmp_path / "nothing")
    (tmp_path / "pictures").mkdir()
    assert "expected normal/ and anomaly/ folders" in problems_of(tmp_path)


# The synthetic generator


def test_synthetic_dataset_is_deterministic(pristine: Path, tmp_path: Path) -> None:
    again = write_synthetic_dataset(tmp_path / "again")
    files = sorted(path.relative_to(pristine.parent) for path in pristine.parent.rglob("*") if path.is_file())
    assert len(files) == 41  # 30 images, 10 masks, the manifest
    for relative in files:
        assert (pristine.parent / relative).read_bytes() == (again.parent / relative).read_bytes(), relative
    other = write_synthetic_dataset(tmp_path / "other", normal=1, anomalous=0, seed=1)
    first = Path("normal", "normal-000.png")
    assert (other.parent / first).read_bytes() != (pristine.parent / first).read_bytes()


def test_synthetic_anomalies_change_the_pixels_their_masks_mark(pristine: Path) -> None:
    dataset = load_dataset(pristine, check_counts=False).train
    normal = np.stack([dataset.load_image(s) for s in dataset.samples if not s.is_anomalous]).astype(float)
    typical = normal.mean(axis=0)
    for sample in dataset.samples:
        if not sample.is_anomalous:
            continue
        label_map = dataset.load_label_map(sample)
        assert label_map is not None
        (index,) = np.unique(label_map[label_map > 0])
        assert dataset.labels[index - 1].name == sample.anomaly_labels[0]
        # Scratches are dark lines, missing pieces show the dark background: both much darker.
        marked = label_map > 0
        assert dataset.load_image(sample)[marked].mean() < typical[marked].mean() * 0.6


# The cookies dataset: a real export with real quirks


@pytest.mark.skipif(not COOKIES.is_dir(), reason="the cookies dataset is not in ../shared/datasets")
def test_cookies_dataset_loads() -> None:
    dataset = load_dataset(COOKIES / "train.manifest").train
    assert (dataset.normal_count, dataset.anomalous_count) == (31, 32)
    assert (dataset.width, dataset.height) == (576, 768)
    assert dataset.labels == (AnomalyLabel("cracked", "#23A436"),)
    for sample in dataset.samples:
        label_map = dataset.load_label_map(sample)
        assert label_map is not None and label_map.shape == (768, 576)
        assert bool(label_map.any()) == sample.is_anomalous
