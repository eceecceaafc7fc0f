"""Benchmark the PLC path: trigger to result over OPC UA and Modbus TCP, beside DetectAnomalies.

The camera daemon runs as its own process (a PLC is another machine) with two triggered
cameras reading the same looping 640x480 H.264 file, one triggered over OPC UA, one over
Modbus; the PLC is asyncua's client and pymodbus's ModbusTcpClient in this process. Each
inspection runs the whole handshake: raise Trigger, read until ResultReady (every --poll-ms,
default 5, like a fast PLC task), lower Trigger, raise Ack, read until Ready, lower Ack.
Trigger-to-result is from the write of Trigger to the read that saw ResultReady; it includes
decoding the next frame of the file (a triggered file camera takes the next frame). Beside it,
in the same run, on the same agent and model: the agent's own DetectAnomalies time over shared
memory (the client alone), and the detect time the daemon saw (from its events), and per
inspection what the PLC path adds to that detect time (`added_to_detect_ms`: the write, the
next frame, the handshake, the read). The model is the trainer's graph at 640x480 with a
3,000-patch bank (bench/bench_agent.py), so its cost is a trained model's.

    python bench/bench_factory_io.py [--inspections N] [--poll-ms MS] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import yaml
from asyncua import Client, ua
from pymodbus.client import ModbusTcpClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_agent import bench_model_graph, save_results  # noqa: E402
from lookout_edge.client.camera.factory_io.opcua import NAMESPACE_URI  # noqa: E402
from lookout_edge.client.edge_client import EdgeAgentClient  # noqa: E402
from lookout_edge.package import write_package  # noqa: E402

WIDTH, HEIGHT = 640, 480
MODEL = "bench-factory-io"
TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": round(ordered[len(ordered) // 2], 2),
        "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
        "n": len(ordered),
    }


def wait_until(condition: Any, what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} in {timeout:g} s")
        time.sleep(0.05)


def write_video(path: Path, frames: int) -> None:
    """A WIDTHxHEIGHT H.264 file of textured frames, so that a frame costs what a camera's does."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for _ in range(frames):
            image = rng.integers(90, 160, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


async def opcua_inspections(url: str, count: int, poll_s: float) -> list[float]:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            client = Client(url, timeout=5)
            await client.connect()
            break
        except (OSError, asyncio.TimeoutError, ua.UaError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    try:
        ns = await client.get_namespace_index(NAMESPACE_URI)

        def node(name: str) -> Any:
            return client.get_node(f"ns={ns};s=LookoutEdge.Cameras.opcua.{name}")

        trigger, ack, result_ready, ready, error = (
            node(n) for n in ("Trigger", "Ack", "ResultReady", "Ready", "Error")
        )

        async def until(flag: Any) -> None:
            limit = time.monotonic() + TIMEOUT_S
            while not await flag.read_value():
                if await error.read_value():
                    raise RuntimeError(f"Error {await node('ErrorCode').read_value()}")
                if time.monotonic() > limit:
                    raise TimeoutError(f"{flag} did not rise")
                await asyncio.sleep(poll_s)

        await until(ready)
        latencies = []
        for _ in range(count):
            started = time.perf_counter()
            await trigger.write_value(True)
            await until(result_ready)
            latencies.append((time.perf_counter() - started) * 1000)
            await trigger.write_value(False)
            await ack.write_value(True)
            await until(ready)
            await ack.write_value(False)
        return latencies
    finally:
        await client.disconnect()


def modbus_inspections(port: int, count: int, poll_s: float) -> list[float]:
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
    wait_until(client.connect, "Modbus server")
    base = 100  # the second camera's block
    ready, result_ready, error = base + 0, base + 2, base + 5

    def until(bit: int) -> None:
        limit = time.monotonic() + TIMEOUT_S
        while True:
            bits = client.read_discrete_inputs(base, count=7).bits
            if bits[bit - base]:
                return
            if bits[error - base]:
                raise RuntimeError(f"Error {client.read_input_registers(base + 1, count=1).registers[0]}")
            if time.monotonic() > limit:
                raise TimeoutError(f"discrete input {bit} did not rise")
            time.sleep(poll_s)

    try:
        until(ready)
        latencies = []
        for _ in range(count):
            started = time.perf_counter()
            client.write_coil(base + 0, True)
            until(result_ready)
            latencies.append((time.perf_counter() - started) * 1000)
            client.write_coil(base + 0, False)
            client.write_coil(base + 1, True)
            until(ready)
            client.write_coil(base + 1, False)
        return latencies
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inspections", type=int, default=100, help="per protocol (default 100)")
    parser.add_argument("--poll-ms", type=float, default=5.0, help="the PLC's read interval (default 5)")
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "bench" / "factory_io.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="le-bench-fio-", dir="/tmp"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        models = work / "models"
        manifest = {
            "component_name": MODEL,
            "model_type": "classification",
            "image": {"width": WIDTH, "height": HEIGHT},
            "threshold": 0.5,
        }
        write_package(models / "model", manifest, {"model.onnx": bench_model_graph(WIDTH, HEIGHT)})
        agent_socket = f"unix://{work}/agent.sock"
        command = [sys.executable, "-m", "lookout_edge.cli"]
        processes.append(
            subprocess.Popen(
                [*command, "agent", "--socket", agent_socket, "--models-dir", str(models)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        video = work / "line.mp4"
        write_video(video, 30)
        with EdgeAgentClient(agent_socket, shm_prefix="lookout_edge_bench") as client:
            wait_until(lambda: _started(client), "running model")
            image = np.random.default_rng(1).integers(0, 255, (HEIGHT, WIDTH, 3), np.uint8)
            direct = []
            for _ in range(args.inspections):
                started = time.perf_counter()
                client.detect(image, MODEL, shared_memory=True)
                direct.append((time.perf_counter() - started) * 1000)

        opcua_url = f"opc.tcp://127.0.0.1:{free_port()}/lookout-edge/"
        modbus_port = free_port()
        camera = {"source": str(video), "model": MODEL, "loop": True, "width": WIDTH, "height": HEIGHT}
        config = {
            "agent": {"socket": agent_socket},
            "state_dir": str(work / "state"),
            "cameras": [
                {"name": "opcua", **camera, "trigger": {"type": "opcua", "timeout": 30}},
                {"name": "modbus", **camera, "trigger": {"type": "modbus", "timeout": 30}},
            ],
            "sinks": [{"type": "jsonl", "path": str(work / "events.jsonl")}],
            "outputs": [
                {"type": "opcua", "endpoint": opcua_url, "cameras": ["opcua"]},
                {"type": "modbus", "address": f"127.0.0.1:{modbus_port}", "cameras": ["opcua", "modbus"]},
            ],
            "status": {"interval": 60},
        }
        (work / "camera.yaml").write_text(yaml.safe_dump(config))
        with (work / "camera.log").open("wb") as log:
            processes.append(
                subprocess.Popen(
                    [*command, "camera", "--config", str(work / "camera.yaml")], stdout=log, stderr=log
                )
            )
        poll_s = args.poll_ms / 1000
        opcua = asyncio.run(opcua_inspections(opcua_url, args.inspections, poll_s))
        modbus = modbus_inspections(modbus_port, args.inspections, poll_s)
        events = [json.loads(line) for line in (work / "events.jsonl").read_text().splitlines()]

        def daemon_side(name: str, key: str) -> list[float]:
            return [e["latency_ms"][key] for e in events if e["camera"] == name]

        def protocol(name: str, latencies: list[float]) -> dict[str, dict[str, float]]:
            """The PLC's figures, the daemon's, and what the PLC path adds to DetectAnomalies in
            each inspection (its event is the camera's next one)."""
            detect = daemon_side(name, "detect")
            return {
                "trigger_to_result_ms": summary(latencies),
                "daemon_detect_ms": summary(detect),
                "decode_to_result_ms": summary(daemon_side(name, "capture_to_result")),
                "added_to_detect_ms": summary([t - d for t, d in zip(latencies, detect, strict=True)]),
            }

        figures = {
            "model": f"{MODEL} ({WIDTH}x{HEIGHT}, the trainer's graph)",
            "plc_poll_ms": args.poll_ms,
            "agent_detect_shm_ms": summary(direct),
            "opcua": protocol("opcua", opcua),
            "modbus": protocol("modbus", modbus),
        }
        print(json.dumps(figures, indent=2))
        save_results(figures, args.json)
        return 0
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def _started(client: EdgeAgentClient) -> bool:
    try:
        client.start_and_wait(MODEL)
        return True
    except Exception:  # the agent is still starting
        return False


if __name__ == "__main__":
    sys.exit(main())
