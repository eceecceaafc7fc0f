"""Shared memory that is hostile or unlucky: truncated under the agent, a FIFO or a directory in
place of a segment, a full /dev/shm, another user's segment. The agent answers with an error
and keeps serving; crashes and wedges are tried on an agent in its own process."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lookout_edge.protocol import pb2, pb2_grpc
from lookout_edge.shm import SHM_DIR, OwnedSegment

from .conftest import (
    HEIGHT,
    IMAGE_BYTES,
    WIDTH,
    AgentProcess,
    RunningAgent,
    lookout_edge_command,
    make_image,
    shm_request,
    short_tmpdir,
)


def _running(address: str, model: str) -> pb2_grpc.EdgeAgentStub:
    stub = pb2_grpc.EdgeAgentStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + 30
    while stub.DescribeModel(pb2.DescribeModelRequest(model_component=model)).model_description.status != 2:
        assert time.monotonic() < deadline, f"{model} did not start"
        time.sleep(0.02)
    return stub


def _named_request(model: str, name: str, size: int = IMAGE_BYTES) -> pb2.DetectAnomaliesRequest:
    handle = pb2.SharedMemoryHandle(name=name, offset=0, size=size)
    return pb2.DetectAnomaliesRequest(
        model_component=model, bitmap=pb2.Bitmap(width=WIDTH, height=HEIGHT, shared_memory_handle=handle)
    )


def test_a_segment_truncated_during_calls_is_an_error_not_a_crash(agent_process) -> None:  # type: ignore[no-untyped-def]
    """Mapped pages truncated away raise SIGBUS, which kills a Python process; the agent reads
    with pread instead, so a short segment is an INVALID_ARGUMENT."""
    agent: AgentProcess = agent_process("--start-model", "seg")
    agent.wait_ready()
    stub = _running(agent.address, "seg")
    stop = threading.Event()
    codes: set[grpc.StatusCode] = set()
    with OwnedSegment.create(2 * IMAGE_BYTES) as segment:
        segment.array()[:IMAGE_BYTES] = make_image(red=4).reshape(-1)
        request = shm_request("seg", segment, mask_offset=IMAGE_BYTES)
        fd = os.open(SHM_DIR / segment.name[1:], os.O_RDWR)

        def shrink_and_grow() -> None:
            while not stop.is_set():
                os.ftruncate(fd, 100)
                os.ftruncate(fd, 2 * IMAGE_BYTES)

        def call() -> None:
            while not stop.is_set():
                try:
                    stub.DetectAnomalies(request, timeout=10)
                    codes.add(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.add(exc.code())

        threads = [threading.Thread(target=shrink_and_grow)] + [
            threading.Thread(target=call) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        time.sleep(3)
        stop.set()
        for thread in threads:
            thread.join()
        os.close(fd)
    assert agent.process.poll() is None, f"the agent died:\n{agent.output()}"
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}, codes
    assert grpc.StatusCode.INVALID_ARGUMENT in codes
    stub.ListModels(pb2.ListModelsRequest(), timeout=5)
    assert agent.stop() == 0


def test_a_fifo_or_a_directory_named_as_the_segment_never_blocks(agent_process) -> None:  # type: ignore[no-untyped-def]
    agent: AgentProcess = agent_process("--start-model", "cls", "--workers", "4", "--queue-size", "2")
    agent.wait_ready()
    stub = _running(agent.address, "cls")
    fifo = SHM_DIR / f"lookout_edge_test_fifo_{os.getpid()}"
    directory = SHM_DIR / f"lookout_edge_test_dir_{os.getpid()}"
    os.mkfifo(fifo, 0o660)
    directory.mkdir()
    try:
        for name in (fifo.name, directory.name) * 10:  # more calls than workers and queue slots
            with pytest.raises(grpc.RpcError) as caught:
                stub.DetectAnomalies(_named_request("cls", name), timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            assert "is not a shared memory segment" in caught.value.details()
        stub.ListModels(pb2.ListModelsRequest(), timeout=5)
        stub.StopModel(pb2.StopModelRequest(model_component="cls"), timeout=5)
    finally:
        fifo.unlink()
        directory.rmdir()
    assert agent.stop(timeout=15) == 0


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A 1 MiB tmpfs, as a full /dev/shm (Docker's default is 64 MiB) would behave."""
    where = short_tmpdir()
    completed = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True
    )
    if completed.returncode != 0:
        shutil.rmtree(where, ignore_errors=True)
        pytest.skip(f"cannot mount a tmpfs here: {completed.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        shutil.rmtree(where, ignore_errors=True)


def test_a_mask_write_to_a_full_shared_memory_filesystem_is_resource_exhausted(
    small_tmpfs: Path, sock_dir: Path, models_dir: Path
) -> None:
    """The caller's segment is sparse (as ftruncate makes it) and the filesystem is full: the
    mask's pages cannot be allocated. The agent runs with its shared-memory directory pointed at
    the small tmpfs (the only stand-in: /dev/shm itself is the machine's)."""
    socket = sock_dir / "agent.sock"
    launcher = (
        "import sys; from pathlib import Path; import lookout_edge.shm as shm; "
        f"shm.SHM_DIR = Path({str(small_tmpfs)!r}); "
        "from lookout_edge.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    command = lookout_edge_command("agent", "--socket", f"unix://{socket}", "--models-dir", str(models_dir))
    agent = subprocess.Popen(
        [sys.executable, "-c", launcher, *command[3:], "--start-model", "seg"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert agent.poll() is None and time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.05)
        stub = _running(f"unix://{socket}", "seg")
        segment = small_tmpfs / "sparse_segment"
        with segment.open("wb") as handle:
            handle.write(make_image(red=10).tobytes())
            handle.truncate(2 * IMAGE_BYTES)  # the mask half is a hole
        segment.chmod(0o660)
        with (small_tmpfs / "filler").open("wb") as filler:
            try:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            except OSError:
                pass
        request = _named_request("seg", "/sparse_segment")
        request.anomaly_mask_params.shared_memory_handle.CopyFrom(
            pb2.SharedMemoryHandle(name="/sparse_segment", offset=IMAGE_BYTES, size=IMAGE_BYTES)
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.DetectAnomalies(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
        assert "no space left" in caught.value.details()
        assert agent.poll() is None
        (small_tmpfs / "filler").unlink()
        result = stub.DetectAnomalies(request, timeout=10).detect_anomaly_result
        assert result.is_anomalous
    finally:
        agent.send_signal(signal.SIGTERM)
        output = agent.communicate(timeout=30)[0]
    assert agent.returncode == 0, output


def test_rows_padded_to_four_bytes_as_gstreamer_sends_them(agent_factory, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """AWS's GStreamer element passes GStreamer's RGB buffers, whose rows are padded to a
    multiple of 4 bytes: 550x380 is 627,760 bytes, not 627,000."""
    from tests.sample_models import write_sample_package

    write_sample_package(models_dir / "odd", "odd", 550, 380, segmentation=True)
    agent: RunningAgent = agent_factory()
    agent.start("odd")
    image = np.full((380, 550, 3), 120, dtype=np.uint8)
    image[:38] = (250, 10, 10)
    padded = np.zeros((380, 1652), dtype=np.uint8)  # round_up(550 * 3, 4)
    padded[:, :1650] = image.reshape(380, 1650)
    padded[:, 1650:] = 255  # padding bytes are ignored, whatever they hold
    assert padded.nbytes == 627_760
    request = pb2.DetectAnomaliesRequest(
        model_component="odd", bitmap=pb2.Bitmap(width=550, height=380, byte_data=padded.tobytes())
    )
    from_bytes = agent.stub.DetectAnomalies(request).detect_anomaly_result
    with OwnedSegment.create(padded.nbytes) as segment:
        segment.array()[:] = padded.reshape(-1)
        handle = pb2.SharedMemoryHandle(name=segment.name, offset=0, size=padded.nbytes)
        request = pb2.DetectAnomaliesRequest(
            model_component="odd", bitmap=pb2.Bitmap(width=550, height=380, shared_memory_handle=handle)
        )
        from_shm = agent.stub.DetectAnomalies(request).detect_anomaly_result
    for result in (from_bytes, from_shm):
        assert result.is_anomalous
        assert result.anomalies[1].pixel_anomaly.total_percentage_area == pytest.approx(0.1)
    # Any other length is still refused, naming both layouts.
    short = pb2.DetectAnomaliesRequest(
        model_component="odd", bitmap=pb2.Bitmap(width=550, height=380, byte_data=padded.tobytes()[:-1])
    )
    with pytest.raises(grpc.RpcError) as caught:
        agent.stub.DetectAnomalies(short)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "627000" in caught.value.details() and "627760" in caught.value.details()


def test_a_bad_mask_handle_is_refused_before_the_model_runs(agent_factory) -> None:  # type: ignore[no-untyped-def]
    calls = []
    agent: RunningAgent = agent_factory()
    agent.start("seg")
    slot = agent.server.registry._slot("seg")
    model = slot.model
    assert model is not None
    original = model.run
    model.run = lambda image: calls.append(1) or original(image)  # type: ignore[method-assign]
    with OwnedSegment.create(IMAGE_BYTES) as segment:
        segment.array()[:] = make_image().reshape(-1)
        request = shm_request("seg", segment)
        request.anomaly_mask_params.shared_memory_handle.CopyFrom(
            pb2.SharedMemoryHandle(name="/lookout_edge_test_no_such_mask", offset=0, size=IMAGE_BYTES)
        )
        with pytest.raises(grpc.RpcError) as caught:
            agent.stub.DetectAnomalies(request)
    assert "anomaly_mask_params" in caught.value.details() and "does not exist" in caught.value.details()
    assert calls == []


# -- who may use which segment -----------------------------------------------------------------


@pytest.fixture
def two_users() -> Iterator[tuple[pwd.struct_passwd, pwd.struct_passwd, grp.struct_group]]:
    """A caller in the agent's socket group and a victim outside it: real Unix users."""
    if os.geteuid() != 0:
        pytest.skip("creating Unix users needs root")
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    suffix = str(os.getpid())[-5:]
    group, caller, victim = f"lecallers{suffix}", f"lecaller{suffix}", f"levictim{suffix}"
    subprocess.run(["groupadd", group], check=True)
    subprocess.run(["useradd", "-M", "-N", "-g", group, caller], check=True)
    subprocess.run(["useradd", "-M", "-N", victim], check=True)
    try:
        yield pwd.getpwnam(caller), pwd.getpwnam(victim), grp.getgrnam(group)
    finally:
        for user in (caller, victim):
            subprocess.run(["userdel", user], check=False)
        subprocess.run(["groupdel", group], check=False)


# Loads gRPC as root (the interpreter lies under /root), then becomes the caller before it
# touches a segment or the socket.
CALLER_SCRIPT = """
import json, os, sys
import grpc
from lookout_edge.protocol import pb2, pb2_grpc
address, model, name, size, mask_name, uid, gid = sys.argv[1:8]
os.setgroups([])
os.setgid(int(gid))
os.setuid(int(uid))
for segment in filter(None, (name, mask_name)):
    try:
        os.close(os.open("/dev/shm" + segment, os.O_RDWR if segment == mask_name else os.O_RDONLY))
        opened = True
    except PermissionError:
        opened = False
    if not opened:
        print(json.dumps({"cannot_open": segment}), file=sys.stderr)
handle = pb2.SharedMemoryHandle(name=name, offset=0, size=int(size))
request = pb2.DetectAnomaliesRequest(model_component=model, bitmap=pb2.Bitmap(width=128, height=96,
    shared_memory_handle=handle))
if mask_name:
    request.anomaly_mask_params.shared_memory_handle.CopyFrom(
        pb2.SharedMemoryHandle(name=mask_name, offset=0, size=int(size)))
try:
    result = pb2_grpc.EdgeAgentStub(grpc.insecure_channel(address)).DetectAnomalies(request, timeout=10)
    print(json.dumps({"code": "OK", "anomalous": result.detect_anomaly_result.is_anomalous}))
except grpc.RpcError as exc:
    print(json.dumps({"code": exc.code().name, "details": exc.details()}))
"""


def test_a_caller_cannot_make_the_agent_use_segments_it_could_not_open(
    two_users: tuple[pwd.struct_passwd, pwd.struct_passwd, grp.struct_group],
    agent_process,  # type: ignore[no-untyped-def]
    sock_dir: Path,
) -> None:
    """The agent runs as root, its socket open to a group; a member of that group names root's
    0600 segment and another user's 0600 segment, to read and to overwrite: both are refused
    and left untouched. A segment shared with the group works."""
    import json

    caller, victim, group = two_users
    os.chmod(sock_dir, 0o755)
    agent: AgentProcess = agent_process("--start-model", "seg", "--socket-group", group.gr_name)
    agent.wait_ready()
    _running(agent.address, "seg")
    secret = make_image(red=30).tobytes()
    owners = {
        "root": (0, 0),
        "victim": (victim.pw_uid, victim.pw_gid),
        "shared": (caller.pw_uid, group.gr_gid),
    }
    segments = {}
    for label, (owner, gid) in owners.items():
        path = SHM_DIR / f"lookout_edge_test_{label}_{os.getpid()}"
        path.write_bytes(secret)
        os.chown(path, owner, gid)
        os.chmod(path, 0o660 if label == "shared" else 0o600)
        segments[label] = path

    def call(image: str, mask: str = "") -> dict:  # type: ignore[type-arg]
        arguments = [agent.address, "seg", f"/{image}", str(IMAGE_BYTES), mask and f"/{mask}"]
        completed = subprocess.run(
            [sys.executable, "-c", CALLER_SCRIPT, *arguments, str(caller.pw_uid), str(group.gr_gid)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert completed.returncode == 0, completed.stderr
        return {**json.loads(completed.stdout), "refused_to_caller": completed.stderr.count("cannot_open")}

    try:
        for label in ("root", "victim"):
            read = call(segments[label].name)
            assert read["refused_to_caller"] == 1, "the caller itself may not open it"
            assert read["code"] == "INVALID_ARGUMENT", read
            assert "does not let the agent's callers" in read["details"]
            overwrite = call(segments["shared"].name, mask=segments[label].name)
            assert overwrite["code"] == "INVALID_ARGUMENT", overwrite
            assert segments[label].read_bytes() == secret
        assert call(segments["shared"].name) == {"code": "OK", "anomalous": True, "refused_to_caller": 0}
    finally:
        for path in segments.values():
            path.unlink()
    assert agent.stop() == 0
