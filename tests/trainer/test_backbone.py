import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lookout_edge.trainer.architecture import STAGES, stage_stride
from lookout_edge.trainer.backbone import OPSET, build_backbone_graph
from lookout_edge.trainer.reference import reference_features

# What TensorRT takes without plugins; a new op type here needs checking against it first.
ALLOWED_OPS = {"Cast", "Unsqueeze", "Transpose", "Resize", "Sub", "Div", "Conv", "Clip", "Add"}


def textured_image(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like RGB image: smooth gradients, oriented stripes, a bright blob and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = []
    for _ in range(3):
        fy, fx, phase = rng.uniform(2, 12), rng.uniform(2, 12), rng.uniform(0, 2 * np.pi)
        stripes = 60 * np.sin(2 * np.pi * (fy * y + fx * x) + phase)
        blob = 90 * np.exp(-((y - rng.uniform(0.2, 0.8)) ** 2 + (x - rng.uniform(0.2, 0.8)) ** 2) / 0.02)
        channels.append(128 + 50 * (x - y) + stripes + blob + rng.normal(0, 8, (height, width)))
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def run_graph(model: onnx.ModelProto, image: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": image}), strict=True))


@pytest.mark.parametrize(
    ("input_size", "network_size", "stages", "seed"),
    [
        ((144, 192), (64, 96), (2, 4), 0),  # downscale, the usual case
        ((64, 64), (64, 64), (2, 4), 1),  # already at network size: no Resize
        ((40, 56), (64, 64), (1, 3, 6), 2),  # upscale, other stages
    ],
)
def test_graph_matches_numpy_reference(
    weights: dict[str, np.ndarray],
    input_size: tuple[int, int],
    network_size: tuple[int, int],
    stages: tuple[int, ...],
    seed: int,
) -> None:
    image = textured_image(*input_size, seed=seed)
    model = build_backbone_graph(weights, *input_size, network_size=network_size, stages=stages)

    features = run_graph(model, image)
    expected = reference_features(weights, image, network_size=network_size, stages=stages)

    assert list(features) == [f"stage{stage}" for stage in stages] == list(expected)
    for name, stage in zip(features, stages, strict=True):
        shape = (1, STAGES[stage].out_channels, *(side // stage_stride(stage) for side in network_size))
        assert features[name].shape == expected[name].shape == shape
        scale = np.abs(expected[name]).max()
        assert scale > 0.1  # a dead backbone would match trivially
        assert np.abs(features[name] - expected[name]).max() <= 1e-4 * scale


def test_graph_is_static_checked_and_tensorrt_friendly(weights: dict[str, np.ndarray]) -> None:
    model = build_backbone_graph(weights, 576, 768)

    onnx.checker.check_model(model, full_check=True)
    assert [opset.version for opset in model.opset_import] == [OPSET]
    assert {node.op_type for node in model.graph.node} <= ALLOWED_OPS
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    values = [*inferred.input, *inferred.value_info, *inferred.output]
    assert len(values) > len(model.graph.node)
    for value in values:
        dims = value.type.tensor_type.shape.dim
        assert dims and all(dim.HasField("dim_value") and dim.dim_value > 0 for dim in dims), value.name
    input_type = model.graph.input[0].type.tensor_type
    assert input_type.elem_type == onnx.TensorProto.UINT8
    assert [dim.dim_value for dim in input_type.shape.dim] == [576, 768, 3]


def test_graph_resizes_once_and_stops_at_last_stage(weights: dict[str, np.ndarray]) -> None:
    ops = [node.op_type for node in build_backbone_graph(weights, 576, 768, stages=(2,)).graph.node]
    assert ops.count("Resize") == 1
    # stem + 1 + 2 * 3 + 2 * 3 block convs
    assert ops.count("Conv") == 1 + 2 + 6 + 6


def test_rejects_bad_input_size(weights: dict[str, np.ndarray]) -> None:
    with pytest.raises(ValueError, match="input size must be positive"):
        build_backbone_graph(weights, 0, 768)
