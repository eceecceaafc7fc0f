"""Custom Labels classification models, trained for real on the synthetic parts and run with
ONNX Runtime through the package: the CLI, the package format and the guide's evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lookout_edge.cli.main import main
from lookout_edge.custom_labels import LabelModel, decode_image, read_label_package
from lookout_edge.package import PackageError, read_package
from lookout_edge.trainer.labels.evaluation import best_f1_threshold, classification_metrics, confusion_matrix
from lookout_edge.trainer.synthetic import write_label_dataset

TRAINED = 60  # images in the training manifest; the generator's next images are unseen parts


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per kind: the training manifest, and a folder of unseen images of the same parts."""
    root = tmp_path_factory.mktemp("parts")
    made = {}
    for kind in ("classification", "multi-label"):
        made[kind] = write_label_dataset(root / kind, kind, TRAINED)
        write_label_dataset(root / f"{kind}-more", kind, TRAINED + 24)  # same parts, 24 more
    return {**made, "root": root}


@pytest.fixture(scope="module")
def packages(parts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("packages")
    built = {}
    for kind in ("classification", "multi-label"):
        code = main(
            [
                "train",
                str(parts[kind]),
                "--kind",
                kind,
                "--out",
                str(out / kind),
                "--project",
                "parts",
                "--json",
            ]
        )
        assert code == 0
        built[kind] = out / kind
    return built


def _unseen(parts: dict[str, Path], kind: str) -> list[tuple[Path, set[str]]]:
    """The images the model never saw, with their true labels from the bigger manifest."""
    lines = (parts["root"] / f"{kind}-more" / f"{kind}.manifest").read_text().splitlines()[TRAINED:]
    unseen = []
    for line in lines:
        data = json.loads(line)
        names = {value["class-name"] for key, value in data.items() if key.endswith("-metadata")}
        unseen.append((parts["root"] / f"{kind}-more" / data["source-ref"], names))
    return unseen


def test_classification_package_names_the_unseen_parts(
    parts: dict[str, Path], packages: dict[str, Path]
) -> None:
    package = read_label_package(packages["classification"])
    assert package.model_type == "image-classification"
    assert [label.name for label in package.labels] == ["missing", "normal", "scratch"]
    assert package.model_arn.startswith(
        "arn:aws:rekognition:us-east-1:000000000000:project/parts/version/parts."
    )
    model = LabelModel(package)
    right = 0
    unseen = _unseen(parts, "classification")
    for path, truth in unseen:
        predictions = model.predict(decode_image(path.read_bytes()), min_confidence=0.0)
        assert abs(sum(p.confidence for p in predictions) - 1.0) < 1e-4  # softmax over the labels
        right += predictions[0].name in truth
    assert right >= 0.9 * len(unseen)


def test_multi_label_package_finds_both_defects(parts: dict[str, Path], packages: dict[str, Path]) -> None:
    model = LabelModel(read_label_package(packages["multi-label"]))
    unseen = _unseen(parts, "multi-label")
    exact = 0
    for path, truth in unseen:
        names = {p.name for p in model.predict(decode_image(path.read_bytes()))}  # assumed thresholds
        exact += names == truth
    assert any(len(truth) == 2 for _, truth in unseen)
    assert exact >= 0.8 * len(unseen)


def test_evaluation_summary_is_the_guides_and_its_thresholds_are_the_packages(
    packages: dict[str, Path],
) -> None:
    package = read_label_package(packages["classification"])
    summary = package.evaluation()
    assert summary is not None
    assert set(summary) == {
        "Version",
        "EvaluationDetails",
        "AggregatedEvaluationResults",
        "LabelEvaluationResults",
    }
    details = summary["EvaluationDetails"]
    assert details["ProjectVersionArn"] == package.model_arn
    assert details["NumberOfTrainingImages"] + details["NumberOfTestingImages"] == TRAINED
    thresholds = {row["Label"]: row["Metrics"]["Threshold"] for row in summary["LabelEvaluationResults"]}
    assert thresholds == {label.name: label.assumed_threshold for label in package.labels}
    f1 = [row["Metrics"]["F1Score"] for row in summary["LabelEvaluationResults"]]
    assert f1 == sorted(f1, reverse=True)  # the guide sorts labels by F1
    aggregate = summary["AggregatedEvaluationResults"]
    assert aggregate["F1Score"] == pytest.approx(np.mean(f1))
    assert len(aggregate["ConfusionMatrix"]) == 9
    report = (packages["classification"] / "report.html").read_text()
    assert "Confusion matrix" in report and "scratch" in report


def test_detect_prints_custom_labels(
    parts: dict[str, Path], packages: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, truth = _unseen(parts, "classification")[0]
    capsys.readouterr()
    assert main(["detect", str(path), "--package", str(packages["classification"]), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert [label["Name"] for label in result["CustomLabels"]] == sorted(truth)
    assert 0 < result["CustomLabels"][0]["Confidence"] <= 100
    assert (
        main(["detect", str(path), "--package", str(packages["classification"]), "--min-confidence", "0"])
        == 0
    )
    assert len(capsys.readouterr().out.split(";")) == 3  # every label, MinConfidence 0


def test_the_edge_agent_reader_points_label_packages_to_the_endpoint(packages: dict[str, Path]) -> None:
    with pytest.raises(PackageError, match="lookout-edge rekognition"):
        read_package(packages["classification"])


def test_anomaly_train_still_needs_a_name(
    parts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", str(parts["classification"]), "--out", str(tmp_path / "x")]) == 1
    assert "--name" in capsys.readouterr().err


def test_best_f1_threshold_sits_between_the_classes() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2])
    threshold, precision, recall, f1 = best_f1_threshold(scores, np.array([1, 1, 1, 0, 0], bool))
    assert threshold == pytest.approx(0.5) and (precision, recall, f1) == (1.0, 1.0, 1.0)
    # One positive below a negative: the best cut keeps two of three positives and no negative.
    threshold, precision, recall, f1 = best_f1_threshold(scores, np.array([1, 1, 0, 1, 0], bool))
    assert threshold == pytest.approx(0.25) and precision == 0.75 and recall == 1.0
    assert best_f1_threshold(scores, np.zeros(5, bool))[0] == 0.5  # no positive: the fallback


def test_confusion_matrix_rows_are_shares_of_each_true_label() -> None:
    scores = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    truths = [("a",), ("a",), ("b",), ("b",)]
    metrics = classification_metrics(scores, truths, ("a", "b"))
    cells = {
        (e["GroundTruthLabel"], e["PredictedLabel"]): e["Value"]
        for e in confusion_matrix(scores, truths, metrics)
    }
    assert cells == {("a", "a"): 1.0, ("a", "b"): 0.0, ("b", "a"): 0.0, ("b", "b"): 1.0}
