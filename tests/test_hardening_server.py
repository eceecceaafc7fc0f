"""The agent's edges: a socket squatted by another user, an unsafe socket directory, requests
protobuf cannot parse, and names too long to echo."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lookout_edge.agent.server import SocketInUse, claim_socket_path
from lookout_edge.protocol import pb2

from .conftest import HEIGHT, WIDTH, AgentProcess, RunningAgent, make_image

SERVICE = pb2.DESCRIPTOR.services_by_name["EdgeAgent"]
# A length-delimited field 1 of 5 bytes that holds 2: no message parses from it.
TRUNCATED = b"\x0a\x05ab"
# Binds a listening socket at argv[3] as uid argv[1], gid argv[2], then waits to be killed.
SQUATTER = """
import os, socket, sys, time
os.setgroups([])
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[1]))
squat = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
squat.bind(sys.argv[3])
squat.listen()
print("listening", flush=True)
time.sleep(300)
"""


@pytest.fixture
def other_user() -> Iterator[pwd.struct_passwd]:
    """A Unix user made for the test, and removed after it."""
    if os.geteuid() != 0:
        pytest.skip("creating a second Unix user (useradd) needs root")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("useradd/userdel are not installed")
    name = f"le-squat-{os.getpid()}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def test_socket_squatted_by_another_user_is_refused_naming_the_owner(
    agent_process, sock_dir: Path, other_user: pwd.struct_passwd
) -> None:  # type: ignore[no-untyped-def]
    sock_dir.chmod(0o1777)  # like /tmp, where the default socket lives
    path = sock_dir / "agent.sock"
    uid, gid = other_user.pw_uid, other_user.pw_gid
    squatter = subprocess.Popen(
        [sys.executable, "-S", "-c", SQUATTER, str(uid), str(gid), str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "listening\n"
        assert path.lstat().st_uid == uid
        agent: AgentProcess = agent_process()
        assert agent.process.wait(30) == 1
        output = agent.output()
        assert "POSSIBLE IMPOSTOR" in output
        assert f"user {other_user.pw_name} (uid {uid})" in output
        assert "already serving" not in output
        assert path.lstat().st_uid == uid  # refused, not taken over
    finally:
        squatter.kill()
        squatter.wait()


def test_socket_directory_writable_by_all_needs_the_sticky_bit(sock_dir: Path) -> None:
    path = sock_dir / "agent.sock"
    sock_dir.chmod(0o777)
    with pytest.raises(SocketInUse, match=r"writable by every user and not sticky \(mode 0777\)"):
        claim_socket_path(path)
    sock_dir.chmod(0o1777)
    claim_socket_path(path)  # sticky, as /tmp is: only the owner can remove or rename its socket


@pytest.mark.parametrize("method", [method.name for method in SERVICE.methods])
def test_malformed_request_is_invalid_argument_without_a_traceback(
    agent: RunningAgent, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    call = agent.channel.unary_unary(f"/AWS.LookoutVision.EdgeAgent/{method}")  # raw bytes
    with caplog.at_level(logging.DEBUG), pytest.raises(grpc.RpcError) as caught:
        call(TRUNCATED, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"not a valid {method}Request message" in caught.value.details()
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]
    assert len(agent.stub.ListModels(pb2.ListModelsRequest(), timeout=10).models) == 2


def test_long_model_name_is_not_found_and_shortened(agent: RunningAgent) -> None:
    name = "m" * 100_000
    bitmap = pb2.Bitmap(width=WIDTH, height=HEIGHT, byte_data=make_image().tobytes())
    calls = [
        (agent.stub.DescribeModel, pb2.DescribeModelRequest(model_component=name)),
        (agent.stub.StartModel, pb2.StartModelRequest(model_component=name)),
        (agent.stub.StopModel, pb2.StopModelRequest(model_component=name)),
        (agent.stub.DetectAnomalies, pb2.DetectAnomaliesRequest(model_component=name, bitmap=bitmap)),
    ]
    for call, request in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
        details = caught.value.details()
        assert f"'{'m' * 100}'…(100000 characters)" in details
        assert len(details) < 500


def test_an_agent_started_as_root_serves_as_the_configured_user(
    sock_dir: Path, other_user: pwd.struct_passwd
) -> None:
    """Greengrass may run the agent as root (RequiresPrivilege); `--user` drops root once the
    socket exists: models load and calls are served as that user, who owns the socket and
    removes it at the end. The client's segment gets the socket's group, which the user is in."""
    from lookout_edge.client import EdgeAgentClient
    from tests.sample_models import write_sample_package

    from .conftest import short_tmpdir

    models = short_tmpdir()
    models.chmod(0o755)
    write_sample_package(models / "seg", "seg", WIDTH, HEIGHT, segmentation=True)
    sock_dir.chmod(0o1777)
    group = grp.getgrgid(other_user.pw_gid).gr_name
    options = ("--user", other_user.pw_name, "--socket-group", group, "--start-model", "seg")
    agent = AgentProcess(sock_dir / "agent.sock", models, *options)
    try:
        agent.wait_ready()
        with open(f"/proc/{agent.pid}/status") as status:
            ids = {line.split(":")[0]: line.split()[1:] for line in status if line.startswith(("Uid", "Gid"))}
        assert ids["Uid"] == [str(other_user.pw_uid)] * 4 and ids["Gid"] == [str(other_user.pw_gid)] * 4
        assert agent.socket_path.stat().st_uid == other_user.pw_uid
        with EdgeAgentClient(agent.address) as client:
            client.start_and_wait("seg", timeout=30)
            assert client.detect(make_image(red=20), "seg", shared_memory=True).is_anomalous
    finally:
        status_code = agent.stop()
        shutil.rmtree(models, ignore_errors=True)
    assert status_code == 0, agent.output()
    assert not agent.socket_path.exists()


def test_the_user_and_concurrency_settings_are_checked_and_applied(tmp_path: Path) -> None:
    from lookout_edge.agent.config import ConfigError, load_config
    from lookout_edge.agent.server import AgentServer

    with pytest.raises(ConfigError, match="no such user"):
        load_config(overrides={"user": "le-nobody-such-user"}, environ={})
    with pytest.raises(ConfigError, match="max_concurrent_runs must be at least 1"):
        load_config(overrides={"max_concurrent_runs": 0}, environ={})
    config = load_config(
        environ={"LOOKOUT_EDGE_MAX_CONCURRENT_RUNS": "3", "LOOKOUT_EDGE_MODELS_DIR": str(tmp_path)}
    )
    assert AgentServer(config).registry.max_concurrent_runs == 3
