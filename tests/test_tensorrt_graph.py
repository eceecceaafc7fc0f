"""The trainer's graphs against the ONNX-TensorRT parser's supported sets (agent/backends/tensorrt_support/).

The graph checked is the one the TensorRT backends build from (`tensorrt_variant` of a trained
model.onnx), not the package's graph as stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from lookout_edge.agent.backends.trt_graph import (
    check_graph,
    describe_graph,
    graph_opset,
    known_versions,
    parser_support,
    support_for,
    tensorrt_variant,
)
from lookout_edge.trainer.synthetic import write_synthetic_dataset
from lookout_edge.trainer.train import train


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[onnx.ModelProto]:
    work = tmp_path_factory.mktemp("trained")
    manifest = write_synthetic_dataset(work / "data", normal=20, anomalous=40, segmentation=True)
    result = train(manifest, work / "package", "trt-check")
    yield onnx.load(str(Path(result.package) / "model.onnx"))


def test_versions_named_by_the_guide_and_a_current_one_are_listed() -> None:
    assert known_versions() == ["7.1", "8.2", "10.12"]
    for version in known_versions():
        support = parser_support(version)
        assert support.source["repository"] == "onnx/onnx-tensorrt" and support.source["commit"]
        assert {"Conv", "MatMul", "Resize"} <= support.operators


@pytest.mark.slow
@pytest.mark.parametrize("version", ["7.1", "8.2", "10.12"])
def test_trained_graph_fits_the_parser(trained_model: onnx.ModelProto, version: str) -> None:
    support = parser_support(version)
    variant = tensorrt_variant(trained_model, support.max_opset)
    listing = "\n".join(f"{op} {name} {attrs}" for op, name, attrs in describe_graph(variant))
    problems = check_graph(variant, support)
    assert problems == [], f"graph seen by TensorRT {version}:\n{listing}"


@pytest.mark.slow
def test_variant_computes_what_the_package_graph_computes(trained_model: onnx.ModelProto) -> None:
    variant = tensorrt_variant(trained_model, parser_support("8.2").max_opset)
    assert graph_opset(variant) == 11  # the trainer writes opset 11: every parser reads it as it is
    image = np.random.default_rng(3).integers(0, 256, size=(192, 256, 3), dtype=np.uint8)
    original = ort.InferenceSession(trained_model.SerializeToString(), providers=["CPUExecutionProvider"])
    relabelled = ort.InferenceSession(variant.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [output.name for output in original.get_outputs()]
    expected = original.run(names, {"image": image})
    actual = relabelled.run(names, {"image": image.astype(np.float32)})
    for name, want, got in zip(names, expected, actual, strict=True):
        assert got.dtype == (np.int32 if name == "label_map" else want.dtype)
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), atol=1e-6, err_msg=name)


def _tiny_graph(op: str, height: int | str = 4, **attributes: object) -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], name="n", **attributes)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [height, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [height, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_check_reports_unsupported_operators_and_dynamic_shapes() -> None:
    support = parser_support("8.2")
    assert check_graph(_tiny_graph("Relu"), support) == []
    assert check_graph(_tiny_graph("Reciprocal"), support) == [
        "Reciprocal (node n): not supported by TensorRT 8.2's ONNX parser"
    ]
    dynamic = check_graph(_tiny_graph("Relu", height="batch"), support)
    assert "tensor x has a dynamic or unknown shape" in dynamic


def test_check_reports_uint8_where_the_parser_has_none() -> None:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], name="c", to=TensorProto.FLOAT)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    assert any("x is UINT8" in problem for problem in check_graph(model, parser_support("8.2")))
    assert check_graph(model, parser_support("10.12")) == []


def test_installed_version_maps_to_the_newest_listed_version_not_newer() -> None:
    assert support_for("8.2.1").tensorrt == "8.2"
    assert support_for("8.6.1").tensorrt == "8.2"
    assert support_for("7.1.3").tensorrt == "7.1"
    assert support_for("10.3.0").tensorrt == "8.2"
    assert support_for("10.13.2").tensorrt == "10.12"
