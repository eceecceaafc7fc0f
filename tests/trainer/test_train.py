"""Training end to end: synthetic datasets, the exported graph against numpy, determinism, the agent."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lookout_edge.package import read_package
from lookout_edge.trainer.datasets import load_dataset
from lookout_edge.trainer.export import TrainedModel, build_model_graph, reference_outputs
from lookout_edge.trainer.features import layout_for
from lookout_edge.trainer.normalise import MapNormalisation
from lookout_edge.trainer.patchcore import greedy_coreset
from lookout_edge.trainer.reference import reference_patches
from lookout_edge.trainer.segmentation import train_head
from lookout_edge.trainer.synthetic import write_synthetic_dataset
from lookout_edge.trainer.train import TrainOptions, train

COOKIES = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "cookies"


@pytest.fixture(scope="module")
def segmentation_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 20 images per label: the guide's minimum for segmentation without a test set.
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), normal=20, anomalous=40)


@pytest.fixture(scope="module")
def segmentation_package(segmentation_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(segmentation_dataset, tmp_path_factory.mktemp("model") / "parts", "parts").package


def test_segmentation_package(segmentation_package: Path) -> None:
    package = read_package(segmentation_package)
    assert package.model_type == "segmentation"
    assert [label.name for label in package.labels] == ["scratch", "missing"]
    assert package.threshold == 0.5
    package.verify_files()
    manifest = json.loads((segmentation_package / "manifest.json").read_text())
    # Every image trains the delivered model; the metrics are the cross-validated estimate.
    assert manifest["training"]["images"] == {"normal": 20, "anomalous": 40}
    assert manifest["training"]["test_images"] is None
    metrics = manifest["metrics"]
    assert metrics["images"] == {"normal": 20, "anomalous": 40}
    assert metrics["auroc"] >= 0.95
    classification = metrics["classification"]
    assert classification["f1"] >= 0.9
    low, high = classification["f1_interval"]
    assert low <= classification["f1"] <= high
    assert classification["estimate"].startswith("cross-validated estimate")
    for name in ("evaluation.json", "report.html"):
        assert (segmentation_package / name).is_file()
    # Without a test set, the report shows every training image out of fold.
    evaluation = json.loads((segmentation_package / "evaluation.json").read_text())
    assert len(evaluation["results"]) == 60
    # Masks out of fold come from heads trained on half of the anomalous images.
    assert evaluation["pixel_auroc"] >= 0.95
    assert {label["name"] for label in evaluation["segmentation"]["labels"]} == {"scratch", "missing"}


def test_classification_from_folders(segmentation_dataset: Path, tmp_path: Path) -> None:
    result = train(segmentation_dataset.parent, tmp_path / "cls", "parts-cls")
    package = read_package(result.package)
    assert package.model_type == "classification" and not package.labels
    session = ort.InferenceSession(str(package.model_file.path))
    assert {o.name for o in session.get_outputs()} == {"anomaly_score", "anomaly_map"}
    assert result.evaluation["auroc"] >= 0.95


def test_same_inputs_and_seed_give_the_same_bytes(segmentation_dataset: Path, tmp_path: Path) -> None:
    first = train(segmentation_dataset, tmp_path / "a", "parts").package
    second = train(segmentation_dataset, tmp_path / "b", "parts").package
    for name in ("manifest.json", "model.onnx", "evaluation.json", "report.html"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other_seed = train(segmentation_dataset, tmp_path / "c", "parts", options=TrainOptions(seed=1)).package
    assert (other_seed / "model.onnx").read_bytes() != (first / "model.onnx").read_bytes()


def test_graph_matches_numpy_reference(segmentation_dataset: Path, weights: dict[str, np.ndarray]) -> None:
    """The exported graph, run by ONNX Runtime, against the model computed in plain numpy
    (numpy backbone, aggregation, nearest neighbours, blur, calibration, segmentation head)."""
    dataset = load_dataset(segmentation_dataset).train
    layout = layout_for(dataset.height, dataset.width, short_side=96)
    samples = dataset.samples[:3] + dataset.samples[-3:]
    images = [dataset.load_image(s) for s in samples]
    patches = [reference_patches(weights, image, layout.network_size, layout.grid) for image in images]
    bank_source = np.concatenate([p.T for p in patches[:3]]).astype(np.float32)
    bank = bank_source[greedy_coreset(bank_source, 60)]
    rng = np.random.default_rng(0)
    head = train_head(rng.standard_normal((layout.channels + 1, 500)), np.eye(3)[rng.integers(0, 3, 500)].T)
    # A map normalisation far from the identity, so that its Mul and Add are exercised.
    normalisation = MapNormalisation(
        rng.uniform(0.4, 1.0, layout.grid).astype(np.float32),
        rng.normal(0.0, 1.0, layout.grid).astype(np.float32),
    )
    model = TrainedModel(layout, bank, centre=5.0, scale=1.5, head=head, normalisation=normalisation)
    graph = build_model_graph(weights, model)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    classification = replace(model, head=None)
    plain = ort.InferenceSession(
        build_model_graph(weights, classification).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    for image, features in zip(images, patches, strict=True):
        score, label_map, anomaly_map = session.run(
            ["anomaly_score", "label_map", "anomaly_map"], {"image": image}
        )
        expected = reference_outputs(model, features.astype(np.float32))
        plain_score, plain_map = plain.run(["anomaly_score", "anomaly_map"], {"image": image})
        plain_expected = reference_outputs(classification, features.astype(np.float32))
        assert float(plain_score) == pytest.approx(float(plain_expected["anomaly_score"]), abs=1e-4)
        # This map is in distance units (10 to 20 here): the float32 cancellation in
        # |f|^2 - 2 m.f + |m|^2 holds the two to about 1e-2, measured within 1.3e-2.
        np.testing.assert_allclose(plain_map, plain_expected["anomaly_map"], atol=3e-2)
        assert float(score) == pytest.approx(float(expected["anomaly_score"]), abs=1e-4)
        # Scores are held to 1e-4; the maps go through float32 matrix products at image size
        # (the half-pixel resize of trainer/interpolation.py), measured within 1.4e-4.
        np.testing.assert_allclose(anomaly_map, expected["anomaly_map"], atol=5e-4)
        # Pixels whose probability sits within float error of the pixel threshold may flip.
        assert np.mean(label_map != expected["label_map"]) < 1e-3


def test_graph_is_static_and_checked(segmentation_package: Path) -> None:
    model = onnx.load(str(segmentation_package / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for value in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), value.name


def test_a_test_set_is_evaluated_beside_the_estimate(segmentation_dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    source = segmentation_dataset.parent
    for folder in ("normal", "anomaly"):
        files = sorted((source / folder).iterdir())
        for part, chosen in (("train", files[10:]), ("test", files[:10])):
            (data / part / folder).mkdir(parents=True)
            for file in chosen:
                (data / part / folder / file.name).write_bytes(file.read_bytes())
    result = train(data, tmp_path / "model", "parts-cls")
    manifest = json.loads((result.package / "manifest.json").read_text())
    assert manifest["training"]["images"] == {"normal": 10, "anomalous": 30}
    assert manifest["metrics"]["test"]["images"] == {"normal": 10, "anomalous": 10}
    assert manifest["metrics"]["test"] == result.evaluation
    assert manifest["metrics"]["classification"]["f1_interval"] is not None


def test_bad_dataset_writes_nothing(tmp_path: Path) -> None:
    dataset = tmp_path / "data"
    write_synthetic_dataset(dataset, normal=5, anomalous=2, segmentation=False)
    out = tmp_path / "model"
    completed = subprocess.run(
        [sys.executable, "-m", "lookout_edge.cli", "train", str(dataset), "--out", str(out), "--name", "m"],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 1
    assert "has 5 normal images" in completed.stderr and "needs at least 10" in completed.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no staging directory left behind


@pytest.mark.skipif(not COOKIES.is_dir(), reason="the cookies dataset is not in ../shared/datasets")
def test_cookies_end_to_end_through_the_agent(tmp_path: Path) -> None:
    """Train on the real cookies dataset, then serve the package: DetectAnomalies over gRPC
    gives the verdicts and scores that the evaluation recorded."""
    from lookout_edge.client.edge_client import EdgeAgentClient
    from lookout_edge.trainer.evaluate import evaluate_package
    from tests.conftest import AgentProcess, short_tmpdir

    models = tmp_path / "models"
    result = train(COOKIES / "train.manifest", models / "cookies", "cookies")
    manifest = json.loads((result.package / "manifest.json").read_text())
    assert manifest["metrics"]["auroc"] >= 0.95  # out of fold
    assert manifest["metrics"]["classification"]["f1"] >= 0.9
    # What `evaluate` records for the delivered package, image by image.
    records = [item.result() for item in evaluate_package(result.package, COOKIES / "train.manifest").items]
    agent = AgentProcess(short_tmpdir() / "agent.sock", models)
    try:
        agent.wait_ready()
        with EdgeAgentClient(agent.address) as client:
            client.start_and_wait("cookies", timeout=60)
            for record in records:
                path = COOKIES / "training-images" / record["name"]
                detection = client.detect(path, "cookies", shared_memory=True)
                assert detection.is_anomalous == record["predicted"], record["name"]
                assert detection.anomaly_score == pytest.approx(record["score"], abs=1e-5)
                assert detection.mask is not None and detection.mask.shape == (768, 576, 3)
    finally:
        assert agent.stop() == 0


def test_normal_only_training_set_with_a_test_set(tmp_path: Path) -> None:
    """train/ holds normal images only: the threshold comes from the normal scores alone."""
    source = write_synthetic_dataset(tmp_path / "source", normal=20, anomalous=10, segmentation=False).parent
    normals = sorted((source / "normal").iterdir())
    layout = {
        "train/normal": normals[:10],
        "test/normal": normals[10:],
        "test/anomaly": sorted((source / "anomaly").iterdir()),
    }
    for folder, files in layout.items():
        (tmp_path / "data" / folder).mkdir(parents=True)
        for file in files:
            (tmp_path / "data" / folder / file.name).write_bytes(file.read_bytes())
    result = train(tmp_path / "data", tmp_path / "model", "normals-only")
    manifest = json.loads((result.package / "manifest.json").read_text())
    assert manifest["training"]["images"] == {"normal": 10, "anomalous": 0}
    assert manifest["training"]["test_images"] == {"normal": 10, "anomalous": 10}
    assert result.evaluation["auroc"] >= 0.9
    # No training score reaches the threshold: the highest normal score plus a margin.
    assert result.evaluation["classification"]["fp"] <= 1


def test_evaluate_command(segmentation_package: Path, segmentation_dataset: Path, tmp_path: Path) -> None:
    report = tmp_path / "report"
    completed = subprocess.run(
        [sys.executable, "-m", "lookout_edge.cli", "evaluate", str(segmentation_package),
         str(segmentation_dataset), "--report", str(report), "--json"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    metrics = json.loads(completed.stdout)
    assert metrics["images"] == {"normal": 20, "anomalous": 40}  # every image of the dataset
    assert {"classification", "auroc", "pixel_auroc", "segmentation"} <= set(metrics)
    assert (report / "report.html").is_file()
    assert len(json.loads((report / "evaluation.json").read_text())["results"]) == 60


def test_a_changed_threshold_moves_verdict_and_mask_together(
    segmentation_package: Path, segmentation_dataset: Path, tmp_path: Path
) -> None:
    """The threshold lives in the manifest alone: raised above an anomalous image's score, the
    agent and `evaluate` both call the image normal and paint no mask."""
    from lookout_edge.agent.config import AgentConfig
    from lookout_edge.trainer.evaluate import evaluate_package
    from tests.conftest import RunningAgent, short_tmpdir

    package = tmp_path / "models" / "parts"
    shutil.copytree(segmentation_package, package)
    results = json.loads((package / "evaluation.json").read_text())["results"]
    flagged = max((r for r in results if r["is_anomalous"] and r["predicted"]), key=lambda r: r["score"])
    image = next(segmentation_dataset.parent.rglob(flagged["name"]))
    socket = short_tmpdir() / "agent.sock"
    agent = RunningAgent(AgentConfig(socket=f"unix://{socket}", models_dir=package.parent))
    try:
        with agent.client() as client:
            client.start_and_wait("parts", timeout=60)
            before = client.detect(image, "parts")
            assert before.is_anomalous and before.mask is not None
            assert (before.mask != 255).any(), "the default threshold paints the defect"
            client.stop_model("parts")
            manifest = json.loads((package / "manifest.json").read_text())
            manifest["threshold"] = (flagged["score"] + 1.0) / 2
            (package / "manifest.json").write_text(json.dumps(manifest))
            client.start_and_wait("parts", timeout=60)
            after = client.detect(image, "parts")
    finally:
        agent.close()
    assert after.anomaly_score == pytest.approx(before.anomaly_score)
    assert not after.is_anomalous
    assert after.mask is not None and (after.mask == 255).all()
    assert [a.area for a in after.anomalies if a.name != "background"] == [0.0, 0.0]
    evaluated = evaluate_package(package, segmentation_dataset)
    item = next(i for i in evaluated.items if i.name == flagged["name"])
    assert not item.predicted and item.label_map_pred is not None and not item.label_map_pred.any()
