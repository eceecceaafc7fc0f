"""Wire compatibility: the proto's numbers, and client applications built from other protos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lookout_edge.protocol import pb2

from .conftest import ROOT, RunningAgent, make_image

GUIDE_PROTO = ROOT / "proto" / "edge-agent.proto"


def fields(message: type) -> dict[str, int]:
    return {field.name: field.number for field in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_numbers_are_the_guides() -> None:
    assert pb2.DESCRIPTOR.package == "AWS.LookoutVision"
    service = pb2.DESCRIPTOR.services_by_name["EdgeAgent"]
    assert sorted(m.name for m in service.methods) == [
        "DescribeModel", "DetectAnomalies", "ListModels", "StartModel", "StopModel",
    ]  # fmt: skip
    assert fields(pb2.Bitmap) == {"width": 1, "height": 2, "byte_data": 3, "shared_memory_handle": 4}
    assert fields(pb2.SharedMemoryHandle) == {"name": 1, "size": 2, "offset": 3}
    assert fields(pb2.AnomalyMaskParams) == {
        "shared_memory_handle": 2,
        "sample_client_shared_memory_handle": 3,
    }
    assert fields(pb2.DetectAnomaliesRequest) == {"model_component": 1, "bitmap": 2, "anomaly_mask_params": 3}
    assert fields(pb2.DetectAnomaliesResponse) == {"detect_anomaly_result": 1}
    assert fields(pb2.DetectAnomalyResult) == {
        "is_anomalous": 1, "confidence": 2, "anomaly_mask": 3, "anomalies": 4,
        "anomaly_score": 5, "anomaly_threshold": 6,
    }  # fmt: skip
    assert fields(pb2.Anomaly) == {"name": 1, "pixel_anomaly": 2}
    assert fields(pb2.PixelAnomaly) == {"total_percentage_area": 1, "hex_color": 2}
    description = {"model_component": 1, "lookout_vision_model_arn": 2, "status": 3, "status_message": 4}
    assert fields(pb2.ModelDescription) == description
    assert fields(pb2.ModelMetadata) == description
    for request in (pb2.DescribeModelRequest, pb2.StartModelRequest, pb2.StopModelRequest):
        assert fields(request) == {"model_component": 1}
    assert fields(pb2.StartModelResponse) == {"status": 1}
    assert fields(pb2.StopModelResponse) == {"status": 1}
    assert fields(pb2.ListModelsResponse) == {"models": 1}
    assert dict(pb2.ModelStatus.items()) == {
        "STOPPED": 0,
        "STARTING": 1,
        "RUNNING": 2,
        "FAILED": 3,
        "STOPPING": 4,
    }


def test_make_proto_reproduces_the_committed_stubs(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), str(tmp_path)], check=True)
    for name in ("edge_agent_pb2.py", "edge_agent_pb2.pyi", "edge_agent_pb2_grpc.py"):
        committed = (ROOT / "lookout_edge" / "protocol" / name).read_text()
        assert (tmp_path / name).read_text() == committed, f"{name} is stale: run make proto"


def build_client_stubs(proto_text: str, directory: Path) -> Path:
    """Generate stubs the way the guide tells client developers to."""
    directory.mkdir()
    (directory / "edge-agent.proto").write_text(proto_text)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "--proto_path=.", "--python_out=.", "--grpc_python_out=.",
         "edge-agent.proto"],
        cwd=directory,
        check=True,
    )  # fmt: skip
    assert (directory / "edge_agent_pb2.py").exists()
    return directory


def run_client(stubs: Path, agent: RunningAgent, model: str, image: Path, *flags: str) -> dict:  # type: ignore[type-arg]
    script = ROOT / "tests" / "clients" / "guide_client.py"
    env = {**os.environ, "PYTHONPATH": str(stubs)}
    completed = subprocess.run(
        [sys.executable, str(script), agent.address, model, str(image), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def agent(agent_factory) -> RunningAgent:  # type: ignore[no-untyped-def]
    """The guide's samples create segments with Python's SharedMemory, mode 0600: the agent uses
    them when client and agent run as one user, as Greengrass runs components. Here that user
    may be root, so the socket admits its owner alone (docs/api-compatibility.md)."""
    return agent_factory(socket_mode=0o600)


@pytest.fixture
def anomalous_png(tmp_path: Path) -> Path:
    path = tmp_path / "sample.png"
    Image.fromarray(make_image(red=5)).save(path)
    return path


def guide_proto_without_compat_field() -> str:
    """edge-agent.proto exactly as the guide prints it (no field-3 mask handle)."""
    lines = GUIDE_PROTO.read_text().splitlines()
    return "\n".join(line for line in lines if "sample_client_shared_memory_handle" not in line)


def test_guide_client_flow(agent: RunningAgent, tmp_path: Path, anomalous_png: Path) -> None:
    stubs = build_client_stubs(guide_proto_without_compat_field(), tmp_path / "guide")
    seen = run_client(stubs, agent, "seg", anomalous_png, "--mask")
    assert seen["states"][0] == "STOPPED" and seen["states"][-1] == "RUNNING"
    for how in ("bytes", "shm"):
        assert seen[how]["is_anomalous"] is True
        assert seen[how]["anomaly_score"] == pytest.approx(5 / 96 * 10, rel=1e-5)
        assert [name for name, _ in seen[how]["anomalies"]] == ["background", "red-paint", "blue-paint"]
    assert seen["mask_colors"] == ["ff0000", "ffffff"]
    assert seen["stop"] == "STOPPED"


def test_sample_client_proto_with_mask_handle_on_field_3(
    agent: RunningAgent, tmp_path: Path, anomalous_png: Path
) -> None:
    text = GUIDE_PROTO.read_text()
    text = "\n".join(
        line for line in text.splitlines() if "SharedMemoryHandle shared_memory_handle = 2;" not in line
    )
    text = text.replace("sample_client_shared_memory_handle = 3", "shared_memory_handle = 3")
    stubs = build_client_stubs(text, tmp_path / "sample")
    seen = run_client(stubs, agent, "seg", anomalous_png, "--mask")
    assert seen["shm"]["is_anomalous"] is True
    assert seen["mask_colors"] == ["ff0000", "ffffff"]


def test_classification_only_proto_client(agent: RunningAgent, tmp_path: Path, anomalous_png: Path) -> None:
    proto = (ROOT / "tests" / "protos" / "classification_only.proto").read_text()
    stubs = build_client_stubs(proto, tmp_path / "old")
    seen = run_client(stubs, agent, "cls", anomalous_png)
    assert seen["bytes"] == {"is_anomalous": True, "confidence": pytest.approx(seen["shm"]["confidence"])}
    assert 0.5 < seen["bytes"]["confidence"] <= 1.0
    assert seen["stop"] == "STOPPED"
