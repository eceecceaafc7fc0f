"""The models directory under stress: entries that cannot be examined, a models_dir that is not
a directory, manifests that would block or are huge, a scan stuck on the file system, packages
fixed on disk after they failed, and how many calls run on a model at once."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from lookout_edge.agent import models
from lookout_edge.agent.backends.ort_backend import OnnxModel
from lookout_edge.package import MAX_MANIFEST_BYTES, ModelPackage, PackageError, package_dirs
from lookout_edge.protocol import pb2, pb2_grpc
from tests.sample_models import write_sample_package

from .conftest import HEIGHT, WIDTH, AgentProcess, RunningAgent, make_image


def listed(stub: pb2_grpc.EdgeAgentStub, timeout: float = 10) -> dict[str, pb2.ModelMetadata]:
    response = stub.ListModels(pb2.ListModelsRequest(), timeout=timeout)
    return {m.model_component: m for m in response.models}


def describe(stub: pb2_grpc.EdgeAgentStub, name: str) -> pb2.ModelDescription:
    request = pb2.DescribeModelRequest(model_component=name)
    return stub.DescribeModel(request, timeout=10).model_description


def detect(stub: pb2_grpc.EdgeAgentStub, name: str = "cls") -> pb2.DetectAnomalyResult:
    bitmap = pb2.Bitmap(width=WIDTH, height=HEIGHT, byte_data=make_image(red=30).tobytes())
    request = pb2.DetectAnomaliesRequest(model_component=name, bitmap=bitmap)
    return stub.DetectAnomalies(request, timeout=10).detect_anomaly_result


def wait_status(stub: pb2_grpc.EdgeAgentStub, name: str, status: int) -> pb2.ModelDescription:
    deadline = time.monotonic() + 30
    while (description := describe(stub, name)).status != status:
        assert time.monotonic() < deadline, f"{name} stayed {description}"
        time.sleep(0.02)
    return description


def test_entry_that_cannot_be_examined_is_a_failed_model(agent: RunningAgent, models_dir: Path) -> None:
    (models_dir / "loop").symlink_to("loop")  # DirEntry.is_dir() raises ELOOP
    (models_dir / "notes.txt").write_text("not a package")  # files are no packages: ignored
    models = listed(agent.stub)
    assert set(models) == {"cls", "seg", "loop"}
    assert models["loop"].status == pb2.FAILED
    assert "Too many levels of symbolic links" in models["loop"].status_message
    agent.start("cls")  # the management API goes on working around it
    assert detect(agent.stub).is_anomalous
    assert describe(agent.stub, "cls").status == pb2.RUNNING
    agent.stub.StopModel(pb2.StopModelRequest(model_component="cls"), timeout=10)
    assert package_dirs(models_dir) == [models_dir / name for name in ("cls", "loop", "seg")]


@pytest.mark.parametrize("replacement", ["file", "missing"])
def test_models_dir_that_is_not_a_directory_serves_no_models(
    agent: RunningAgent, models_dir: Path, caplog: pytest.LogCaptureFixture, replacement: str
) -> None:
    agent.start("cls")
    shutil.rmtree(models_dir)
    if replacement == "file":
        models_dir.write_text("not a directory")
    with caplog.at_level(logging.ERROR, logger="lookout_edge.agent.models"):
        assert listed(agent.stub) == {}
        time.sleep(0.6)  # a few rescans: the problem is logged once, not on every one
        assert listed(agent.stub) == {}
    reason = "is not a directory" if replacement == "file" else "does not exist"
    errors = [record.getMessage() for record in caplog.records if reason in record.getMessage()]
    assert len(errors) == 1 and str(models_dir) in errors[0], caplog.text
    with pytest.raises(grpc.RpcError) as caught:
        detect(agent.stub)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    if replacement == "file":
        models_dir.unlink()
    write_sample_package(models_dir / "cls", "cls", WIDTH, HEIGHT)
    assert listed(agent.stub)["cls"].status == pb2.STOPPED


def test_manifest_that_would_block_does_not_hang_the_agent(agent_process, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    # A FIFO's open() waits for a writer, as a read on a hung network mount would: in a child
    # process, so that a wedged agent cannot wedge the tests.
    agent: AgentProcess = agent_process("--start-model", "cls")
    agent.wait_ready()
    with grpc.insecure_channel(agent.address) as channel:
        stub = pb2_grpc.EdgeAgentStub(channel)
        wait_status(stub, "cls", pb2.RUNNING)
        (models_dir / "fifo").mkdir()
        os.mkfifo(models_dir / "fifo" / "manifest.json")
        models = listed(stub)  # ListModels rescans
        assert models["fifo"].status == pb2.FAILED
        assert "is not a regular file" in models["fifo"].status_message
        assert detect(stub).is_anomalous
        assert describe(stub, "cls").status == pb2.RUNNING


def test_oversized_manifest_is_refused_without_reading_it(agent: RunningAgent, models_dir: Path) -> None:
    manifest = models_dir / "cls" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["training"] = {"padding": "x" * MAX_MANIFEST_BYTES}
    manifest.write_text(json.dumps(data))
    description = describe(agent.stub, "cls")
    assert description.status == pb2.FAILED
    assert f"a manifest is at most {MAX_MANIFEST_BYTES} bytes" in description.status_message


def test_a_stuck_scan_holds_no_lock_the_calls_need(
    agent: RunningAgent, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that never returns (a hard-mounted NFS server gone) delays the scan only."""
    agent.start("cls")
    release = threading.Event()
    read_package = models.read_package

    def stuck_read(directory: Path) -> ModelPackage:
        if directory.name == "stuck":
            release.wait(60)
        return read_package(directory)

    monkeypatch.setattr(models, "read_package", stuck_read)
    try:
        write_sample_package(models_dir / "stuck", "stuck", WIDTH, HEIGHT)
        scanning = threading.Thread(target=lambda: listed(agent.stub, timeout=60))
        scanning.start()
        time.sleep(0.5)  # the scans (this call's and the background one) are stuck now
        assert detect(agent.stub).is_anomalous
        began = time.monotonic()
        assert listed(agent.stub)["cls"].status == pb2.RUNNING  # from the last completed scan
        assert time.monotonic() - began < models.SCAN_WAIT + 2
    finally:
        release.set()
    scanning.join(10)
    assert listed(agent.stub)["stuck"].status == pb2.STOPPED


def test_package_dirs_raises_for_a_models_dir_that_cannot_be_listed(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="does not exist"):
        package_dirs(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(PackageError, match="is not a directory"):
        package_dirs(tmp_path / "file")


def test_fixed_manifest_shows_stopped_without_the_old_reason(agent: RunningAgent, models_dir: Path) -> None:
    broken = models_dir / "broken"
    write_sample_package(broken, "broken", WIDTH, HEIGHT)
    (broken / "manifest.json").write_text("{not json")
    agent.stub.StartModel(pb2.StartModelRequest(model_component="broken"))
    assert "cannot be read as JSON" in wait_status(agent.stub, "broken", pb2.FAILED).status_message
    write_sample_package(broken, "broken", WIDTH, HEIGHT)
    fixed = listed(agent.stub)["broken"]
    assert (fixed.status, fixed.status_message) == (pb2.STOPPED, "")
    agent.start("broken")


def test_resolved_duplicate_name_shows_stopped(agent: RunningAgent, models_dir: Path) -> None:
    write_sample_package(models_dir / "copy", "cls", WIDTH, HEIGHT)
    agent.stub.StartModel(pb2.StartModelRequest(model_component="cls"))
    assert "claimed by several packages" in wait_status(agent.stub, "cls", pb2.FAILED).status_message
    shutil.rmtree(models_dir / "copy")
    description = describe(agent.stub, "cls")
    assert (description.status, description.status_message) == (pb2.STOPPED, "")


def test_runs_per_model_are_bounded_by_the_cores(agent_factory, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """More concurrent clients than cores: the extra calls wait their turn, and all succeed."""
    cores = len(os.sched_getaffinity(0))
    clients = cores + 3
    running = 0
    peak = 0
    counter = threading.Lock()
    run = OnnxModel.run

    def counted_run(self: OnnxModel, image: np.ndarray) -> object:
        nonlocal running, peak
        with counter:
            running += 1
            peak = max(peak, running)
        try:
            time.sleep(0.05)
            return run(self, image)
        finally:
            with counter:
                running -= 1

    monkeypatch.setattr(OnnxModel, "run", counted_run)
    agent = agent_factory(queue_size=clients, workers=clients + 4)
    agent.start("cls")
    barrier = threading.Barrier(clients)
    failures: list[BaseException] = []

    def client() -> None:
        barrier.wait()
        try:
            for _ in range(4):
                detect(agent.stub)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    assert 1 <= peak <= cores
