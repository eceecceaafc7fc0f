"""Shared fixtures: model packages, an in-process agent and an agent process, on real sockets."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lookout_edge.agent.config import AgentConfig
from lookout_edge.agent.server import AgentServer
from lookout_edge.client.edge_client import EdgeAgentClient
from lookout_edge.protocol import pb2, pb2_grpc
from lookout_edge.shm import OwnedSegment
from tests.namespace import refuse_bare_imports
from tests.sample_models import write_sample_package

ROOT = Path(__file__).resolve().parent.parent
refuse_bare_imports()
# Small images keep the tests fast; 64 px is the API's minimum side.
WIDTH, HEIGHT = 128, 96
IMAGE_BYTES = WIDTH * HEIGHT * 3


def shm_request(
    model: str,
    segment: OwnedSegment,
    offset: int = 0,
    size: int = IMAGE_BYTES,
    mask_offset: int | None = None,
) -> pb2.DetectAnomaliesRequest:
    """A WIDTH x HEIGHT image in `segment` at `offset`; with `mask_offset`, the mask goes there too."""
    handle = pb2.SharedMemoryHandle(name=segment.name, offset=offset, size=size)
    request = pb2.DetectAnomaliesRequest(
        model_component=model, bitmap=pb2.Bitmap(width=WIDTH, height=HEIGHT, shared_memory_handle=handle)
    )
    if mask_offset is not None:
        request.anomaly_mask_params.shared_memory_handle.CopyFrom(
            pb2.SharedMemoryHandle(name=segment.name, offset=mask_offset, size=IMAGE_BYTES)
        )
    return request


def short_tmpdir() -> Path:
    """A directory with a short path: Unix socket paths are limited to 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="le-", dir="/tmp"))


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    directory = short_tmpdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    write_sample_package(directory / "cls", "cls", WIDTH, HEIGHT)
    write_sample_package(directory / "seg", "seg", WIDTH, HEIGHT, segmentation=True)
    return directory


def make_image(red: int = 0, blue: int = 0, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """A grey textured image with `red` rows of red defect and `blue` rows of blue defect."""
    rng = np.random.default_rng(red * 1000 + blue)
    image = rng.integers(90, 160, size=(height, width, 3), dtype=np.uint8)
    image[:red] = (250, 10, 10)
    if blue:
        image[height - blue :] = (10, 10, 250)
    return image


class RunningAgent:
    """An agent served in this process over a real Unix socket."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.server = AgentServer(config)
        self.server.start()
        self.address = config.socket
        self.channel = grpc.insecure_channel(
            self.address, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        self.stub = pb2_grpc.EdgeAgentStub(self.channel)

    def client(self) -> EdgeAgentClient:
        return EdgeAgentClient(self.address)

    def wait_running(self, name: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.stub.DescribeModel(pb2.DescribeModelRequest(model_component=name)).model_description
            if status.status == pb2.RUNNING:
                return
            if status.status == pb2.FAILED:
                raise AssertionError(f"{name} failed: {status.status_message}")
            time.sleep(0.02)
        raise AssertionError(f"{name} did not reach RUNNING in {timeout} s")

    def start(self, name: str) -> None:
        self.stub.StartModel(pb2.StartModelRequest(model_component=name))
        self.wait_running(name)

    def close(self) -> None:
        self.channel.close()
        self.server.stop()


@pytest.fixture
def agent_factory(sock_dir: Path, models_dir: Path) -> Iterator:
    agents: list[RunningAgent] = []

    def start(**settings: object) -> RunningAgent:
        config = AgentConfig(socket=f"unix://{sock_dir}/agent{len(agents)}.sock", models_dir=models_dir)
        config.rescan_interval = 0.2
        config.shutdown_grace = 2.0
        for key, value in settings.items():
            setattr(config, key, value)
        agent = RunningAgent(config)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.close()


@pytest.fixture
def agent(agent_factory) -> RunningAgent:  # type: ignore[no-untyped-def]
    return agent_factory()


def lookout_edge_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lookout_edge.cli", *args]


class AgentProcess:
    """`lookout-edge agent` in its own process."""

    def __init__(self, socket_path: Path, models_dir: Path, *extra: str) -> None:
        self.socket_path = socket_path
        self.address = f"unix://{socket_path}"
        self.process = subprocess.Popen(
            lookout_edge_command("agent", "--socket", self.address, "--models-dir", str(models_dir), *extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = pb2_grpc.EdgeAgentStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"agent exited early:\n{self.output()}")
                try:
                    stub.ListModels(pb2.ListModelsRequest(), timeout=1)
                    return
                except grpc.RpcError:
                    time.sleep(0.05)
        raise AssertionError("agent did not answer in time")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def output(self) -> str:
        if self.process.poll() is None:
            return ""
        assert self.process.stdout is not None
        return self.process.stdout.read()


@pytest.fixture
def agent_process(sock_dir: Path, models_dir: Path) -> Iterator:
    processes: list[AgentProcess] = []

    def start(*extra: str, socket_name: str = "agent.sock") -> AgentProcess:
        process = AgentProcess(sock_dir / socket_name, models_dir, *extra)
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def mapped_regions(pid: int) -> tuple[int, int]:
    """The process's (file-backed, anonymous) mapped regions."""
    with open(f"/proc/{pid}/maps") as maps:
        lines = maps.read().splitlines()
    files = sum(1 for line in lines if len(line.split()) >= 6 and line.split()[5].startswith("/"))
    return files, len(lines) - files


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", str(tmp_path / "ca.key"), "-out", str(tmp_path / "ca.pem"))  # fmt: skip
    for name, extensions in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"), ("client", "")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", str(tmp_path / f"{name}.key"), "-out", str(tmp_path / f"{name}.csr"))  # fmt: skip
        ext_file = tmp_path / f"{name}.ext"
        ext_file.write_text(extensions + "\n" if extensions else "basicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-in", str(tmp_path / f"{name}.csr"), "-CA", str(tmp_path / "ca.pem"),
                 "-CAkey", str(tmp_path / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-extfile", str(ext_file), "-out", str(tmp_path / f"{name}.pem"))  # fmt: skip
    return tmp_path
