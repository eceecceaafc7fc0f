"""Agent metrics (Prometheus text, read with the client library's parser) and the standard gRPC
health service, over real sockets against in-process agents and agent processes."""

from __future__ import annotations

import queue
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from lookout_edge.agent.config import ConfigError, load_config, metrics_endpoint
from lookout_edge.protocol import pb2

from .conftest import WIDTH, AgentProcess, RunningAgent, make_image

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def scrape(port: int) -> list[Sample]:
    """Every sample the agent's /metrics serves, parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sample `name` with exactly these labels (0 when absent, as Prometheus counts it)."""
    found = [sample.value for sample in samples if sample.name == name and sample.labels == labels]
    assert len(found) <= 1, found
    return found[0] if found else 0.0


def metrics_port(agent: RunningAgent) -> int:
    assert agent.server.metrics_server is not None
    return agent.server.metrics_server.port


def detect(agent: RunningAgent, model: str, image: np.ndarray) -> grpc.StatusCode:
    height, width = image.shape[:2]
    request = pb2.DetectAnomaliesRequest(
        model_component=model, bitmap=pb2.Bitmap(width=width, height=height, byte_data=image.tobytes())
    )
    try:
        agent.stub.DetectAnomalies(request, timeout=30)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_calls_are_counted_by_method_model_and_code(agent_factory) -> None:  # type: ignore[no-untyped-def]
    agent = agent_factory(metrics_address="127.0.0.1:0")
    agent.start("seg")
    codes = [detect(agent, "seg", make_image()) for _ in range(3)]
    codes += [detect(agent, name, make_image()) for name in ("no-such-model", "random-name-1234")]
    codes.append(detect(agent, "seg", make_image(width=WIDTH // 2)))
    codes.append(detect(agent, "", make_image()))
    agent.stub.ListModels(pb2.ListModelsRequest())
    ok, not_found, invalid = grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
    assert codes == [ok] * 3 + [not_found] * 2 + [invalid] * 2
    samples = scrape(metrics_port(agent))
    total = "lookout_edge_requests_total"
    assert value(samples, total, method="DetectAnomalies", model="seg", code="OK") == 3
    assert value(samples, total, method="DetectAnomalies", model="(unknown)", code="NOT_FOUND") == 2
    assert value(samples, total, method="DetectAnomalies", model="seg", code="INVALID_ARGUMENT") == 1
    assert value(samples, total, method="DetectAnomalies", model="", code="INVALID_ARGUMENT") == 1
    assert value(samples, total, method="ListModels", model="", code="OK") == 1
    assert value(samples, total, method="StartModel", model="seg", code="OK") == 1
    detect_calls = [s for s in samples if s.name == total and s.labels["method"] == "DetectAnomalies"]
    assert sum(s.value for s in detect_calls) == 7
    # Names that are no deployed model's do not become labels.
    assert {s.labels.get("model") for s in samples} <= {None, "", "seg", "cls", "(unknown)"}

    histogram = "lookout_edge_request_duration_seconds"
    for model, calls in (("seg", 4), ("(unknown)", 2), ("", 1)):
        buckets = sorted(
            (float(s.labels["le"]), s.value)
            for s in samples
            if s.name == histogram + "_bucket"
            and s.labels["method"] == "DetectAnomalies"
            and s.labels["model"] == model
        )
        assert [le for le, _ in buckets][:2] == [0.001, 0.0025] and buckets[-1][0] == float("inf")
        counts = [count for _, count in buckets]
        assert counts == sorted(counts), buckets
        assert counts[-1] == calls
        assert value(samples, histogram + "_count", method="DetectAnomalies", model=model) == calls
        assert value(samples, histogram + "_sum", method="DetectAnomalies", model=model) > 0
    assert value(samples, histogram + "_count", method="ListModels", model="") == 1


def test_anomalous_verdicts_are_counted(agent_factory) -> None:  # type: ignore[no-untyped-def]
    agent = agent_factory(metrics_address="127.0.0.1:0")
    agent.start("seg")
    agent.start("cls")
    # The sample models flag red rows (and blue ones for "seg"): two of the four are anomalous.
    for image in (make_image(red=20), make_image(), make_image(red=30), make_image()):
        assert detect(agent, "seg", image) == grpc.StatusCode.OK
    assert detect(agent, "cls", make_image(red=20)) == grpc.StatusCode.OK
    assert detect(agent, "cls", make_image()) == grpc.StatusCode.OK
    samples = scrape(metrics_port(agent))
    assert value(samples, "lookout_edge_anomalous_total", model="seg") == 2
    assert value(samples, "lookout_edge_anomalous_total", model="cls") == 1
    calls = value(samples, "lookout_edge_requests_total", method="DetectAnomalies", model="seg", code="OK")
    assert calls == 4  # every verdict is a call, anomalous or not


def _states(port: int, model: str) -> dict[str, float]:
    return {
        s.labels["state"]: s.value
        for s in scrape(port)
        if s.name == "lookout_edge_model_state" and s.labels["model"] == model
    }


def test_model_state_and_queue_depth_follow_the_registry(agent_factory) -> None:  # type: ignore[no-untyped-def]
    agent = agent_factory(metrics_address="127.0.0.1:0")
    port = metrics_port(agent)
    others = {"STARTING": 0.0, "RUNNING": 0.0, "FAILED": 0.0, "STOPPING": 0.0}
    assert _states(port, "seg") == {"STOPPED": 1.0, **others}
    agent.start("seg")
    assert _states(port, "seg") == {"STOPPED": 0.0, **others, "RUNNING": 1.0}
    assert _states(port, "cls")["STOPPED"] == 1.0
    assert value(scrape(port), "lookout_edge_queue_depth", model="seg") == 0
    with agent.server.registry.acquire("seg"), agent.server.registry.acquire("seg"):
        assert value(scrape(port), "lookout_edge_queue_depth", model="seg") == 2
    agent.stub.StopModel(pb2.StopModelRequest(model_component="seg"))
    assert _states(port, "seg") == {"STOPPED": 1.0, **others}
    process = {s.name for s in scrape(port)}
    assert {"process_resident_memory_bytes", "python_info"} <= process


@pytest.fixture
def health(agent: RunningAgent) -> Iterator[health_pb2_grpc.HealthStub]:
    with grpc.insecure_channel(agent.address) as channel:
        yield health_pb2_grpc.HealthStub(channel)


def check(stub: health_pb2_grpc.HealthStub, service: str) -> int:
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Health follows the registry through a queue: give it a moment."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_health_follows_start_and_stop(agent: RunningAgent, health: health_pb2_grpc.HealthStub) -> None:
    assert check(health, "") == SERVING
    assert eventually(lambda: check(health, "seg") == NOT_SERVING)
    agent.start("seg")
    assert eventually(lambda: check(health, "seg") == SERVING)
    assert check(health, "cls") == NOT_SERVING
    agent.stub.StopModel(pb2.StopModelRequest(model_component="seg"))
    assert eventually(lambda: check(health, "seg") == NOT_SERVING)
    with pytest.raises(grpc.RpcError) as unknown:
        check(health, "no-such-model")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_failed_model_is_not_serving(
    agent: RunningAgent, health: health_pb2_grpc.HealthStub, models_dir: Path
) -> None:
    model = models_dir / "cls" / "model.onnx"
    model.write_bytes(b"x" * model.stat().st_size)  # its SHA-256 no longer matches the manifest
    agent.stub.StartModel(pb2.StartModelRequest(model_component="cls"))
    with pytest.raises(AssertionError, match="failed"):
        agent.wait_running("cls")
    # Health applies the changes in order: once seg's RUNNING shows, cls's FAILED has been applied.
    agent.start("seg")
    assert eventually(lambda: check(health, "seg") == SERVING)
    assert check(health, "cls") == NOT_SERVING


def watch(address: str, service: str) -> tuple[queue.Queue, threading.Thread]:
    """Statuses a Watch stream receives, then "ended" with the code it ended with."""
    heard: queue.Queue = queue.Queue()

    def run() -> None:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                for response in stub.Watch(health_pb2.HealthCheckRequest(service=service)):
                    heard.put(response.status)
            except grpc.RpcError as exc:
                heard.put(("ended", exc.code()))
            else:
                heard.put(("ended", grpc.StatusCode.OK))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return heard, thread


def ended(heard: queue.Queue) -> grpc.StatusCode:
    """The code a Watch stream ended with, after NOT_SERVING, the last status it heard."""
    statuses = []
    while not isinstance(item := heard.get(timeout=10), tuple):
        statuses.append(item)
    assert statuses[-1:] == [NOT_SERVING], statuses
    return item[1]


def test_watch_receives_the_transitions(agent: RunningAgent) -> None:
    heard, thread = watch(agent.address, "seg")
    assert heard.get(timeout=10) == NOT_SERVING
    agent.start("seg")
    assert heard.get(timeout=10) == SERVING
    agent.stub.StopModel(pb2.StopModelRequest(model_component="seg"))
    assert heard.get(timeout=10) == NOT_SERVING
    agent.close()
    # The stream ends in an error, never OK and never hanging: CANCELLED when the server's stop
    # cancels the call before the connection closes, UNAVAILABLE when the connection goes first
    # (both race in grpc's shutdown; a Watch client reconnects on either).
    assert ended(heard) in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    thread.join(10)
    assert not thread.is_alive()


def test_sigterm_exits_promptly_with_a_watch_stream_open(agent_process) -> None:  # type: ignore[no-untyped-def]
    agent: AgentProcess = agent_process()  # shutdown_grace: 10 s, which an open stream would take
    agent.wait_ready()
    heard, thread = watch(agent.address, "")
    assert heard.get(timeout=10) == SERVING
    sent = time.monotonic()
    agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(30) == 0
    assert time.monotonic() - sent < 5, agent.output()
    assert ended(heard) == grpc.StatusCode.UNAVAILABLE
    thread.join(5)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_health_on_the_tls_listener(agent_process, certificates: Path) -> None:  # type: ignore[no-untyped-def]
    port = _free_port()
    agent: AgentProcess = agent_process(
        "--tcp-address", f"127.0.0.1:{port}",
        "--tls-cert", str(certificates / "server.pem"),
        "--tls-key", str(certificates / "server.key"),
        "--start-model", "cls",
    )  # fmt: skip
    agent.wait_ready()
    credentials = grpc.ssl_channel_credentials(root_certificates=(certificates / "ca.pem").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert check(stub, "") == SERVING
        assert eventually(lambda: check(stub, "cls") == SERVING)
        assert check(stub, "seg") == NOT_SERVING
    assert agent.stop(signal.SIGTERM) == 0


def test_metrics_address_flag_serves_an_agent_process(agent_process) -> None:  # type: ignore[no-untyped-def]
    port = _free_port()
    agent: AgentProcess = agent_process("--metrics-address", f"127.0.0.1:{port}")
    agent.wait_ready()
    samples = scrape(port)
    assert value(samples, "lookout_edge_model_state", model="cls", state="STOPPED") == 1
    assert value(samples, "lookout_edge_requests_total", method="ListModels", model="", code="OK") >= 1
    assert value(samples, "process_open_fds") > 0
    assert agent.stop(signal.SIGTERM) == 0
    with pytest.raises(OSError):
        scrape(port)


@pytest.mark.parametrize("address", ["nohost", "1.2.3.4:99999", "localhost:", ":9464", "host:port"])
def test_a_bad_metrics_address_is_a_config_error(address: str) -> None:
    with pytest.raises(ConfigError, match=f"metrics_address {re.escape(repr(address))} must be HOST:PORT"):
        load_config(overrides={"metrics_address": address}, environ={})


def test_good_metrics_addresses() -> None:
    assert metrics_endpoint("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert metrics_endpoint("[::1]:0") == ("::1", 0)
    from_env = load_config(environ={"LOOKOUT_EDGE_METRICS_ADDRESS": "localhost:9464"})
    assert from_env.metrics_address == "localhost:9464"


def test_a_bad_metrics_address_stops_an_agent_process(agent_process) -> None:  # type: ignore[no-untyped-def]
    agent: AgentProcess = agent_process("--metrics-address", "nohost")
    assert agent.process.wait(30) == 2
    assert "metrics_address 'nohost'" in agent.output()


def test_a_metrics_port_in_use_stops_the_agent(agent_process, sock_dir: Path) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        agent: AgentProcess = agent_process("--metrics-address", f"127.0.0.1:{taken.getsockname()[1]}")
        assert agent.process.wait(30) == 1
    assert "metrics_address" in agent.output()
    assert not (sock_dir / "agent.sock").exists()


def test_metrics_are_off_by_default(agent: RunningAgent) -> None:
    assert agent.server.metrics_server is None
    assert load_config(environ={}).metrics_address is None
