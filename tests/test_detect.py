"""DetectAnomalies over real gRPC on a Unix socket, with real ONNX models and shared memory."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from lookout_edge.protocol import pb2
from lookout_edge.shm import SHM_DIR, OwnedSegment
from tests.sample_models import SAMPLE_THRESHOLD

from .conftest import HEIGHT, IMAGE_BYTES, WIDTH, RunningAgent, make_image, shm_request


def bytes_request(model: str, image: np.ndarray) -> pb2.DetectAnomaliesRequest:
    height, width = image.shape[:2]
    return pb2.DetectAnomaliesRequest(
        model_component=model, bitmap=pb2.Bitmap(width=width, height=height, byte_data=image.tobytes())
    )


def expect_error(
    agent: RunningAgent, request: pb2.DetectAnomaliesRequest, code: grpc.StatusCode, *words: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        agent.stub.DetectAnomalies(request)
    assert caught.value.code() == code, caught.value.details()
    for word in words:
        assert word in caught.value.details(), caught.value.details()
    # The agent keeps serving after a bad request.
    assert {m.model_component for m in agent.stub.ListModels(pb2.ListModelsRequest()).models} >= {
        "cls",
        "seg",
    }


def test_classification_verdicts_from_bytes(agent: RunningAgent) -> None:
    agent.start("cls")
    normal = agent.stub.DetectAnomalies(bytes_request("cls", make_image())).detect_anomaly_result
    assert not normal.is_anomalous
    assert normal.anomaly_score == pytest.approx(0.0)
    assert normal.anomaly_threshold == pytest.approx(SAMPLE_THRESHOLD)
    assert normal.confidence == pytest.approx(1.0)
    assert not normal.HasField("anomaly_mask") and len(normal.anomalies) == 0

    # 3 of 96 rows red: 3.1 % of the pixels, score 0.31 with the sample model's gain of 10.
    anomalous = agent.stub.DetectAnomalies(bytes_request("cls", make_image(red=3))).detect_anomaly_result
    assert anomalous.is_anomalous
    assert anomalous.anomaly_score == pytest.approx(3 / 96 * 10, rel=1e-5)
    assert 0.5 < anomalous.confidence < 1.0

    # Just below the threshold: normal, with little confidence.
    borderline = make_image()
    borderline[0, : int(WIDTH * HEIGHT * 0.0049)] = (250, 10, 10)
    result = agent.stub.DetectAnomalies(bytes_request("cls", borderline)).detect_anomaly_result
    assert not result.is_anomalous
    assert 0.5 <= result.confidence < 0.55


def test_segmentation_mask_and_areas_as_bytes(agent: RunningAgent) -> None:
    agent.start("seg")
    image = make_image(red=12, blue=24)
    result = agent.stub.DetectAnomalies(bytes_request("seg", image)).detect_anomaly_result
    assert result.is_anomalous
    names = [a.name for a in result.anomalies]
    assert names == ["background", "red-paint", "blue-paint"]
    areas = {a.name: a.pixel_anomaly.total_percentage_area for a in result.anomalies}
    assert areas["red-paint"] == pytest.approx(12 / 96)
    assert areas["blue-paint"] == pytest.approx(24 / 96)
    assert sum(areas.values()) == pytest.approx(1.0)
    colors = {a.name: a.pixel_anomaly.hex_color for a in result.anomalies}
    assert colors == {"background": "#FFFFFF", "red-paint": "#FF0000", "blue-paint": "#0000FF"}

    mask = result.anomaly_mask
    assert (mask.width, mask.height) == (WIDTH, HEIGHT)
    pixels = np.frombuffer(mask.byte_data, dtype=np.uint8).reshape(HEIGHT, WIDTH, 3)
    assert (pixels[:12] == (255, 0, 0)).all()
    assert (pixels[12:-24] == (255, 255, 255)).all()
    assert (pixels[-24:] == (0, 0, 255)).all()


def test_shared_memory_input_and_mask(agent: RunningAgent) -> None:
    agent.start("seg")
    image = make_image(red=6)
    with OwnedSegment.create(4096 + 2 * IMAGE_BYTES) as segment:
        segment.array()[4096 : 4096 + IMAGE_BYTES] = image.reshape(-1)
        request = shm_request("seg", segment, offset=4096, mask_offset=4096 + IMAGE_BYTES)
        result = agent.stub.DetectAnomalies(request).detect_anomaly_result
        assert result.is_anomalous
        handle = result.anomaly_mask.shared_memory_handle
        assert (handle.name, handle.offset, handle.size) == (segment.name, 4096 + IMAGE_BYTES, IMAGE_BYTES)
        assert not result.anomaly_mask.byte_data
        mask = segment.array()[4096 + IMAGE_BYTES : 4096 + 2 * IMAGE_BYTES].reshape(HEIGHT, WIDTH, 3)
        assert (mask[:6] == (255, 0, 0)).all() and (mask[6:] == (255, 255, 255)).all()
        # The input was only read.
        assert (segment.array()[4096 : 4096 + IMAGE_BYTES] == image.reshape(-1)).all()
        del mask
        # The agent attached to the segment but never unlinks it.
        assert (SHM_DIR / segment.name[1:]).exists()


def test_shared_memory_name_without_leading_slash(agent: RunningAgent) -> None:
    agent.start("cls")
    with OwnedSegment.create(IMAGE_BYTES) as segment:
        segment.array()[:] = make_image(red=10).reshape(-1)
        request = shm_request("cls", segment)
        request.bitmap.shared_memory_handle.name = segment.name.lstrip("/")
        assert agent.stub.DetectAnomalies(request).detect_anomaly_result.is_anomalous


def test_mask_handle_on_sample_client_field_number(agent: RunningAgent) -> None:
    """The proto published beside the sample clients carries the mask handle as field 3."""
    agent.start("seg")
    with OwnedSegment.create(2 * IMAGE_BYTES) as segment:
        segment.array()[:IMAGE_BYTES] = make_image(blue=48).reshape(-1)
        request = shm_request("seg", segment)
        request.anomaly_mask_params.sample_client_shared_memory_handle.CopyFrom(
            pb2.SharedMemoryHandle(name=segment.name, offset=IMAGE_BYTES, size=IMAGE_BYTES)
        )
        # On the wire this is field 3 of AnomalyMaskParams.
        assert request.anomaly_mask_params.SerializeToString()[0] == (3 << 3 | 2)
        result = agent.stub.DetectAnomalies(request).detect_anomaly_result
        assert result.anomaly_mask.shared_memory_handle.offset == IMAGE_BYTES
        mask = segment.array()[IMAGE_BYTES:].reshape(HEIGHT, WIDTH, 3)
        assert (mask[-48:] == (0, 0, 255)).all() and (mask[:-48] == (255, 255, 255)).all()
        del mask


def test_largest_bitmap_through_byte_data(agent_factory, models_dir) -> None:  # type: ignore[no-untyped-def]
    from tests.sample_models import write_sample_package

    write_sample_package(models_dir / "big", "big", 4096, 4096, segmentation=True)
    agent = agent_factory()
    agent.start("big")
    image = np.full((4096, 4096, 3), 128, dtype=np.uint8)
    image[:512] = (250, 0, 0)
    result = agent.stub.DetectAnomalies(bytes_request("big", image), timeout=120).detect_anomaly_result
    assert result.is_anomalous
    assert len(result.anomaly_mask.byte_data) == 4096 * 4096 * 3
    assert result.anomalies[1].pixel_anomaly.total_percentage_area == pytest.approx(1 / 8)


def test_bad_requests_get_documented_codes(agent: RunningAgent) -> None:
    agent.start("cls")
    agent.start("seg")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    image = make_image()
    expect_error(agent, bytes_request("", image), invalid, "model_component")
    expect_error(agent, bytes_request("nope", image), grpc.StatusCode.NOT_FOUND, "nope")
    expect_error(agent, pb2.DetectAnomaliesRequest(model_component="cls"), invalid, "bitmap is missing")
    expect_error(agent, bytes_request("cls", image[:, :63]), invalid, "width is 63", "64")
    expect_error(
        agent, bytes_request("cls", np.zeros((4097, 64, 3), np.uint8)), invalid, "height is 4097", "4096"
    )
    expect_error(agent, bytes_request("cls", image[:, :100]), invalid, "128x96")
    short = bytes_request("cls", image)
    short.bitmap.byte_data = short.bitmap.byte_data[:-1]
    expect_error(agent, short, invalid, "byte_data holds", str(IMAGE_BYTES))
    no_data = pb2.DetectAnomaliesRequest(model_component="cls", bitmap=pb2.Bitmap(width=WIDTH, height=HEIGHT))
    expect_error(agent, no_data, invalid, "neither byte_data nor shared_memory_handle")

    with OwnedSegment.create(IMAGE_BYTES + 10) as segment:
        bad_name = shm_request("cls", segment)
        bad_name.bitmap.shared_memory_handle.name = "/a/b"
        expect_error(agent, bad_name, invalid, "contains '/'")
        empty_name = shm_request("cls", segment)
        empty_name.bitmap.shared_memory_handle.name = "/"
        expect_error(agent, empty_name, invalid, "name is empty")
        missing = shm_request("cls", segment)
        missing.bitmap.shared_memory_handle.name = "/lookout_edge_test_missing_segment"
        expect_error(agent, missing, invalid, "does not exist")
        expect_error(agent, shm_request("cls", segment, offset=11), invalid, "reaches past its end")
        expect_error(agent, shm_request("cls", segment, size=IMAGE_BYTES - 3), invalid, "size is")
        bad_mask = shm_request("seg", segment, mask_offset=IMAGE_BYTES)
        expect_error(agent, bad_mask, invalid, "anomaly_mask_params", "reaches past its end")
        wrong_mask_size = shm_request("seg", segment)
        wrong_mask_size.anomaly_mask_params.shared_memory_handle.CopyFrom(
            pb2.SharedMemoryHandle(name=segment.name, offset=0, size=5)
        )
        expect_error(agent, wrong_mask_size, invalid, "anomaly_mask_params.shared_memory_handle.size")
    agent.stub.StopModel(pb2.StopModelRequest(model_component="cls"))
    expect_error(
        agent, bytes_request("cls", image), grpc.StatusCode.FAILED_PRECONDITION, "STOPPED", "StartModel"
    )


def test_unexpected_model_error_is_internal_and_the_agent_keeps_serving(agent_factory, models_dir) -> None:  # type: ignore[no-untyped-def]
    """A real graph that fails at run time for some inputs: it reshapes the image by its first
    pixel's value, which only divides the image size for some values."""
    from onnx import TensorProto, helper, numpy_helper

    from lookout_edge.package import write_package

    nodes = [
        helper.make_node("Reshape", ["image", "flat_shape"], ["flat"]),
        helper.make_node("Slice", ["flat", "zero", "one"], ["first"]),
        helper.make_node("Cast", ["first"], ["rows"], to=TensorProto.INT64),
        helper.make_node("Concat", ["rows", "minus_one"], ["shape"], axis=0),
        helper.make_node("Reshape", ["flat", "shape"], ["reshaped"]),
        helper.make_node("Cast", ["reshaped"], ["values"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["values"], ["peak"], keepdims=0),
        helper.make_node("Div", ["peak", "scale"], ["anomaly_score"]),
    ]
    constants = [
        numpy_helper.from_array(np.array([-1], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
    ]
    graph = helper.make_graph(
        nodes,
        "fails_for_some_inputs",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [HEIGHT, WIDTH, 3])],
        [helper.make_tensor_value_info("anomaly_score", TensorProto.FLOAT, [])],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    manifest = {
        "component_name": "fragile",
        "model_type": "classification",
        "image": {"width": WIDTH, "height": HEIGHT},
        "threshold": 0.5,
    }
    write_package(models_dir / "fragile", manifest, {"model.onnx": model.SerializeToString()})
    agent = agent_factory()
    agent.start("fragile")  # the warm-up image is all zeros: Reshape to [0 -> keep, -1] works
    good = make_image()
    good[0, 0] = (1, 0, 0)  # 1 divides everything
    assert agent.stub.DetectAnomalies(bytes_request("fragile", good)).detect_anomaly_result.anomaly_score > 0
    bad = make_image()
    bad[0, 0] = (7, 0, 0)  # 128 * 96 * 3 is not a multiple of 7
    expect_error(agent, bytes_request("fragile", bad), grpc.StatusCode.INTERNAL, "see the agent log")
    assert agent.stub.DetectAnomalies(bytes_request("fragile", good)).detect_anomaly_result.anomaly_score > 0
