"""Model store and lifecycle: states, transitions, packages coming and going, failures."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from lookout_edge.protocol import pb2
from tests.sample_models import write_sample_package

from .conftest import HEIGHT, WIDTH, RunningAgent, make_image


def status_of(agent: RunningAgent, name: str) -> pb2.ModelDescription:
    return agent.stub.DescribeModel(pb2.DescribeModelRequest(model_component=name)).model_description


def listed(agent: RunningAgent) -> dict[str, pb2.ModelMetadata]:
    return {m.model_component: m for m in agent.stub.ListModels(pb2.ListModelsRequest()).models}


def rpc_error(call, request) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    return caught.value


def test_states_and_transitions(agent: RunningAgent) -> None:
    models = listed(agent)
    assert set(models) == {"cls", "seg"}
    assert models["cls"].status == pb2.STOPPED
    assert models["cls"].lookout_vision_model_arn == "sample:cls"

    response = agent.stub.StartModel(pb2.StartModelRequest(model_component="cls"))
    assert response.status == pb2.STARTING
    agent.wait_running("cls")
    assert status_of(agent, "cls").status == pb2.RUNNING

    again = rpc_error(agent.stub.StartModel, pb2.StartModelRequest(model_component="cls"))
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "RUNNING" in again.details()

    stopped = agent.stub.StopModel(pb2.StopModelRequest(model_component="cls"))
    assert stopped.status == pb2.STOPPED
    assert status_of(agent, "cls").status == pb2.STOPPED

    not_running = rpc_error(agent.stub.StopModel, pb2.StopModelRequest(model_component="cls"))
    assert not_running.code() == grpc.StatusCode.FAILED_PRECONDITION

    for call, request in (
        (agent.stub.StartModel, pb2.StartModelRequest(model_component="missing")),
        (agent.stub.StopModel, pb2.StopModelRequest(model_component="missing")),
        (agent.stub.DescribeModel, pb2.DescribeModelRequest(model_component="missing")),
    ):
        assert rpc_error(call, request).code() == grpc.StatusCode.NOT_FOUND
    empty = rpc_error(agent.stub.DescribeModel, pb2.DescribeModelRequest(model_component=""))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stop_lets_in_flight_calls_finish(agent_factory, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    write_sample_package(models_dir / "big", "big", 4096, 4096)
    agent = agent_factory()
    agent.start("big")
    slot = agent.server.registry._slot("big")
    # The model holds its calls until the test lets them go, so that both are in flight at once
    # whatever the machine's speed (a fast run used to finish before the second was admitted).
    gate = threading.Event()
    model = slot.model
    assert model is not None
    run = model.run
    model.run = lambda image: gate.wait(60) and run(image)  # type: ignore[method-assign]
    image = np.zeros((4096, 4096, 3), dtype=np.uint8).tobytes()
    request = pb2.DetectAnomaliesRequest(
        model_component="big", bitmap=pb2.Bitmap(width=4096, height=4096, byte_data=image)
    )
    results: list[object] = []
    calls = [
        threading.Thread(target=lambda: results.append(agent.stub.DetectAnomalies(request, timeout=120)))
        for _ in range(2)
    ]
    for call in calls:
        call.start()
    deadline = time.monotonic() + 30
    while slot.in_flight < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert slot.in_flight == 2
    # Inference is in flight: ListModels and DescribeModel still answer.
    assert listed(agent)["big"].status == pb2.RUNNING
    stopped: list[pb2.StopModelResponse] = []
    stopping = threading.Thread(
        target=lambda: stopped.append(agent.stub.StopModel(pb2.StopModelRequest(model_component="big")))
    )
    stopping.start()
    while listed(agent)["big"].status != pb2.STOPPING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert listed(agent)["big"].status == pb2.STOPPING and slot.in_flight == 2  # StopModel waits
    gate.set()
    stopping.join()
    assert stopped[0].status == pb2.STOPPED
    assert slot.in_flight == 0
    for call in calls:
        call.join()
    assert len(results) == 2  # both calls admitted before StopModel completed


def test_queue_full_is_resource_exhausted(agent_factory, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    write_sample_package(models_dir / "big", "big", 4096, 4096)
    agent = agent_factory(queue_size=1)
    agent.start("big")
    request = pb2.DetectAnomaliesRequest(
        model_component="big",
        bitmap=pb2.Bitmap(width=4096, height=4096, byte_data=bytes(4096 * 4096 * 3)),
    )
    codes: list[grpc.StatusCode] = []

    def call() -> None:
        try:
            agent.stub.DetectAnomalies(request, timeout=120)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert grpc.StatusCode.OK in codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_packages_added_and_removed_while_running(agent: RunningAgent, models_dir: Path) -> None:
    assert "late" not in listed(agent)
    write_sample_package(models_dir / "late", "late", WIDTH, HEIGHT)
    assert listed(agent)["late"].status == pb2.STOPPED
    agent.start("late")
    shutil.rmtree(models_dir / "late")
    assert "late" not in listed(agent)
    error = rpc_error(
        agent.stub.DetectAnomalies,
        pb2.DetectAnomaliesRequest(
            model_component="late",
            bitmap=pb2.Bitmap(width=WIDTH, height=HEIGHT, byte_data=make_image().tobytes()),
        ),
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_hidden_directories_are_packages_being_written(agent: RunningAgent, models_dir: Path) -> None:
    write_sample_package(models_dir / ".staging", "staging", WIDTH, HEIGHT)
    assert "staging" not in listed(agent)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: (d / "manifest.json").write_text("{not json"), "cannot be read as JSON"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda d: _edit_manifest(d, model_type="detection"), "model_type 'detection'"),
        (lambda d: _edit_manifest(d, format_version=99), "format_version 99"),
        (lambda d: _edit_manifest(d, image={"width": 10, "height": 96}), "width 10"),
        (lambda d: _edit_manifest(d, threshold=1.5), "threshold 1.5"),
        (lambda d: _edit_manifest(d, files={}), "not listed under 'files'"),
    ],
)
def test_broken_manifest_shows_failed(agent: RunningAgent, models_dir: Path, breakage, message: str) -> None:  # type: ignore[no-untyped-def]
    broken = models_dir / "broken"
    write_sample_package(broken, "broken", WIDTH, HEIGHT)
    breakage(broken)
    models = listed(agent)
    name = "broken"
    assert models[name].status == pb2.FAILED
    assert message in models[name].status_message
    # StartModel is allowed from FAILED and fails again with the same reason.
    agent.stub.StartModel(pb2.StartModelRequest(model_component=name))
    _wait_status(agent, name, pb2.FAILED)
    assert models["cls"].status == pb2.STOPPED  # the others are untouched


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: (d / "model.onnx").write_bytes(b"x" * (d / "model.onnx").stat().st_size), "SHA-256"),
        (lambda d: (d / "model.onnx").write_bytes(b"truncated"), "manifest says"),
        (lambda d: (d / "model.onnx").unlink(), "missing"),
        (lambda d: _swap_graph(d, segmentation=True, width=64), "does not match the manifest's image size"),
    ],
)
def test_corrupt_model_file_fails_at_start(
    agent: RunningAgent, models_dir: Path, breakage, message: str
) -> None:  # type: ignore[no-untyped-def]
    breakage(models_dir / "cls")
    response = agent.stub.StartModel(pb2.StartModelRequest(model_component="cls"))
    assert response.status == pb2.STARTING
    description = _wait_status(agent, "cls", pb2.FAILED)
    assert message in description.status_message
    agent.start("seg")  # the agent goes on serving other models


def test_two_packages_claiming_one_name(agent: RunningAgent, models_dir: Path) -> None:
    write_sample_package(models_dir / "copy", "cls", WIDTH, HEIGHT)
    description = status_of(agent, "cls")
    assert description.status == pb2.FAILED
    assert "claimed by several packages" in description.status_message


def test_memory_limit_gives_resource_exhausted(agent_factory) -> None:  # type: ignore[no-untyped-def]
    agent = agent_factory(memory_limit_mb=40)
    agent.start("cls")  # about 32 MiB for a small model
    error = rpc_error(agent.stub.StartModel, pb2.StartModelRequest(model_component="seg"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "memory_limit_mb" in error.details()
    assert status_of(agent, "seg").status == pb2.STOPPED
    agent.stub.StopModel(pb2.StopModelRequest(model_component="cls"))
    agent.start("seg")


def test_models_started_at_launch(agent_factory) -> None:  # type: ignore[no-untyped-def]
    agent = agent_factory(start_models=["seg", "missing"])
    agent.wait_running("seg")
    assert status_of(agent, "cls").status == pb2.STOPPED


def _wait_status(agent: RunningAgent, name: str, status: int, timeout: float = 30) -> pb2.ModelDescription:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        description = status_of(agent, name)
        if description.status == status:
            return description
        time.sleep(0.02)
    raise AssertionError(f"{name} never reached {pb2.ModelStatus.Name(status)}")  # type: ignore[arg-type]


def _edit_manifest(directory: Path, **changes: object) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def _swap_graph(directory: Path, segmentation: bool, width: int) -> None:
    """Replace the graph by one for another image size, keeping the manifest's digests right."""
    from lookout_edge.package import file_sha256
    from tests.sample_models import sample_graph

    (directory / "model.onnx").write_bytes(sample_graph(HEIGHT, width, segmentation))
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {
        "sha256": file_sha256(directory / "model.onnx"),
        "size": (directory / "model.onnx").stat().st_size,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
