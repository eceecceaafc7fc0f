"""calibrate and update: new package versions from a trained package, without retraining.

One small segmentation package is trained once (synthetic parts, 160x120, short side 96) and
every test derives new versions from it; each checks that the input package is unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from PIL import Image

from lookout_edge import package as package_module
from lookout_edge.cli.main import main
from lookout_edge.package import MANIFEST_NAME, PackageError, read_package, write_package
from lookout_edge.trainer.calibrate import calibrate, next_version, update
from lookout_edge.trainer.datasets import DatasetError
from lookout_edge.trainer.normalise import fit_normalisation
from lookout_edge.trainer.state import STATE_NAME, load_state
from lookout_edge.trainer.synthetic import write_synthetic_dataset
from lookout_edge.trainer.train import TrainOptions, train

SIZE = (160, 120)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"), normal=20, anomalous=40, size=SIZE)


@pytest.fixture(scope="module")
def new_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Other parts of the same kind (another seed): 8 normal, 4 anomalous with masks."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("new"), normal=8, anomalous=4, size=SIZE, seed=7)


@pytest.fixture(scope="module")
def package(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "parts"
    return train(dataset, out, "parts", options=TrainOptions(short_side=96)).package


@pytest.fixture(scope="module")
def updated(package: Path, new_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return update(package, new_images, tmp_path_factory.mktemp("updated") / "parts").package


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def untouched(package: Path) -> Iterator[None]:
    """Fails the test if it changed a byte of the input package."""
    before = snapshot(package)
    yield
    assert snapshot(package) == before


def manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST_NAME).read_text())


def initializers(directory: Path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(directory / "model.onnx")).graph
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}


def changed_initializers(first: Path, second: Path) -> set[str]:
    a, b = initializers(first), initializers(second)
    assert a.keys() == b.keys()
    return {name for name in a if a[name].shape != b[name].shape or not np.array_equal(a[name], b[name])}


def test_calibrating_on_the_training_images_keeps_the_model(
    package: Path, dataset: Path, tmp_path: Path, untouched: None
) -> None:
    """The training images are recognised and scored out of fold, as in training: the same image
    and pixel thresholds, the same graph."""
    result = calibrate(package, dataset, tmp_path / "v2")
    assert result.changes == {}
    assert (result.package / "model.onnx").read_bytes() == (package / "model.onnx").read_bytes()
    old, new = manifest(package), manifest(result.package)
    for key in ("raw_threshold", "raw_scale", "pixel_threshold", "memory_bank", "images"):
        assert new["training"][key] == old["training"][key], key
    assert new["model_arn"] == "lookout-edge:parts:2"
    (step,) = new["lineage"]
    assert step["operation"] == "calibration" and step["changed"] == {}
    assert step["parent"] == {
        "model_arn": "lookout-edge:parts",
        "model_sha256": old["files"]["model.onnx"]["sha256"],
    }
    assert step["images"] == {"normal": 20, "anomalous": 40, "already_in_training": 60}
    assert new["metrics"]["classification"] == old["metrics"]["classification"]
    read_package(result.package).verify_files()


def test_calibrate_changes_the_thresholds_and_nothing_else(
    package: Path, new_images: Path, tmp_path: Path, untouched: None
) -> None:
    result = calibrate(package, new_images, tmp_path / "v2", favour_recall=True)
    assert set(result.changes) <= {"raw_threshold", "raw_scale", "pixel_threshold", "options"}
    assert "raw_threshold" in result.changes and "options" in result.changes
    # In the graph: the logistic calibration and the pixel threshold, not the bank or the head.
    assert changed_initializers(package, result.package) <= {"inverse_scale", "offset", "pixel_threshold"}
    old_state = load_state(read_package(package))
    new_state = load_state(read_package(result.package))
    assert new_state.model.centre == result.changes["raw_threshold"]["to"]
    assert new_state.options["favour_recall"] is True
    np.testing.assert_array_equal(new_state.model.bank, old_state.model.bank)
    assert new_state.normal_hashes == old_state.normal_hashes
    np.testing.assert_array_equal(new_state.normal_raw, old_state.normal_raw)
    new = manifest(result.package)
    assert new["metrics"]["images"] == {"normal": 8, "anomalous": 4}
    assert new["metrics"]["estimate"].startswith("cross-validated on the calibration images")
    evaluation = json.loads((result.package / "evaluation.json").read_text())
    assert len(evaluation["results"]) == 12
    assert result.evaluation["images"] == {"normal": 8, "anomalous": 4}
    references = new["self_check"]["references"]
    assert references and all((result.package / r["file"]).is_file() for r in references)
    read_package(result.package).verify_files()


def test_update_that_adds_nothing_is_a_no_op(
    package: Path, dataset: Path, tmp_path: Path, untouched: None
) -> None:
    """Every image of the dataset is already in the model: the same graph, the same outputs."""
    result = update(package, dataset, tmp_path / "v2")
    assert result.changes == {}
    assert (result.package / "model.onnx").read_bytes() == (package / "model.onnx").read_bytes()
    assert manifest(result.package)["lineage"][0]["images"] == {
        "normal": 0,
        "anomalous": 0,
        "already_in_training": 60,
    }
    image = np.asarray(Image.open(dataset.parent / "anomaly" / "anomaly-000.png").convert("RGB"))
    outputs = [
        ort.InferenceSession(str(directory / "model.onnx")).run(None, {"image": image})
        for directory in (package, result.package)
    ]
    for before, after in zip(*outputs, strict=True):
        np.testing.assert_array_equal(before, after)


def test_update_adds_normals_to_the_bank_and_anomalies_to_calibration_and_head(
    package: Path, updated: Path, untouched: None
) -> None:
    old, new = load_state(read_package(package)), load_state(read_package(updated))
    assert new.normal_hashes[:20] == old.normal_hashes and len(new.normal_hashes) == 28
    assert new.anomalous_hashes[:40] == old.anomalous_hashes and len(new.anomalous_hashes) == 44
    # The training images' maps are kept (not rescored against the larger bank), the added ones are
    # scored against the new bank, and the map normalisation is measured again on all normals' maps.
    np.testing.assert_array_equal(new.normal_maps[:20], old.normal_maps)
    np.testing.assert_array_equal(new.anomalous_maps[:40], old.anomalous_maps)
    assert new.normal_maps.shape[0] == 28 and new.anomalous_maps.shape[0] == 44
    assert new.model.normalisation is not None
    measured = fit_normalisation(new.normal_maps)
    np.testing.assert_array_equal(new.model.normalisation.gain, measured.gain)
    np.testing.assert_array_equal(new.model.normalisation.offset, measured.offset)
    np.testing.assert_array_equal(new.normal_raw, new.model.raw_scores(new.normal_maps))
    # The coreset is taken again over the bank and the new patches, to the trainer's size rule.
    patches = new.model.layout.patches
    assert len(new.model.bank) == min(3000, int(28 * patches * 0.1)) > len(old.model.bank)
    assert (new.bank_origin >= 20).any(), "patches of the added normal images are in the bank"
    # The head learnt from the added images; its pixel threshold is kept.
    assert new.model.head is not None and old.model.head is not None
    assert not np.array_equal(new.model.head.weight, old.model.head.weight)
    assert new.model.head.pixel_threshold == old.model.head.pixel_threshold
    assert new.head_training is not None and len(new.head_training.anomalous_inputs) == 44
    # Both cross-fitting heads were trained again, each with some of the added anomalous images.
    assert new.head_training.fold_heads is not None and set(new.head_training.fold_of[40:]) == {0, 1}
    training = manifest(updated)["training"]
    assert training["images"] == {"normal": 28, "anomalous": 44}
    assert manifest(updated)["metrics"]["images"] == {"normal": 28, "anomalous": 44}
    assert "pixel_threshold" not in manifest(updated)["lineage"][0]["changed"]
    read_package(updated).verify_files()


def test_updating_again_with_the_same_images_is_a_no_op(
    updated: Path, new_images: Path, tmp_path: Path
) -> None:
    """The added images became training images: recognised next time, and versions count on."""
    before = snapshot(updated)
    again = update(updated, new_images, tmp_path / "v3")
    assert again.changes == {}
    assert manifest(again.package)["model_arn"] == "lookout-edge:parts:3"
    assert [step["operation"] for step in manifest(again.package)["lineage"]] == ["update", "update"]
    assert snapshot(updated) == before


@pytest.mark.parametrize("command", ["calibrate", "update"])
def test_a_dataset_of_another_size_is_refused(
    package: Path, tmp_path: Path, command: str, untouched: None
) -> None:
    other = write_synthetic_dataset(
        tmp_path / "other", normal=3, anomalous=2, size=(128, 96), segmentation=False
    )
    out = tmp_path / "models" / "v2"
    with pytest.raises(DatasetError) as raised:
        if command == "calibrate":
            calibrate(package, other.parent, out)
        else:
            update(package, other.parent, out)
    assert "128x96" in str(raised.value) and "160x120" in str(raised.value)
    assert not out.parent.exists() or not list(out.parent.iterdir())


@pytest.mark.parametrize("command", ["calibrate", "update"])
def test_a_failed_write_leaves_nothing(
    package: Path,
    new_images: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    untouched: None,
) -> None:
    """The disk fills up while the new version is written: no DIR, no staging directory."""
    real = package_module._write_synced

    def full_disk(path: Path, content: bytes) -> None:
        if path.name == STATE_NAME:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, content)

    monkeypatch.setattr(package_module, "_write_synced", full_disk)
    models = tmp_path / "models"
    models.mkdir()
    with pytest.raises(OSError, match="No space left"):
        if command == "calibrate":
            calibrate(package, new_images, models / "v2")
        else:
            update(package, new_images, models / "v2")
    assert list(models.iterdir()) == []


def test_out_must_not_be_the_input_package(package: Path, dataset: Path, untouched: None) -> None:
    for out in (package, package / "v2", package.parent):
        with pytest.raises(PackageError, match="would replace the input package"):
            calibrate(package, dataset, out)


def test_update_refuses_an_image_it_learnt_with_the_other_label(
    package: Path, dataset: Path, tmp_path: Path, untouched: None
) -> None:
    relabelled = tmp_path / "relabelled"
    (relabelled / "anomaly").mkdir(parents=True)
    (relabelled / "normal").mkdir()
    shutil.copy(dataset.parent / "normal" / "normal-003.png", relabelled / "anomaly" / "was-normal.png")
    shutil.copy(dataset.parent / "normal" / "normal-004.png", relabelled / "normal" / "still-normal.png")
    with pytest.raises(
        DatasetError, match=r"1 images are in the model with the other label(.|\n)*was-normal.png"
    ):
        update(package, relabelled, tmp_path / "v2")
    assert not (tmp_path / "v2").exists()


def _rewritten(source: Path, out: Path, files: dict[str, bytes]) -> Path:
    """`source` with some files replaced (or removed, for b""), re-hashed so the package verifies."""
    data = manifest(source)
    content = {name: (source / name).read_bytes() for name in data["files"]}
    content.update(files)
    content = {name: value for name, value in content.items() if value}
    kept = {key: value for key, value in data.items() if key not in ("format_version", "model_file", "files")}
    return write_package(out, kept, content)


def test_a_package_without_state_is_refused(package: Path, dataset: Path, tmp_path: Path) -> None:
    older = _rewritten(package, tmp_path / "older", {STATE_NAME: b""})
    read_package(older).verify_files()
    with pytest.raises(PackageError, match=r"trained by an older version of lookout-edge.*retrain"):
        calibrate(older, dataset, tmp_path / "v2")
    assert not (tmp_path / "v2").exists()


def test_a_state_from_another_model_is_refused(
    package: Path, updated: Path, new_images: Path, tmp_path: Path
) -> None:
    mixed = _rewritten(package, tmp_path / "mixed", {STATE_NAME: (updated / STATE_NAME).read_bytes()})
    with pytest.raises(PackageError, match="belongs to another model"):
        update(mixed, new_images, tmp_path / "v2")
    corrupt = _rewritten(package, tmp_path / "corrupt", {STATE_NAME: b"PK\x03\x04 not a zip at all"})
    with pytest.raises(PackageError, match="cannot be read as a trainer state"):
        update(corrupt, new_images, tmp_path / "v2")
    assert not (tmp_path / "v2").exists()


def test_a_tampered_state_file_is_caught_by_its_digest(package: Path, dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(package, copy)
    state = bytearray((copy / STATE_NAME).read_bytes())
    state[len(state) // 2] ^= 0xFF
    (copy / STATE_NAME).write_bytes(bytes(state))
    with pytest.raises(PackageError, match=f"{STATE_NAME} does not match its SHA-256"):
        calibrate(copy, dataset, tmp_path / "v2")


def test_versions() -> None:
    assert next_version("lookout-edge:parts") == "lookout-edge:parts:2"
    assert next_version("lookout-edge:parts:2") == "lookout-edge:parts:3"
    assert next_version("arn:aws:lookoutvision:eu-west-1:123:model/parts/9") == (
        "arn:aws:lookoutvision:eu-west-1:123:model/parts/10"
    )


def test_commands(
    package: Path, new_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], untouched: None
) -> None:
    assert main(["calibrate", str(package), str(new_images), "--out", str(tmp_path / "v2"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model_arn"] == "lookout-edge:parts:2" and "raw_threshold" in printed["changes"]
    assert printed["images"] == {"normal": 8, "anomalous": 4}
    other = write_synthetic_dataset(
        tmp_path / "other", normal=3, anomalous=2, size=(128, 96), segmentation=False
    )
    out = tmp_path / "v3"
    assert main(["update", str(package), "--add", str(other.parent), "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("lookout-edge update: ") and "128x96" in error and "160x120" in error
    assert not out.exists()


def test_the_inspection_region_is_carried_over(dataset: Path, new_images: Path, tmp_path: Path) -> None:
    """A classification model with a region: calibration scores inside the region, as training
    does (the training images give back the same graph), and keeps the region as it was."""
    mask = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint8)
    mask[:, : SIZE[0] * 3 // 4] = 255
    Image.fromarray(mask).save(tmp_path / "region.png")
    options = TrainOptions(short_side=96, region=tmp_path / "region.png")
    package = train(dataset.parent, tmp_path / "cls", "parts-cls", options=options).package
    before = snapshot(package)
    same = calibrate(package, dataset.parent, tmp_path / "same").package
    assert (same / "model.onnx").read_bytes() == (package / "model.onnx").read_bytes()
    moved = calibrate(package, new_images.parent, tmp_path / "moved").package
    assert changed_initializers(package, moved) == {"inverse_scale", "offset"}
    for version in (same, moved):
        assert (version / "region.png").read_bytes() == (package / "region.png").read_bytes()
        assert manifest(version)["region"] == manifest(package)["region"] is not None
        region = load_state(read_package(version)).model.region
        assert region is not None and np.array_equal(region.pixels, mask > 0)
    assert snapshot(package) == before
