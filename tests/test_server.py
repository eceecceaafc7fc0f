"""The agent as a process: its socket, signals, and the optional TLS listener."""

from __future__ import annotations

import grp
import signal
import socket
import stat
import time
from pathlib import Path

import grpc
import pytest

from lookout_edge.protocol import pb2, pb2_grpc
from tests.sample_models import write_sample_package

from .conftest import AgentProcess


def list_models(address: str, credentials: grpc.ChannelCredentials | None = None) -> list[str]:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        response = pb2_grpc.EdgeAgentStub(channel).ListModels(pb2.ListModelsRequest(), timeout=10)
    return [m.model_component for m in response.models]


def test_socket_mode_group_and_clean_shutdown(agent_process, sock_dir: Path) -> None:  # type: ignore[no-untyped-def]
    group = grp.getgrgid(1).gr_name  # a group that exists on any Debian system ("daemon")
    agent: AgentProcess = agent_process("--socket-group", group)
    agent.wait_ready()
    info = agent.socket_path.stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == 1
    assert sorted(list_models(agent.address)) == ["cls", "seg"]
    assert agent.stop(signal.SIGTERM) == 0
    assert not agent.socket_path.exists()


def test_stale_socket_is_replaced(agent_process, sock_dir: Path) -> None:  # type: ignore[no-untyped-def]
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_dir / "agent.sock"))
    stale.close()  # the file stays, nobody listens: what a crashed agent leaves
    agent = agent_process()
    agent.wait_ready()
    assert "cls" in list_models(agent.address)
    agent.stop(signal.SIGKILL)
    assert agent.socket_path.exists()  # killed: nothing cleaned up
    restarted = agent_process()
    restarted.wait_ready()
    assert "cls" in list_models(restarted.address)


def test_live_socket_is_never_stolen(agent_process) -> None:  # type: ignore[no-untyped-def]
    first = agent_process()
    first.wait_ready()
    second = agent_process()
    assert second.process.wait(30) != 0
    assert "already serving" in second.output()
    assert "cls" in list_models(first.address)


def test_non_socket_file_is_refused(agent_process, sock_dir: Path) -> None:  # type: ignore[no-untyped-def]
    (sock_dir / "agent.sock").write_text("precious")
    agent = agent_process()
    assert agent.process.wait(30) != 0
    assert "is not a socket" in agent.output()
    assert (sock_dir / "agent.sock").read_text() == "precious"


def test_bad_setting_is_a_clear_error(agent_process) -> None:  # type: ignore[no-untyped-def]
    agent = agent_process("--queue-size", "0")
    assert agent.process.wait(30) == 2
    assert "queue_size must be at least 1" in agent.output()


def test_sigterm_finishes_in_flight_calls(agent_process, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    write_sample_package(models_dir / "big", "big", 4096, 4096)
    agent = agent_process("--start-model", "big")
    agent.wait_ready()
    outcome: dict[str, object] = {}
    with grpc.insecure_channel(
        agent.address, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        stub = pb2_grpc.EdgeAgentStub(channel)
        while (
            stub.DescribeModel(pb2.DescribeModelRequest(model_component="big")).model_description.status != 2
        ):
            pass
        request = pb2.DetectAnomaliesRequest(
            model_component="big",
            bitmap=pb2.Bitmap(width=4096, height=4096, byte_data=bytes(4096 * 4096 * 3)),
        )
        future = stub.DetectAnomalies.future(request, timeout=120)
        # The call takes about a second on this model; give the agent time to receive it.
        time.sleep(0.3)
        agent.process.send_signal(signal.SIGTERM)
        try:
            outcome["result"] = future.result()
        except grpc.RpcError as exc:  # pragma: no cover - reported by the assertion below
            outcome["error"] = exc.code()
    assert agent.process.wait(60) == 0
    assert "error" not in outcome, outcome
    assert not agent.socket_path.exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_tls_listener_with_client_certificates(agent_process, certificates: Path) -> None:  # type: ignore[no-untyped-def]
    port = _free_port()
    agent = agent_process(
        "--tcp-address", f"127.0.0.1:{port}",
        "--tls-cert", str(certificates / "server.pem"),
        "--tls-key", str(certificates / "server.key"),
        "--tls-client-ca", str(certificates / "ca.pem"),
    )  # fmt: skip
    agent.wait_ready()
    ca = (certificates / "ca.pem").read_bytes()
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=(certificates / "client.key").read_bytes(),
        certificate_chain=(certificates / "client.pem").read_bytes(),
    )
    assert "cls" in list_models(f"127.0.0.1:{port}", with_cert)
    with pytest.raises(grpc.RpcError) as caught:
        list_models(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=ca))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
