"""Random requests: the agent answers each with a documented status code and keeps serving."""

from __future__ import annotations

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lookout_edge.protocol import pb2
from lookout_edge.shm import OwnedSegment

from .conftest import HEIGHT, WIDTH, RunningAgent

# The codes the API reference lists for DetectAnomalies (a superset of the other calls').
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INTERNAL,
}
SEGMENT_SIZE = WIDTH * HEIGHT * 3 * 2

names = st.sampled_from(["cls", "seg", "stopped", "", "missing", "seg\x00", "/../cls"]) | st.text(max_size=40)
sides = st.sampled_from([0, -1, 63, 64, HEIGHT, WIDTH, 4096, 4097, 2**31 - 1]) | st.integers(
    -(2**31), 2**31 - 1
)
sizes = st.sampled_from([0, WIDTH * HEIGHT * 3, SEGMENT_SIZE, 2**64 - 1]) | st.integers(0, 2**64 - 1)


@st.composite
def handles(draw: st.DrawFn, segment_name: str) -> pb2.SharedMemoryHandle:
    name = draw(
        st.sampled_from([segment_name, segment_name[1:], "/missing", "a/b", ""]) | st.text(max_size=30)
    )
    return pb2.SharedMemoryHandle(name=name, size=draw(sizes), offset=draw(sizes))


@st.composite
def requests(draw: st.DrawFn, segment_name: str) -> pb2.DetectAnomaliesRequest:
    request = pb2.DetectAnomaliesRequest(model_component=draw(names))
    if draw(st.booleans()):
        bitmap = request.bitmap
        bitmap.width, bitmap.height = draw(sides), draw(sides)
        kind = draw(st.sampled_from(["bytes", "shm", "none"]))
        if kind == "bytes":
            length = draw(st.sampled_from([0, 1, WIDTH * HEIGHT * 3, WIDTH * HEIGHT * 3 + 1]))
            bitmap.byte_data = draw(st.binary(min_size=length, max_size=length))
        elif kind == "shm":
            bitmap.shared_memory_handle.CopyFrom(draw(handles(segment_name)))
    if draw(st.booleans()):
        field = draw(st.sampled_from(["shared_memory_handle", "sample_client_shared_memory_handle"]))
        getattr(request.anomaly_mask_params, field).CopyFrom(draw(handles(segment_name)))
    return request


def test_random_requests_get_documented_codes(agent: RunningAgent) -> None:
    agent.start("cls")
    agent.start("seg")
    with OwnedSegment.create(SEGMENT_SIZE) as segment:

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            request=requests(segment.name), other=st.sampled_from(["Describe", "Start", "Stop"]), name=names
        )
        def check(request: pb2.DetectAnomaliesRequest, other: str, name: str) -> None:
            for call in (
                lambda: agent.stub.DetectAnomalies(request, timeout=30),
                lambda: getattr(agent.stub, f"{other}Model")(
                    getattr(pb2, f"{other}ModelRequest")(model_component=name), timeout=30
                ),
            ):
                try:
                    call()
                except grpc.RpcError as exc:
                    assert exc.code() in DOCUMENTED - {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}, (
                        exc.code(),
                        exc.details(),
                    )
            agent.stub.ListModels(pb2.ListModelsRequest(), timeout=30)

        check()
