"""The package checks itself: reference inputs the trainer measured, run by the agent at StartModel.

A small real package is trained once (synthetic parts, 128x96, a 128 px network input: a few
seconds); its graph is then tampered with the way an attacker or a broken copy would, with the
manifest's digests rewritten so that only the self-check can notice.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from PIL import Image

from lookout_edge.agent.backends.ort_backend import OnnxModel
from lookout_edge.agent.models import FAILED, RUNNING, ModelRegistry, status_name
from lookout_edge.agent.selfcheck import CPU, FP16, GPU_FP32, run_self_check, tolerance_for
from lookout_edge.client.edge_client import EdgeAgentClient, ModelState
from lookout_edge.contract import INPUT_NAME, SCORE_OUTPUT
from lookout_edge.package import MANIFEST_NAME, PackageError, read_package, write_package
from lookout_edge.trainer.selfcheck import REFERENCE_MARGIN, choose_references, reference_checks
from lookout_edge.trainer.synthetic import write_synthetic_dataset
from lookout_edge.trainer.train import TrainOptions, train
from tests.conftest import AgentProcess, make_image, short_tmpdir
from tests.sample_models import sample_graph, write_sample_package

WIDTH, HEIGHT = 128, 96


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classification package trained on 20 normal and 10 anomalous synthetic parts."""
    data = write_synthetic_dataset(
        tmp_path_factory.mktemp("data"), normal=20, anomalous=10, size=(WIDTH, HEIGHT), segmentation=False
    )
    out = tmp_path_factory.mktemp("trained") / "parts"
    return train(data.parent, out, "parts", options=TrainOptions(short_side=128)).package


def _manifest(package: Path) -> dict[str, Any]:
    return json.loads((package / MANIFEST_NAME).read_text())


def _rewrite(
    source: Path,
    target: Path,
    name: str,
    graph: Callable[[onnx.ModelProto], None] | None = None,
    manifest: Callable[[dict[str, Any]], None] | None = None,
    readable: bool = True,
) -> Path:
    """A copy of `source` as component `name`, its graph and manifest edited, every digest rewritten."""
    shutil.copytree(source, target)
    if graph is not None:
        model = onnx.load(str(target / "model.onnx"))
        graph(model)
        onnx.save(model, str(target / "model.onnx"))
    document = _manifest(target)
    document["component_name"] = name
    for relative in document["files"]:
        content = (target / relative).read_bytes()
        document["files"][relative] = {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content)}
    if manifest is not None:
        manifest(document)
    (target / MANIFEST_NAME).write_text(json.dumps(document))
    if readable:
        read_package(target).verify_files()  # the digests cannot tell the copy from the original
    return target


def _nudge_offset(delta: float) -> Callable[[onnx.ModelProto], None]:
    """Move the logistic calibration's offset (the score's logit) by `delta`."""

    def edit(model: onnx.ModelProto) -> None:
        (tensor,) = [t for t in model.graph.initializer if t.name == "offset"]
        value = numpy_helper.to_array(tensor) + np.float32(delta)
        tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), "offset"))

    return edit


def _score_moves(package: Path) -> list[float]:
    """How far the package's graph moves each reference's score from the recorded one (ONNX Runtime CPU)."""
    loaded = read_package(package)
    assert loaded.self_check is not None
    session = ort.InferenceSession(str(loaded.model_file.path), providers=["CPUExecutionProvider"])
    moves = []
    for reference in loaded.self_check.references:
        image = np.asarray(Image.open(reference.file.path))
        (score,) = session.run([SCORE_OUTPUT], {INPUT_NAME: image})
        moves.append(abs(float(score) - reference.anomaly_score))
    return moves


def _delta_for(package: Path, score_move: float) -> float:
    """The offset nudge that moves the most sensitive reference's score by about `score_move`."""
    scores = [reference["anomaly_score"] for reference in _manifest(package)["self_check"]["references"]]
    return score_move / max(s * (1 - s) for s in scores)


def _settle(client: EdgeAgentClient, name: str, timeout: float = 60.0) -> ModelState:
    client.start_model(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.describe_model(name)
        if state.status in ("RUNNING", "FAILED"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"{name} is still starting after {timeout} s")


def test_trained_package_carries_its_references(trained: Path) -> None:
    manifest = _manifest(trained)
    check = manifest["self_check"]
    assert check["measured_with"] == f"onnxruntime {ort.__version__} CPU"
    assert 2 <= len(check["references"]) <= 4
    verdicts = {reference["anomalous"] for reference in check["references"]}
    assert verdicts == {True, False}  # the likeliest normal and the most anomalous image
    for reference in check["references"]:
        assert reference["file"] in manifest["files"]  # hashed like every file
        assert abs(reference["anomaly_score"] - check["threshold"]) >= REFERENCE_MARGIN
    assert _score_moves(trained) == [0.0] * len(check["references"])  # what the graph gives


def test_self_check_fails_start_for_a_tampered_graph_with_rewritten_hashes(
    trained: Path, tmp_path: Path
) -> None:
    """Through a real agent process over gRPC: the untouched package and a nudge below the CPU
    tolerance start RUNNING; a nudge beyond it is FAILED with `self-check failed:`; a package
    without a self-check (tests/sample_models.py) starts as before."""
    models = tmp_path / "models"
    shutil.copytree(trained, models / "parts")
    small = _rewrite(trained, models / "small", "parts-small", graph=_nudge_offset(_delta_for(trained, 3e-5)))
    large = _rewrite(trained, models / "large", "parts-large", graph=_nudge_offset(_delta_for(trained, 3e-3)))
    write_sample_package(models / "legacy", "legacy", WIDTH, HEIGHT)
    small_moves, large_moves = _score_moves(small), _score_moves(large)
    assert 1e-6 < max(small_moves) < CPU.score  # it moved, within the tolerance
    assert max(large_moves) > CPU.score
    moved = _manifest(trained)["self_check"]["references"][int(np.argmax(large_moves))]["image"]

    agent = AgentProcess(short_tmpdir() / "agent.sock", models)
    try:
        agent.wait_ready()
        with EdgeAgentClient(agent.address) as client:
            for name in ("parts", "parts-small", "legacy"):
                state = _settle(client, name)
                assert (state.status, state.status_message) == ("RUNNING", "model is running"), name
            state = _settle(client, "parts-large")
            assert state.status == "FAILED"
            assert state.status_message.startswith("self-check failed:")
            assert f"reference '{moved}'" in state.status_message
            assert "anomaly_score" in state.status_message and "tolerance 0.0001" in state.status_message
            assert "ONNX Runtime CPU" in state.status_message
            # The failed model serves nothing; the others go on serving.
            assert client.detect(make_image(), "parts").anomaly_score >= 0.0
            assert client.describe_model("parts-large").status == "FAILED"
    finally:
        assert agent.stop() == 0


def test_tolerance_rule() -> None:
    assert tolerance_for("cpu", "auto") is CPU
    assert tolerance_for("cpu", "fp16") is CPU
    assert tolerance_for("cuda", "auto") is GPU_FP32
    assert tolerance_for("cuda", "fp16") is GPU_FP32  # the CUDA provider has no FP16 mode
    for backend in ("tensorrt", "ort-tensorrt"):
        assert tolerance_for(backend, "auto") is FP16
        assert tolerance_for(backend, "fp16") is FP16
        assert tolerance_for(backend, "fp32") is GPU_FP32
    # Tighter where the arithmetic is the trainer's; every tolerance is below the margin the
    # trainer keeps between a reference and the threshold, so no tolerated drift flips a verdict.
    assert CPU.score <= 1e-4 < GPU_FP32.score < FP16.score < REFERENCE_MARGIN
    assert CPU.label_fraction < GPU_FP32.label_fraction < FP16.label_fraction


def test_a_score_move_fails_on_the_cpu_and_passes_within_the_fp16_tolerance(
    trained: Path, tmp_path: Path
) -> None:
    """The same nudged graph, on the real CPU backend, judged by two backends' tolerances."""
    nudged = _rewrite(trained, tmp_path / "nudged", "nudged", graph=_nudge_offset(_delta_for(trained, 3e-3)))
    assert CPU.score < max(_score_moves(nudged)) < FP16.score
    package = read_package(nudged)
    model = OnnxModel(package)
    try:
        run_self_check(model, package, FP16)
        with pytest.raises(PackageError, match=r"^self-check failed: .*anomaly_score"):
            run_self_check(model, package, CPU)
    finally:
        model.close()


def test_a_verdict_that_differs_fails_even_within_the_tolerance(trained: Path, tmp_path: Path) -> None:
    """A recorded score a hair above the threshold, an actual one a hair below: only the verdict differs."""

    def edit(manifest: dict[str, Any]) -> None:
        reference = manifest["self_check"]["references"][0]
        actual = reference["anomaly_score"]
        reference["anomaly_score"] = actual + 2e-5
        reference["anomalous"] = True
        manifest["self_check"]["threshold"] = actual + 1e-5

    package = read_package(_rewrite(trained, tmp_path / "edge", "edge", manifest=edit))
    model = OnnxModel(package)
    try:
        with pytest.raises(PackageError) as failure:
            run_self_check(model, package, CPU)
    finally:
        model.close()
    message = str(failure.value)
    assert message.startswith("self-check failed: reference ")
    assert "verdict normal" in message and "the trainer measured anomalous" in message
    assert "anomaly_score" not in message  # 2e-5 is within the CPU tolerance


def _segmentation_package(directory: Path, name: str) -> Path:
    """The rule-based segmentation sample with a self-check from `reference_checks`."""
    graph = sample_graph(HEIGHT, WIDTH, segmentation=True)
    entry, files = reference_checks(graph, [("clean", make_image()), ("painted", make_image(red=6, blue=3))])
    manifest = {
        "component_name": name,
        "model_type": "segmentation",
        "image": {"width": WIDTH, "height": HEIGHT},
        "threshold": 0.5,
        "labels": [{"name": "red-paint", "color": "#FF0000"}, {"name": "blue-paint", "color": "#0000FF"}],
        "self_check": entry,
    }
    return write_package(directory, manifest, {"model.onnx": graph, **files})


def test_label_maps_are_checked(tmp_path: Path) -> None:
    """A graph that paints the second label with another value keeps its scores, not its label map."""
    original = _segmentation_package(tmp_path / "seg", "seg")
    painted = _manifest(original)["self_check"]["references"][1]
    assert painted["label_fractions"] == {"1": 6 / HEIGHT, "2": 3 / HEIGHT}

    def relabel(model: onnx.ModelProto) -> None:
        (tensor,) = [t for t in model.graph.initializer if t.name == "two"]
        tensor.CopyFrom(numpy_helper.from_array(np.array(3, dtype=np.uint8), "two"))

    tampered = _rewrite(original, tmp_path / "tampered", "tampered", graph=relabel)
    registry = ModelRegistry(tmp_path)
    for name in ("seg", "tampered"):
        registry.start(name)
    assert _wait(registry, "seg") == (RUNNING, "model is running")
    status, message = _wait(registry, "tampered")
    assert status == FAILED and message.startswith("self-check failed: reference 'painted'")
    assert "'blue-paint' covers 0.00% of the label map, the trainer measured 3.12%" in message
    assert "'label value 3' covers 3.12%" in message
    assert "anomaly_score" not in message
    assert tampered.is_dir()


def _wait(registry: ModelRegistry, name: str, timeout: float = 30.0) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = registry.describe(name)
        if info.status in (RUNNING, FAILED):
            return info.status, info.status_message
        time.sleep(0.02)
    raise AssertionError(f"{name} is {status_name(registry.describe(name).status)} after {timeout} s")


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            _png(WIDTH // 2, HEIGHT),
            "is a RGB image of 64x96; a reference input is RGB at the model's size, 128x96",
        ),
        (_png(WIDTH, HEIGHT, "L"), "is a L image of 128x96"),
        (b"not a png at all", "cannot be read as a PNG image"),
    ],
)
def test_a_broken_reference_file_fails_the_start(tmp_path: Path, content: bytes, expected: str) -> None:
    """The reference's digest is rewritten with it: only reading the image can tell."""
    shutil.copytree(_segmentation_package(tmp_path / "source", "seg"), tmp_path / "edited")
    (tmp_path / "edited" / "self_check" / "reference-0.png").write_bytes(content)
    _rewrite(tmp_path / "edited", tmp_path / "models" / "broken", "broken")
    registry = ModelRegistry(tmp_path / "models")
    registry.start("broken")
    status, message = _wait(registry, "broken")
    assert status == FAILED and message.startswith("self-check failed:") and expected in message


MALFORMED: list[tuple[Callable[[dict[str, Any]], None], str]] = [
    (lambda check: check.pop("threshold"), "'self_check.threshold' must be a number"),
    (lambda check: check.update(references=[]), "'self_check.references' must be a list of 1 to 8"),
    (lambda check: check.update(threshold="0.5"), "'self_check.threshold' must be a number in 0..1"),
    (lambda check: check.update(measured_with=None), "'self_check.measured_with' must be a string"),
    (lambda check: check["references"].__setitem__(0, "x"), "'self_check.references[0]' must be an object"),
    (lambda check: check["references"][0].update(file="other.png"), "'self_check.references[0].file' names"),
    (lambda check: check["references"][0].update(file="model.onnx"), "must name a PNG file"),
    (lambda check: check["references"][1].update(anomaly_score=1.5), "references[1].anomaly_score' must be"),
    (lambda check: check["references"][1].update(anomaly_score=True), "references[1].anomaly_score' must be"),
    (lambda check: check["references"][1].update(anomalous="yes"), "references[1].anomalous' must be true"),
    (lambda check: check["references"][1].update(anomalous=False), "disagrees with its anomaly_score"),
    (lambda check: check["references"][1].pop("label_fractions"), "label_fractions' must be an object"),
    (lambda check: check["references"][1]["label_fractions"].update({"3": 0.1}), "has key '3'"),
    (lambda check: check["references"][1]["label_fractions"].update({"1": -1}), "['1'] must be a fraction"),
]


@pytest.mark.parametrize(("edit", "expected"), MALFORMED)
def test_a_malformed_self_check_key_is_a_package_error_naming_it(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    source = _segmentation_package(tmp_path / "seg", "seg")
    package = _rewrite(
        source,
        tmp_path / "bad",
        "bad",
        manifest=lambda manifest: edit(manifest["self_check"]),
        readable=False,
    )
    _rewrite(
        source,
        tmp_path / "list",
        "list",
        manifest=lambda manifest: manifest.update(self_check=[]),
        readable=False,
    )
    with pytest.raises(PackageError, match="'self_check' must be an object"):
        read_package(tmp_path / "list")
    with pytest.raises(PackageError, match="retrain or repackage the model") as failure:
        read_package(package)
    assert expected in str(failure.value)
    # The agent lists it as a model that cannot start, and goes on.
    registry = ModelRegistry(tmp_path)
    registry.start("bad")
    status, message = _wait(registry, "bad")
    assert status == FAILED and expected in message
    registry.start("seg")
    assert _wait(registry, "seg") == (RUNNING, "model is running")


def test_label_fractions_belong_to_segmentation_models(tmp_path: Path) -> None:
    graph = sample_graph(HEIGHT, WIDTH, segmentation=False)
    entry, files = reference_checks(graph, [("painted", make_image(red=6))])
    entry["references"][0]["label_fractions"] = {"1": 0.1}
    manifest = {
        "component_name": "cls",
        "model_type": "classification",
        "image": {"width": WIDTH, "height": HEIGHT},
        "threshold": 0.5,
        "self_check": entry,
    }
    with pytest.raises(
        PackageError, match=r"'self_check.references\[0\].label_fractions' is for segmentation"
    ):
        write_package(tmp_path / "cls", manifest, {"model.onnx": graph, **files})
    assert not (tmp_path / "cls").exists()


def test_chooser_keeps_references_away_from_the_threshold() -> None:
    scores = [0.02, 0.30, 0.47, 0.01, 0.53, 0.62, 0.99, 0.41]
    anomalous = [False, False, False, False, True, True, True, True]
    # The likeliest normal; the most anomalous; the anomalous image nearest the threshold
    # outside the margin (0.53 is inside it; a missed defect at 0.41 is nearer than 0.62).
    assert choose_references(scores, anomalous) == [3, 6, 7]
    # Without anomalous images: the two normal images farthest apart below the threshold
    # (a normal image's score only falls in the delivered model, so one at 0.47 might cross).
    assert choose_references(scores[:4], anomalous[:4]) == [3, 1]
    assert choose_references([0.1], [False]) == [0]
    assert choose_references([0.48, 0.46, 0.52], [False, False, True]) == [1]  # none qualifies
    with pytest.raises(ValueError, match="2 scores for 1 images"):
        choose_references([0.1, 0.2], [False])


def test_reference_checks_measure_the_graph() -> None:
    graph = sample_graph(HEIGHT, WIDTH, segmentation=False)
    entry, files = reference_checks(graph, [("clean", make_image()), ("painted", make_image(red=6))])
    assert entry["threshold"] == 0.5
    assert [(r["image"], r["anomalous"]) for r in entry["references"]] == [
        ("clean", False),
        ("painted", True),
    ]
    assert entry["references"][1]["anomaly_score"] == pytest.approx(10 * 6 / HEIGHT)
    # The PNG holds the very pixels measured.
    stored = np.asarray(Image.open(io.BytesIO(files["self_check/reference-1.png"])))
    assert np.array_equal(stored, make_image(red=6))
    assert "label_fractions" not in entry["references"][0]
    assert sorted(files) == ["self_check/reference-0.png", "self_check/reference-1.png"]
    with pytest.raises(ValueError, match="uint8"):
        reference_checks(graph, [("float", make_image().astype(np.float32))])
