"""The inspection region: read from a mask or polygons, applied by the exported graph, packaged, shown.

The same synthetic data is trained with and without a region; both graphs run in ONNX Runtime.
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from lookout_edge.agent.backends.trt_graph import (
    check_graph,
    known_versions,
    parser_support,
    tensorrt_variant,
)
from lookout_edge.cli.main import main
from lookout_edge.package import read_package
from lookout_edge.trainer.datasets import DatasetError, load_dataset
from lookout_edge.trainer.export import TrainedModel, build_model_graph, reference_outputs
from lookout_edge.trainer.features import FeatureExtractor, layout_for
from lookout_edge.trainer.patchcore import greedy_coreset
from lookout_edge.trainer.region import REGION_FILE, Region, load_region
from lookout_edge.trainer.segmentation import train_head
from lookout_edge.trainer.synthetic import write_synthetic_dataset
from lookout_edge.trainer.train import TrainOptions, _Trainer, train

WIDTH, HEIGHT = 256, 192
# The part sits in the middle (radius about 72 px); the region is the image's left part, which
# cuts a column of patches (16 image pixels each at SHORT_SIDE) in half.
LEFT = [[0, 0], [120, 0], [120, HEIGHT - 1], [0, HEIGHT - 1]]
SQUARE = [[48, 16], [208, 16], [208, 176], [48, 176]]
SHORT_SIDE = 96  # a 12 x 16 patch grid: fast


def polygons_file(tmp_path: Path, document: object, name: str = "region.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return path


def run_graph(package: Path, image: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image": image}), strict=True))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """(dataset manifest, region file, package without region, package with region)."""
    work = tmp_path_factory.mktemp("region")
    manifest = write_synthetic_dataset(work / "data", normal=20, anomalous=10, segmentation=False)
    region = polygons_file(work, {"polygons": [LEFT]})
    plain = train(manifest, work / "plain", "parts", options=TrainOptions(short_side=SHORT_SIDE)).package
    code = main(
        [
            *("train", str(manifest), "--out", str(work / "region-model"), "--name", "parts"),
            *("--short-side", str(SHORT_SIDE), "--region", str(region), "--json"),
        ]
    )
    assert code == 0
    return manifest, region, plain, work / "region-model"


def test_the_region_changes_scores_only_outside_it(trained: tuple[Path, Path, Path, Path]) -> None:
    manifest, region_file, plain, regioned = trained
    dataset = load_dataset(manifest).train
    inside = load_region(region_file, WIDTH, HEIGHT)
    assert inside is not None
    for sample in dataset.samples[::4]:
        image = dataset.load_image(sample)
        without, with_region = run_graph(plain, image), run_graph(regioned, image)
        # The anomaly map is the model's without region inside, and exactly 0 outside.
        np.testing.assert_allclose(
            with_region["anomaly_map"][inside.pixels], without["anomaly_map"][inside.pixels], atol=1e-6
        )
        assert (with_region["anomaly_map"][~inside.pixels] == 0).all()
        assert without["anomaly_map"][~inside.pixels].min() > 0

    # A bright defect outside the region, 88 px (5.5 patches) from its edge, 1 to 2 patches from
    # the image's right edge: the model without region flags it (the map normalisation scales
    # the border down, it does not ignore it), the model with the region does not. The network's
    # receptive field still carries a little of it into the patches inside (docs/trainer.md).
    threshold = read_package(plain).threshold
    for sample in dataset.samples[:20:4]:
        good = dataset.load_image(sample)
        defect = good.copy()
        defect[86:106, 208:228] = 255
        without_good, without_defect = run_graph(plain, good), run_graph(plain, defect)
        with_good, with_defect = run_graph(regioned, good), run_graph(regioned, defect)
        assert float(without_good["anomaly_score"]) < threshold <= float(without_defect["anomaly_score"])
        score = float(with_defect["anomaly_score"])
        assert score < threshold - 0.4, sample.image_path.name
        assert score - float(with_good["anomaly_score"]) < 0.05, sample.image_path.name


def test_a_defect_on_the_image_border_is_flagged(trained: tuple[Path, Path, Path, Path]) -> None:
    """The outermost patches are normalised, not ignored: a blotch touching each edge of the image
    still raises the verdict (a score margin would pass it as normal)."""
    manifest, _, plain, _ = trained
    dataset = load_dataset(manifest).train
    threshold = read_package(plain).threshold
    good = dataset.load_image(dataset.samples[0])
    assert float(run_graph(plain, good)["anomaly_score"]) < threshold
    for rows, columns in (
        (slice(86, 106), slice(WIDTH - 20, WIDTH)),  # right edge
        (slice(86, 106), slice(0, 20)),  # left edge
        (slice(0, 20), slice(118, 138)),  # top edge
        (slice(HEIGHT - 20, HEIGHT), slice(118, 138)),  # bottom edge
    ):
        defect = good.copy()
        defect[rows, columns] = 255
        assert float(run_graph(plain, defect)["anomaly_score"]) >= threshold, (rows, columns)


def test_the_region_is_part_of_the_package(trained: tuple[Path, Path, Path, Path]) -> None:
    _, region_file, plain, regioned = trained
    package = read_package(regioned)
    package.verify_files()  # region.png is listed with its hash like every file
    assert REGION_FILE in {entry.path.name for entry in package.files}
    manifest = json.loads((regioned / "manifest.json").read_text())
    expected = load_region(region_file, WIDTH, HEIGHT)
    assert expected is not None
    assert manifest["region"] == {
        "file": REGION_FILE,
        "given_as": "polygons",
        "source": "region.json",
        "fraction": pytest.approx(float(expected.pixels.mean()), abs=1e-6),
    }
    stored = np.asarray(Image.open(regioned / REGION_FILE))
    assert stored.shape == (HEIGHT, WIDTH) and set(np.unique(stored)) == {0, 255}
    np.testing.assert_array_equal(stored > 0, expected.pixels)
    # The package's mask reads back as the same region.
    again = load_region(regioned / REGION_FILE, WIDTH, HEIGHT)
    assert again is not None and again.given_as == "mask"
    np.testing.assert_array_equal(again.pixels, expected.pixels)
    assert json.loads((plain / "manifest.json").read_text())["region"] is None
    assert not (plain / REGION_FILE).exists()


def _thumbnail(report: Path, name: str) -> np.ndarray:
    found = re.search(rf'data-name="{name}".*?base64,([^"]+)"', report.read_text(), re.DOTALL)
    assert found is not None, name
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(found.group(1)))).convert("RGB"), np.float64)


def test_the_report_shows_the_region(trained: tuple[Path, Path, Path, Path]) -> None:
    _, _, plain, regioned = trained
    page = (regioned / "report.html").read_text()
    assert 'class="region"' in page and "outlined" in page
    assert 'class="region"' not in (plain / "report.html").read_text()
    # The same image: dimmed on the right (outside), unchanged in the middle (inside).
    dimmed = _thumbnail(regioned / "report.html", "normal-003.png")
    original = _thumbnail(plain / "report.html", "normal-003.png")
    outside = (slice(0, 192), slice(140, 256))
    middle = (slice(80, 110), slice(40, 100))
    assert dimmed[outside].mean() < 0.5 * original[outside].mean()
    assert abs(dimmed[middle].mean() - original[middle].mean()) < 3


def test_graph_applies_the_region_like_the_numpy_reference(
    tmp_path: Path, weights: dict[str, np.ndarray]
) -> None:
    """A segmentation graph with a region, against trainer/export.py's numpy reference."""
    manifest = write_synthetic_dataset(tmp_path / "data", normal=3, anomalous=2, segmentation=False)
    dataset = load_dataset(manifest, check_counts=False).train
    layout = layout_for(HEIGHT, WIDTH, short_side=SHORT_SIDE)
    extract = FeatureExtractor(weights, layout)
    images = [dataset.load_image(sample) for sample in dataset.samples]
    features = [extract(image) for image in images]
    bank_source = np.concatenate([f.T for f in features[:3]])
    bank = bank_source[greedy_coreset(bank_source, 80)]
    rng = np.random.default_rng(0)
    head = train_head(rng.standard_normal((layout.channels + 1, 400)), np.eye(3)[rng.integers(0, 3, 400)].T)
    # A region with an edge that cuts patches: weights strictly between 0 and 1 occur.
    region = load_region(
        polygons_file(tmp_path, {"polygons": [[[30, 10], [230, 30], [150, 185]]]}), WIDTH, HEIGHT
    )
    assert region is not None
    weights_grid = region.patch_weights(layout.grid)
    assert ((weights_grid > 0) & (weights_grid < 1)).any() and (weights_grid == 1).any()
    model = TrainedModel(layout, bank, centre=5.0, scale=1.5, head=head, region=region)
    names = ["anomaly_score", "label_map", "anomaly_map"]
    graph = build_model_graph(weights, model)
    for version in known_versions():  # the region's nodes are ones every TensorRT parser takes
        support = parser_support(version)
        assert check_graph(tensorrt_variant(graph, support.max_opset), support) == [], version
    session = ort.InferenceSession(graph.SerializeToString())
    plain = ort.InferenceSession(build_model_graph(weights, replace(model, region=None)).SerializeToString())
    for image, patches in zip(images, features, strict=True):
        score, label_map, anomaly_map = session.run(names, {"image": image})
        _, plain_labels, plain_map = plain.run(names, {"image": image})
        expected = reference_outputs(model, patches)
        # The score is the maximum over patches of weight x blurred distance (the reference's).
        assert float(score) == pytest.approx(float(expected["anomaly_score"]), abs=1e-4)
        # The maps are those of the graph without region inside, 0 outside.
        np.testing.assert_array_equal(anomaly_map, np.where(region.pixels, plain_map, 0))
        np.testing.assert_array_equal(label_map, np.where(region.pixels, plain_labels, 0))
        assert label_map.any()  # the random head paints inside: the mask is not all 0
        # A random head's large logits: float32 against float64 within 2e-3 here.
        np.testing.assert_allclose(anomaly_map, expected["anomaly_map"], atol=2e-3)


def test_patch_weights_are_the_fraction_of_each_patch_inside() -> None:
    pixels = np.zeros((96, 128), dtype=bool)
    pixels[:, :52] = True  # 52 px = 6.5 patches of 8 px on a 12 x 16 grid
    weights = Region(pixels, "mask", "m.png").patch_weights((12, 16))
    np.testing.assert_array_equal(weights[0], [1] * 6 + [0.5] + [0] * 9)
    assert (weights == weights[0]).all()
    # A grid finer than the image (network input larger than the image): still fractions of area.
    small = Region(np.eye(2, dtype=bool).repeat(2, 0).repeat(2, 1), "mask", "m.png")
    np.testing.assert_allclose(small.patch_weights((8, 8)), np.eye(2).repeat(4, 0).repeat(4, 1))


def test_polygons_and_exclusions(tmp_path: Path) -> None:
    whole = [[0, 0], [WIDTH - 1, 0], [WIDTH - 1, HEIGHT - 1], [0, HEIGHT - 1]]
    region = load_region(polygons_file(tmp_path, {"polygons": [whole]}), WIDTH, HEIGHT)
    assert region is not None and region.pixels.all()
    hole = [[100, 50], [150, 50], [150, 100], [100, 100]]
    holed = load_region(polygons_file(tmp_path, {"polygons": [whole], "exclude": [hole]}), WIDTH, HEIGHT)
    assert holed is not None
    assert not holed.pixels[50:101, 100:151].any() and holed.pixels[:50].all()
    two = load_region(
        polygons_file(tmp_path, {"polygons": [hole, [[0, 0], [9, 0], [9, 9], [0, 9]]]}), WIDTH, HEIGHT
    )
    assert two is not None and two.pixels.sum() == 51 * 51 + 100


def _mask(tmp_path: Path, array: np.ndarray, mode: str | None = None, name: str = "mask.png") -> Path:
    path = tmp_path / name
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_masks_of_every_kind(tmp_path: Path) -> None:
    inside = np.zeros((HEIGHT, WIDTH), dtype=bool)
    inside[20:120, 30:200] = True
    gray = _mask(tmp_path, inside.astype(np.uint8) * 255)
    sixteen = _mask(tmp_path, inside.astype(np.uint16) * 40000, name="m16.png")
    rgba = np.zeros((HEIGHT, WIDTH, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere, transparent outside the region
    rgba[..., 3] = inside * 255
    transparent = _mask(tmp_path, rgba, name="rgba.png")
    colour = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    colour[inside] = (0, 0, 1)  # any non-zero channel is inside
    for path in (gray, sixteen, transparent, _mask(tmp_path, colour, name="rgb.png")):
        region = load_region(path, WIDTH, HEIGHT)
        assert region is not None and region.given_as == "mask"
        np.testing.assert_array_equal(region.pixels, inside, err_msg=path.name)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("wrong-size", r"mask.png cannot be used: it is 128x96, the training images are 256x192: draw"),
        ("empty", r"region .*mask.png cannot be used: it holds no pixel; mark the area"),
        ("garbage", r"region .*region.json cannot be used: it is neither a PNG nor JSON"),
        ("truncated", r"region .*mask.png cannot be used: it is not a readable PNG"),
        ("jpeg", r"region .*mask.png cannot be used: it is a JPEG image; a region mask must be a PNG"),
        ({"polygon": [SQUARE]}, r'has no "polygons" key'),
        ({"polygons": [SQUARE], "holes": []}, r"unknown key\(s\) holes"),
        ({"polygons": []}, r'"polygons" must be a non-empty list'),
        ({"polygons": [[[0, 0], [1, 1]]]}, r"polygons\[0\] must be a list of at least 3"),
        ({"polygons": [[[0, 0], [1, "a"], [2, 2]]]}, r"polygons\[0\] has vertex \[1, 'a'\]"),
        ({"polygons": [[[0, 0], [0.5, 0.1], [0.9, 0.9]]], "exclude": [[[0, 0], [300, 0], [0, 9]]]},
         r"exclude\[0\] has vertex \[300, 0\] outside the 256x192 training images"),
        ("missing", r"region .*missing.png cannot be used: it cannot be read"),
    ],
)  # fmt: skip
def test_unusable_regions_are_clear_errors(tmp_path: Path, content: object, message: str) -> None:
    if isinstance(content, dict):
        path = polygons_file(tmp_path, content)
    elif content == "wrong-size":
        path = _mask(tmp_path, np.full((96, 128), 255, np.uint8))
    elif content == "empty":
        path = _mask(tmp_path, np.zeros((HEIGHT, WIDTH), np.uint8))
    elif content == "garbage":
        path = tmp_path / "region.json"
        path.write_bytes(b"\x00\xff not a region")
    elif content == "truncated":
        full = _mask(tmp_path, np.full((HEIGHT, WIDTH), 255, np.uint8))
        full.write_bytes(full.read_bytes()[:60])
        path = full
    elif content == "jpeg":
        path = tmp_path / "mask.png"
        Image.fromarray(np.full((HEIGHT, WIDTH), 255, np.uint8)).save(path, format="JPEG")
    else:
        path = tmp_path / "missing.png"
    with pytest.raises(DatasetError, match=message):  # RegionError is one
        load_region(path, WIDTH, HEIGHT)


def test_the_train_command_refuses_a_bad_region_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_synthetic_dataset(tmp_path / "data", normal=20, anomalous=10, segmentation=False)
    bad = _mask(tmp_path, np.full((96, 128), 255, np.uint8))
    code = main(["train", str(manifest), "--out", str(tmp_path / "out"), "--name", "x", "--region", str(bad)])
    assert code == 1
    error = capsys.readouterr().err
    assert (
        f"the inspection region {bad} cannot be used: it is 128x96, the training images are 256x192" in error
    )
    assert not (tmp_path / "out").exists()


def test_a_segmentation_model_with_a_region_paints_nothing_outside(
    tmp_path: Path, weights: dict[str, np.ndarray]
) -> None:
    """The trainer's own fit (below the guide's minimum counts, for speed): the cross-fitted masks
    that choose the pixel threshold and fill the report are 0 outside, like the graph's."""
    manifest = write_synthetic_dataset(tmp_path / "data", normal=10, anomalous=6, segmentation=True)
    dataset = load_dataset(manifest, check_counts=False).train
    region_file = polygons_file(tmp_path, {"polygons": [LEFT]})
    fitted = _Trainer(dataset, TrainOptions(short_side=SHORT_SIDE, region=region_file)).fit(dataset.samples)
    region = fitted.model.region
    assert region is not None and fitted.model.head is not None and fitted.segmentation is not None
    for anomaly, predicted in zip(fitted.segmentation.anomaly, fitted.segmentation.predicted, strict=True):
        assert (anomaly[~region.pixels] == 0).all() and (predicted[~region.pixels] == 0).all()
    assert any(predicted[region.pixels].any() for predicted in fitted.segmentation.predicted)
    session = ort.InferenceSession(build_model_graph(weights, fitted.model).SerializeToString())
    for sample in dataset.samples[-6:]:
        label_map, anomaly_map = session.run(
            ["label_map", "anomaly_map"], {"image": dataset.load_image(sample)}
        )
        assert (label_map[~region.pixels] == 0).all() and (anomaly_map[~region.pixels] == 0).all()
