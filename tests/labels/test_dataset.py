"""Custom Labels datasets: folders, manifests, every validation rule of the guide, the automatic split."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lookout_edge.trainer.labels.dataset import (
    Box,
    LabelDataset,
    LabelDatasetError,
    LabelledImage,
    load_label_dataset,
    read_rgb,
)

_unique = itertools.count(1)


def image(path: Path, size: tuple[int, int] = (96, 64), image_format: str = "PNG") -> Path:
    """A small real image whose pixels differ from every other image the tests write."""
    index = next(_unique)
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[..., 0] = index % 256
    pixels[..., 1] = index // 256
    pixels[: size[1] // 2, : size[0] // 2, 2] = 200
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, image_format)
    return path


def classification_line(
    ref: str, label: str, attribute: str = "testdataset-classification"
) -> dict[str, Any]:
    """An image-level JSON line, as in the guide's sunrise example."""
    return {
        "source-ref": ref,
        attribute: 1,
        f"{attribute}-metadata": {
            "confidence": 1,
            "job-name": f"labeling-job/{attribute}",
            "class-name": label,
            "human-annotated": "yes",
            "creation-date": "2020-03-06T17:46:39.176",
            "type": "groundtruth/image-classification",
        },
    }


def multi_label_line(ref: str, labels: list[str]) -> dict[str, Any]:
    """One image-level attribute per label, as in the guide's football/ball example."""
    line: dict[str, Any] = {"source-ref": ref}
    for index, label in enumerate(labels):
        attribute = classification_line(ref, label, f"sport{index}")
        line[f"sport{index}"] = index
        line[f"sport{index}-metadata"] = attribute[f"sport{index}-metadata"]
    return line


ECHO_MAP = {"0": "Echo", "1": "Echo Dot"}


def detection_line(
    ref: str,
    boxes: list[tuple[int, float, float, float, float]],  # class_id, left, top, width, height
    size: tuple[int, int] = (96, 64),
    class_map: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An object-location JSON line, as in the guide's Echo / Echo Dot example."""
    return {
        "source-ref": ref,
        "bounding-box": {
            "image_size": [{"width": size[0], "height": size[1], "depth": 3}],
            "annotations": [
                {"class_id": c, "top": top, "left": left, "width": w, "height": h}
                for c, left, top, w, h in boxes
            ],
        },
        "bounding-box-metadata": {
            "objects": [{"confidence": 1} for _ in boxes],
            "class-map": ECHO_MAP if class_map is None else class_map,
            "type": "groundtruth/object-detection",
            "human-annotated": "yes",
            "creation-date": "2013-11-18T02:53:27",
            "job-name": "my job",
        },
    }


def write_manifest(path: Path, lines: list[dict[str, Any] | str]) -> Path:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def classification_lines(
    folder: Path, per_label: int = 3, labels: tuple[str, ...] = ("a", "b"), prefix: str = ""
) -> list[Any]:
    """`per_label` lines of each label, their images named <prefix><label><index>.png in `folder`."""
    return [
        classification_line(image(folder / f"{prefix}{label}{index}.png").name, label)
        for label in labels
        for index in range(per_label)
    ]


def detection_lines(folder: Path, count: int = 6, prefix: str = "") -> list[Any]:
    """`count` lines of one box each, alternately Echo and Echo Dot."""
    return [
        detection_line(image(folder / f"{prefix}d{index}.png").name, [(index % 2, 10, 8, 30, 20)])
        for index in range(count)
    ]


def problems_of(path: Path, **kwargs: Any) -> str:
    with pytest.raises(LabelDatasetError) as caught:
        load_label_dataset(path, **kwargs)
    return str(caught.value)


def sources(images: tuple[LabelledImage, ...]) -> list[str]:
    return [item.source for item in images]


# Folders: labels from folder names


def test_folder_names_are_labels_and_deeper_folders_are_not(tmp_path: Path) -> None:
    root = tmp_path / "alexa-devices"
    for index in range(5):
        image(root / "echo" / f"echo-image-{index}.png")
        image(root / "echo-dot" / "white-echo-dot" / f"white-{index}.jpg", image_format="JPEG")
    image(root / "unlabelled.png")
    (root / "echo" / ".hidden.png").write_bytes(b"not read")

    dataset = load_label_dataset(root)

    assert dataset.kind == "classification"
    assert dataset.labels == ("echo", "echo-dot")
    assert dataset.test_split_automatic
    everything = dataset.train + dataset.test
    assert len(everything) == 10
    assert {item.labels for item in everything if "white" in item.source} == {("echo-dot",)}
    assert all(item.boxes == () and (item.width, item.height) == (96, 64) for item in everything)
    assert "unlabelled.png" in "\n".join(dataset.warnings)


def test_train_and_test_folders_are_separate_sets(tmp_path: Path) -> None:
    for part, count in (("train", 4), ("test", 2)):
        for label in ("cat", "dog"):
            for index in range(count):
                image(tmp_path / part / label / f"{index}.png")

    dataset = load_label_dataset(tmp_path, "multi-label")

    assert dataset.kind == "multi-label"
    assert not dataset.test_split_automatic
    assert (len(dataset.train), len(dataset.test)) == (8, 4)
    assert all("/test/" in item.source for item in dataset.test)


def test_a_folder_without_label_folders_is_refused(tmp_path: Path) -> None:
    image(tmp_path / "a.png")
    assert "has no label folders" in problems_of(tmp_path)


# Manifests


def test_classification_manifest_as_in_the_guide(tmp_path: Path) -> None:
    ref = image(tmp_path / "images" / "sunrise.png")
    lines: list[Any] = [classification_line("images/sunrise.png", "Sunrise")]
    lines += [classification_line(str(image(tmp_path / "images" / f"s{i}.png")), "Sunrise") for i in range(2)]
    lines += [classification_line(image(tmp_path / f"n{i}.png").as_uri(), "Night") for i in range(3)]

    dataset = load_label_dataset(write_manifest(tmp_path / "train.manifest", lines), seed=3)

    assert dataset.kind == "classification"
    assert dataset.labels == ("Night", "Sunrise")
    by_source = {item.source: item for item in dataset.train + dataset.test}
    assert by_source["images/sunrise.png"].path == ref
    assert by_source["images/sunrise.png"].labels == ("Sunrise",)
    assert dataset.warnings == ()


def test_multi_label_lines(tmp_path: Path) -> None:
    lines = [
        multi_label_line(image(tmp_path / f"{i}.png").name, labels)
        for i, labels in enumerate([["football", "ball"], ["football"], ["ball"], ["tennis", "ball"]] * 2)
    ]
    manifest = write_manifest(tmp_path / "sport.manifest", lines)

    dataset = load_label_dataset(manifest)

    assert dataset.kind == "multi-label"
    assert dataset.labels == ("ball", "football", "tennis")
    assert {item.labels for item in dataset.train + dataset.test} == {
        ("ball", "football"),
        ("football",),
        ("ball",),
        ("ball", "tennis"),
    }
    refused = problems_of(manifest, kind="classification")
    assert "only kind 'multi-label' accepts them" in refused
    assert all(f"training line {n}\n" in refused + "\n" for n in (1, 4, 5, 8))
    assert "training line 2\n" not in refused


def test_localisation_request_on_a_classification_manifest_names_both(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.manifest", classification_lines(tmp_path))
    message = problems_of(manifest, kind="localisation")
    assert "kind 'localisation'" in message
    assert "groundtruth/image-classification" in message
    assert "groundtruth/object-detection" in message


def test_classification_request_on_a_localisation_manifest_names_both(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.manifest", detection_lines(tmp_path))
    message = problems_of(manifest, kind="classification")
    assert "kind 'classification'" in message and "localisation dataset" in message


def test_localisation_boxes_are_pixels_and_negative_images_are_kept(tmp_path: Path) -> None:
    image(tmp_path / "IMG_1186.png", size=(640, 480))
    guide_line = (
        '{"source-ref": "IMG_1186.png", "bounding-box": {"image_size": [{"width": 640, "height": 480, '
        '"depth": 3}], "annotations": [{"class_id": 1, "top": 251, "left": 399, "width": 155, '
        '"height": 101}, {"class_id": 0, "top": 65, "left": 86, "width": 220, "height": 334}]}, '
        '"bounding-box-metadata": '
        '{"objects": [{"confidence": 1}, {"confidence": 1}], "class-map": {"0": "Echo", "1": "Echo Dot"}, '
        '"type": "groundtruth/object-detection", "human-annotated": "yes", "creation-date": '
        '"2013-11-18T02:53:27", "job-name": "my job"}}'
    )
    negative = detection_line(image(tmp_path / "empty.png").name, [], class_map={})
    lines: list[Any] = [guide_line, negative, *detection_lines(tmp_path, 4)]
    test_lines = detection_lines(tmp_path / "test", 2)
    dataset = load_label_dataset(
        write_manifest(tmp_path / "train.manifest", lines),
        test=write_manifest(tmp_path / "test" / "test.manifest", test_lines),
    )

    assert dataset.kind == "localisation"
    assert dataset.labels == ("Echo", "Echo Dot")
    first = dataset.train[0]
    assert (first.width, first.height) == (640, 480)
    assert first.labels == ("Echo", "Echo Dot")
    assert first.boxes == (Box("Echo Dot", 399, 251, 155, 101), Box("Echo", 86, 65, 220, 334))
    assert dataset.train[1].labels == () and dataset.train[1].boxes == ()
    assert not dataset.test_split_automatic and len(dataset.test) == 2


def test_boxes_off_the_image_or_too_small_are_left_out_with_a_warning(tmp_path: Path) -> None:
    big = image(tmp_path / "big.png", size=(2560, 1280)).name  # trained at 1280x640: half the pixels
    lines: list[Any] = detection_lines(tmp_path)
    lines[0] = detection_line(
        lines[0]["source-ref"], [(0, 10, 8, 30, 20), (1, 80, 8, 30, 20), (1, -1, 0, 10, 10), (0, 5, 5, 1, 10)]
    )
    lines.append(detection_line(big, [(0, 0, 0, 100, 100), (1, 10, 10, 100, 2)], size=(2560, 1280)))

    dataset = load_label_dataset(write_manifest(tmp_path / "m.manifest", lines))

    kept = {item.source: item.boxes for item in dataset.train + dataset.test}
    assert kept[lines[0]["source-ref"]] == (Box("Echo", 10, 8, 30, 20),)
    assert kept[big] == (Box("Echo", 0, 0, 100, 100),)
    warnings = "\n".join(dataset.warnings)
    assert "2 bounding boxes are off the image or negative" in warnings
    assert "line 1: bounding-box.annotations[1] 'Echo Dot' left 80 top 8 30x20 in a 96x64 image" in warnings
    assert "line 1: bounding-box.annotations[2]" in warnings
    assert "2 bounding boxes are 1 px or less" in warnings
    assert "line 7: bounding-box.annotations[1]" in warnings


def test_a_mixed_manifest_needs_a_kind_and_leaves_the_other_lines_out(tmp_path: Path) -> None:
    lines = [*detection_lines(tmp_path), *classification_lines(tmp_path, 1)]
    manifest = write_manifest(tmp_path / "m.manifest", lines)
    message = problems_of(manifest)
    assert "mixes 2 image-level" in message and "training line 7\n  training line 8" in message

    dataset = load_label_dataset(manifest, "localisation")
    assert dataset.kind == "localisation" and len(dataset.train + dataset.test) == 6
    assert (
        "2 lines are not in the format of the chosen kind and are left out:\n  line 7\n  line 8"
        in "\n".join(dataset.warnings)
    )


# One test per line-level rule: 2 broken lines of 8 are over the 20 % and list the offenders


Change = Callable[[Path, dict[str, Any]], "dict[str, Any] | str"]


def _set(key: str, value: Any) -> Change:
    def change(folder: Path, line: dict[str, Any]) -> dict[str, Any]:
        line[key] = value
        return line

    return change


def _metadata(attribute: str, key: str, value: Any) -> Change:
    def change(folder: Path, line: dict[str, Any]) -> dict[str, Any]:
        line[f"{attribute}-metadata"][key] = value
        return line

    return change


def _drop(key: str) -> Change:
    def change(folder: Path, line: dict[str, Any]) -> dict[str, Any]:
        del line[key]
        return line

    return change


def _image(size: tuple[int, int], image_format: str = "PNG", padding: int = 0) -> Change:
    def change(folder: Path, line: dict[str, Any]) -> dict[str, Any]:
        path = image(folder / f"odd{next(_unique)}.img", size, image_format)
        with path.open("ab") as file:
            file.truncate(path.stat().st_size + padding)
        line["source-ref"] = path.name
        return line

    return change


def _annotations(boxes: list[dict[str, Any]]) -> Change:
    def change(folder: Path, line: dict[str, Any]) -> dict[str, Any]:
        line["bounding-box"]["annotations"] = boxes
        line["bounding-box-metadata"]["objects"] = [{"confidence": 1} for _ in boxes]
        return line

    return change


def _text_file(folder: Path, line: dict[str, Any]) -> dict[str, Any]:
    (folder / "notes.png").write_text("not an image")
    return {**line, "source-ref": "notes.png"}


def _wrong_image_size(folder: Path, line: dict[str, Any]) -> dict[str, Any]:
    line["bounding-box"]["image_size"] = [{"width": 128, "height": 64, "depth": 3}]
    return line


CLASSIFICATION_RULES: dict[str, tuple[Change, str]] = {
    "invalid JSON": (
        lambda folder, line: json.dumps(line)[:-2],
        "are not JSON objects (ERROR_INVALID_JSON_LINE",
    ),
    "blank line": (lambda folder, line: "", "blank line"),
    "not an object": (lambda folder, line: "[1, 2]", "a JSON list, not an object"),
    "no source-ref": (_drop("source-ref"), "(ERROR_MISSING_SOURCE_REF)"),
    "https source-ref": (_set("source-ref", "https://bucket/a.png"), "(ERROR_INVALID_SOURCE_REF_FORMAT)"),
    "no metadata": (_drop("testdataset-classification-metadata"), "(ERROR_NO_LABEL_ATTRIBUTES)"),
    "no attribute": (_drop("testdataset-classification"), "without testdataset-classification"),
    "wrong type": (_metadata("testdataset-classification", "type", "groundtruth/wrongtype"), "USE_CASE_TYPE"),
    "value not an integer": (_set("testdataset-classification", "yes"), 'is "yes", not an integer'),
    "no class-name": (_metadata("testdataset-classification", "class-name", ""), "not a label name"),
    "confidence out of range": (_metadata("testdataset-classification", "confidence", 2), "not 0..1"),
    "long label name": (_metadata("testdataset-classification", "class-name", "x" * 257), "257 characters"),
    "51 labels": (
        lambda folder, line: multi_label_line(line["source-ref"], [f"l{i}" for i in range(51)]),
        "51 labels",
    ),
    "missing image": (_set("source-ref", "gone.png"), "refer to an image that does not exist"),
    "text file": (_text_file, "(not an image)"),
    "GIF image": (_image((96, 64), "GIF"), "(GIF)"),
    "too small": (_image((63, 64)), "(63x64)"),
    "too large": (_image((4097, 300)), "(4097x300)"),
    "aspect ratio": (_image((1290, 64)), "(1290x64)"),
    "over 15 MB": (_image((96, 64), padding=15 * 1024 * 1024), "over 15 MB"),
}

DETECTION_RULES: dict[str, tuple[Change, str]] = {
    "no image_size": (
        lambda folder, line: {**line, "bounding-box": {"annotations": []}},
        "image_size must be",
    ),
    "no class-map": (_metadata("bounding-box", "class-map", None), "has no 'class-map' object"),
    "confidence missing": (
        _metadata("bounding-box", "objects", []),
        "(ERROR_MISSING_BOUNDING_BOX_CONFIDENCE)",
    ),
    "class_id not in class-map": (
        _annotations([{"class_id": 7, "top": 1, "left": 1, "width": 20, "height": 20}]),
        "class_id 7",
    ),
    "box not numbers": (
        _annotations([{"class_id": 0, "top": "1", "left": 1, "width": 20, "height": 20}]),
        "needs numbers left, top, width and height",
    ),
    "51 boxes": (
        _annotations([{"class_id": 0, "top": 1, "left": 1, "width": 20, "height": 20}] * 51),
        "51 boxes",
    ),
    "no valid box": (
        _annotations([{"class_id": 0, "top": 50, "left": 1, "width": 20, "height": 20}]),
        "(ERROR_NO_VALID_ANNOTATIONS)",
    ),
    "image_size wrong": (_wrong_image_size, "image_size 128x64, the image 96x64"),
}


def _check_rule(tmp_path: Path, rule: Change, expected: str, base: Callable[..., list[Any]]) -> None:
    """Lines 7 and 8 of 8 broken by `rule`: the manifest is refused, and the listing names both lines."""
    lines = base(tmp_path) + [rule(tmp_path, line) for line in base(tmp_path, prefix="x")[:2]]
    message = problems_of(write_manifest(tmp_path / "m.manifest", lines))
    assert "2 of 8 lines (25%) are invalid, more than the 20 %" in message
    (listing,) = [problem for problem in message.split("\n- ") if expected in problem]
    assert "line 7" in listing and "line 8" in listing


@pytest.mark.parametrize("name", CLASSIFICATION_RULES)
def test_classification_line_rule(tmp_path: Path, name: str) -> None:
    rule, expected = CLASSIFICATION_RULES[name]
    _check_rule(tmp_path, rule, expected, classification_lines)


@pytest.mark.parametrize("name", DETECTION_RULES)
def test_localisation_line_rule(tmp_path: Path, name: str) -> None:
    rule, expected = DETECTION_RULES[name]
    _check_rule(tmp_path, rule, expected, detection_lines)


# The 20 % tolerance


def _with_missing(tmp_path: Path, missing: int) -> Path:
    lines: list[Any] = classification_lines(tmp_path, 5)[: 10 - missing]
    lines += [classification_line(f"missing{i}.png", "a") for i in range(missing)]
    return write_manifest(tmp_path / "m.manifest", lines)


def test_invalid_lines_up_to_20_percent_are_left_out_with_a_warning(tmp_path: Path) -> None:
    dataset = load_label_dataset(_with_missing(tmp_path, 2))
    assert len(dataset.train + dataset.test) == 8
    warnings = "\n".join(dataset.warnings)
    assert "2 of 10 lines (20%) are invalid and are left out" in warnings
    assert "line 9: missing0.png\n  line 10: missing1.png" in warnings


def test_invalid_lines_over_20_percent_refuse_the_manifest(tmp_path: Path) -> None:
    message = problems_of(_with_missing(tmp_path, 3))
    assert "3 of 10 lines (30%) are invalid, more than the 20 %" in message
    assert "line 8: missing0.png\n  line 9: missing1.png\n  line 10: missing2.png" in message


def test_the_rules_add_up_and_ignored_lines_do_not_count(tmp_path: Path) -> None:
    lines: list[Any] = classification_lines(tmp_path, 4)
    lines += ["{oops", classification_line("missing.png", "a")]
    lines += [{"source-ref": image(tmp_path / f"u{i}.png").name} for i in range(2)]
    dataset = load_label_dataset(write_manifest(tmp_path / "m.manifest", lines))
    warnings = "\n".join(dataset.warnings)
    assert "2 of 12 lines (17%) are invalid" in warnings
    assert (
        "2 lines have no label attribute and are not used (WARNING_UNANNOTATED_RECORD):\n  line 11\n"
        in warnings
    )

    lines.insert(0, "")
    assert "3 of 13 lines (23%) are invalid" in problems_of(write_manifest(tmp_path / "m.manifest", lines))


def test_folder_files_follow_the_same_tolerance(tmp_path: Path) -> None:
    for label in ("a", "b"):
        for index in range(4):
            image(tmp_path / label / f"{index}.png")
    (tmp_path / "a" / "notes.txt").write_text("hello")
    dataset = load_label_dataset(tmp_path)
    assert "a/notes.txt (not an image)" in "\n".join(dataset.warnings)
    (tmp_path / "b" / "notes.txt").write_text("hello")
    (tmp_path / "b" / "x.bmp").write_bytes((tmp_path / "a" / "notes.txt").read_bytes())
    message = problems_of(tmp_path)
    assert "3 of 11 files (27%) are invalid" in message
    assert "a/notes.txt (not an image)\n  b/notes.txt (not an image)\n  b/x.bmp" in message


# Dataset-level rules


def test_an_empty_manifest_is_refused(tmp_path: Path) -> None:
    assert "is empty" in problems_of(write_manifest(tmp_path / "m.manifest", ["", "  "]))
    assert "does not exist" in problems_of(tmp_path / "none.manifest")


def test_images_in_several_s3_buckets_are_refused(tmp_path: Path) -> None:
    lines = [classification_line(f"s3://bucket-a/{i}.png", "a") for i in range(3)]
    lines += [
        classification_line("s3://bucket-b/x.png", "b"),
        classification_line("s3://bucket-c/y.png", "b"),
    ]
    message = problems_of(write_manifest(tmp_path / "m.manifest", lines), s3_cache=tmp_path / "cache")
    assert "3 S3 buckets" in message and "ERROR_IMAGES_IN_MULTIPLE_S3_BUCKETS" in message
    assert (
        "3 lines use bucket-a, these do not:\n  line 4: s3://bucket-b/x.png\n  line 5: s3://bucket-c/y.png"
        in message
    )


def test_s3_images_come_from_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    lines = [
        classification_line(f"s3://bucket/{label}{i}.png", label) for label in ("a", "b") for i in range(3)
    ]
    for line in lines:
        image(cache / "bucket" / line["source-ref"].removeprefix("s3://bucket/"))
    dataset = load_label_dataset(write_manifest(tmp_path / "m.manifest", lines), s3_cache=cache)
    assert {item.path.parent for item in dataset.train} == {cache / "bucket"}


def test_label_counts_follow_the_quotas(tmp_path: Path) -> None:
    one = write_manifest(tmp_path / "one.manifest", classification_lines(tmp_path, 3, ("a",)))
    message = problems_of(one)
    assert "the training set has 1 labels (a); a classification set needs at least 2" in message
    # A localisation dataset may have a single label.
    lines = [detection_line(image(tmp_path / f"e{i}.png").name, [(0, 10, 8, 30, 20)]) for i in range(3)]
    assert load_label_dataset(write_manifest(tmp_path / "loc.manifest", lines)).labels == ("Echo",)

    many = write_manifest(
        tmp_path / "many.manifest",
        classification_lines(tmp_path, 1, tuple(f"l{i}" for i in range(251))),
    )
    assert "the dataset has 251 labels; the guide allows at most 250" in problems_of(many)


def test_the_automatic_split_needs_two_images_of_two_labels(tmp_path: Path) -> None:
    lines = classification_lines(tmp_path, 1, ("a", "b", "c"))
    message = problems_of(write_manifest(tmp_path / "m.manifest", lines))
    assert "the test set has 0 labels (none)" in message
    assert "ERROR_INSUFFICIENT_IMAGES_PER_LABEL_FOR_AUTOSPLIT" in message


def test_test_labels_must_overlap_the_training_labels(tmp_path: Path) -> None:
    train = write_manifest(
        tmp_path / "train.manifest", classification_lines(tmp_path, 2, ("a", "b", "c", "d", "e"))
    )
    test = write_manifest(
        tmp_path / "t" / "test.manifest", classification_lines(tmp_path / "t", 1, ("a", "b", "z"))
    )
    message = problems_of(train, test=test)
    assert "only 40% of the training labels are in the test set" in message
    assert "ERROR_INSUFFICIENT_LABEL_OVERLAP):" in message and "\n  c\n  d\n  e" in message
    assert "1 labels are only in the test set" in message and "z: z0.png" in message


def test_an_image_in_both_training_and_test_sets_is_refused(tmp_path: Path) -> None:
    train_lines = classification_lines(tmp_path, 3)
    test_lines: list[Any] = classification_lines(tmp_path / "t", 2)
    test_lines.append(classification_line("../a1.png", "a"))  # the same file as training line 2
    copy = tmp_path / "t" / "copy.png"
    copy.write_bytes((tmp_path / "b2.png").read_bytes())  # the same content as training line 6
    test_lines.append(classification_line("copy.png", "b"))
    message = problems_of(
        write_manifest(tmp_path / "train.manifest", train_lines),
        test=write_manifest(tmp_path / "t" / "test.manifest", test_lines),
    )
    assert "2 images are in both the training and the test set" in message
    assert "training line 2 and test line 5 (same file)" in message
    assert "training line 6 and test line 6 (same content)" in message


def test_an_image_twice_in_a_set_is_refused(tmp_path: Path) -> None:
    lines: list[Any] = classification_lines(tmp_path, 3)
    lines.append(classification_line("a0.png", "b"))
    message = problems_of(write_manifest(tmp_path / "m.manifest", lines))
    assert (
        "1 images are in a set more than once" in message
        and "training line 1 and line 7 (same file)" in message
    )


def test_an_unknown_kind_is_refused(tmp_path: Path) -> None:
    assert "kind 'segmentation' is not one of" in problems_of(tmp_path, kind="segmentation")


# The automatic split


def _split_dataset(tmp_path: Path, seed: int) -> LabelDataset:
    lines = classification_lines(tmp_path, 10, ("a", "b")) + classification_lines(tmp_path, 5, ("c",))
    manifest = tmp_path / "m.manifest"
    if not manifest.exists():
        write_manifest(manifest, lines)
    return load_label_dataset(manifest, seed=seed)


def test_the_automatic_split_is_stratified_and_deterministic(tmp_path: Path) -> None:
    first = _split_dataset(tmp_path, seed=0)
    again = _split_dataset(tmp_path, seed=0)
    other = _split_dataset(tmp_path, seed=1)

    assert first.test_split_automatic
    assert Counter(item.labels[0] for item in first.test) == {"a": 2, "b": 2, "c": 1}
    assert Counter(item.labels[0] for item in first.train) == {"a": 8, "b": 8, "c": 4}
    assert sources(first.test) == sources(again.test) and sources(first.train) == sources(again.train)
    assert sources(first.test) != sources(other.test)
    assert not set(sources(first.test)) & set(sources(first.train))
    manifest_order = [
        json.loads(line)["source-ref"] for line in (tmp_path / "m.manifest").read_text().splitlines()
    ]
    assert sources(first.train) == [ref for ref in manifest_order if ref in sources(first.train)]


def test_the_multi_label_split_keeps_every_label_in_training(tmp_path: Path) -> None:
    groups = [["x", "y"]] * 4 + [["x"]] * 6 + [["y", "rare"]] + [["z"]] * 5
    lines = [multi_label_line(image(tmp_path / f"{i}.png").name, labels) for i, labels in enumerate(groups)]
    dataset = load_label_dataset(write_manifest(tmp_path / "m.manifest", lines))
    train_labels = {label for item in dataset.train for label in item.labels}
    assert train_labels == {"x", "y", "z", "rare"}
    assert {label for item in dataset.test for label in item.labels} >= {"x", "z"}
    assert "1 labels have a single image" in "\n".join(dataset.warnings)
    assert 2 <= len(dataset.test) <= 5


# Reading pixels


def test_read_rgb_converts_16_bit_gray(tmp_path: Path) -> None:
    for label in ("a", "b"):
        for index in range(2):
            path = tmp_path / label / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            gray = np.full((64, 80), 256 * (40 + index + 10 * (label == "b")), dtype=np.uint16)
            Image.fromarray(gray).save(path)
    dataset = load_label_dataset(tmp_path)
    item = dataset.train[0]
    pixels = read_rgb(item)
    assert pixels.shape == (64, 80, 3) and pixels.dtype == np.uint8
    assert int(pixels[0, 0, 0]) in (40, 41, 50, 51)

    image(item.path, size=(70, 64))
    with pytest.raises(LabelDatasetError, match="changed after the dataset was loaded"):
        read_rgb(item)
