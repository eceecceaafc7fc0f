"""Benchmark the Edge Agent against in-process ONNX Runtime on the same model and image.

Absolute timings on a shared 2-core machine are noisy, so every figure that has a target is
a ratio measured side by side: in-process `session.run`, the agent over `byte_data` and the
agent over shared memory take turns, in short blocks, on the same image.

    python bench/bench_agent.py [--quick] [--backend auto|cpu|cuda|tensorrt] [--json OUT]

`--backend` is the agent's `accelerator` setting (docs/accelerators.md); the in-process baseline
uses the matching ONNX Runtime providers (the CPU for `cpu`, and wherever the GPU ones are absent).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lookout_edge.agent.backends.base import ACCELERATORS  # noqa: E402
from lookout_edge.agent.malloc import tune_malloc  # noqa: E402
from lookout_edge.package import read_package, write_package  # noqa: E402
from lookout_edge.protocol import pb2, pb2_grpc  # noqa: E402
from lookout_edge.shm import OwnedSegment  # noqa: E402

RESOLUTIONS = [(640, 480), (1920, 1080), (4096, 4096)]
BLOCK = 5
TARGETS = {
    "shm_ratio_1080p": 1.10,
    "bytes_ratio_1080p": 1.5,
    "rss_one_model_mb": 300,
    "start_to_running_s": 2.0,
}


def bench_model_graph(width: int, height: int) -> bytes:
    """A classification graph exactly as the trainer exports it (EfficientNet-Lite0 features,
    nearest-neighbour search in a 3,000-patch memory bank, blur, calibration), with a random
    bank: the cost of a trained model without training one per resolution."""
    from lookout_edge.trainer.export import TrainedModel, build_model_graph
    from lookout_edge.trainer.features import layout_for
    from lookout_edge.trainer.weights import load_pretrained_weights

    layout = layout_for(height, width)
    bank = np.random.default_rng(0).standard_normal((3000, layout.channels)).astype(np.float32)
    model = TrainedModel(layout, bank, centre=40.0, scale=2.5)
    return build_model_graph(load_pretrained_weights(), model).SerializeToString()


def write_bench_packages(models_dir: Path) -> dict[tuple[int, int], str]:
    names = {}
    for width, height in RESOLUTIONS:
        name = f"bench-{width}x{height}"
        manifest = {
            "component_name": name,
            "model_arn": "bench",
            "model_type": "classification",
            "image": {"width": width, "height": height},
            "threshold": 0.5,
        }
        write_package(models_dir / name, manifest, {"model.onnx": bench_model_graph(width, height)})
        names[(width, height)] = name
    return names


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found")


class Agent:
    def __init__(self, models_dir: Path, socket_dir: Path, backend: str = "auto") -> None:
        self.address = f"unix://{socket_dir}/bench.sock"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lookout_edge.cli", "agent", "--socket", self.address,
             "--models-dir", str(models_dir), "--log-level", "WARNING", "--accelerator", backend,
             "--engine-cache-dir", str(socket_dir / "engines")],
        )  # fmt: skip
        self.channel = grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
            ],
        )
        self.stub = pb2_grpc.EdgeAgentStub(self.channel)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.stub.ListModels(pb2.ListModelsRequest(), timeout=1)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def status_message(self, name: str) -> str:
        request = pb2.DescribeModelRequest(model_component=name)
        return str(self.stub.DescribeModel(request).model_description.status_message)

    def start_model(self, name: str) -> float:
        """Seconds from StartModel to RUNNING."""
        began = time.perf_counter()
        self.stub.StartModel(pb2.StartModelRequest(model_component=name))
        while True:
            status = self.stub.DescribeModel(pb2.DescribeModelRequest(model_component=name)).model_description
            if status.status == pb2.RUNNING:
                return time.perf_counter() - began
            if status.status == pb2.FAILED:
                raise RuntimeError(status.status_message)
            time.sleep(0.005)

    def stop_model(self, name: str) -> None:
        self.stub.StopModel(pb2.StopModelRequest(model_component=name))

    def close(self) -> None:
        self.channel.close()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": percentile(values, 50) * 1e3, "p99_ms": percentile(values, 99) * 1e3}


def timed(call: Callable[[], object]) -> float:
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


def baseline_providers(backend: str) -> list[str]:
    """In-process ONNX Runtime providers comparable to the agent's backend."""
    wanted = {"cuda": ["CUDAExecutionProvider"], "tensorrt": ["TensorrtExecutionProvider"]}.get(backend, [])
    if backend == "auto":
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    available = ort.get_available_providers()
    return [provider for provider in wanted if provider in available] + ["CPUExecutionProvider"]


def latency_side_by_side(
    agent: Agent, package_dir: Path, name: str, width: int, height: int, iterations: int, backend: str
) -> dict:
    package = read_package(package_dir)
    session = ort.InferenceSession(str(package.model_file.path), providers=baseline_providers(backend))
    image = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    size = image.nbytes
    bytes_request = pb2.DetectAnomaliesRequest(
        model_component=name, bitmap=pb2.Bitmap(width=width, height=height, byte_data=image.tobytes())
    )
    times: dict[str, list[float]] = {"in_process": [], "bytes": [], "shm": []}
    with OwnedSegment.create(size, prefix="lookout_edge_bench") as segment:
        segment.array()[:] = image.reshape(-1)
        shm_request = pb2.DetectAnomaliesRequest(
            model_component=name,
            bitmap=pb2.Bitmap(
                width=width,
                height=height,
                shared_memory_handle=pb2.SharedMemoryHandle(name=segment.name, size=size),
            ),
        )
        calls = {
            "in_process": lambda: session.run(None, {"image": image}),
            "bytes": lambda: agent.stub.DetectAnomalies(bytes_request),
            "shm": lambda: agent.stub.DetectAnomalies(shm_request),
        }
        for call in calls.values():  # warm-up
            for _ in range(3):
                call()
        # Blocks of BLOCK calls per path, rotating: interleaving single calls would let one
        # process's idle ONNX Runtime threads, which spin for a while after a call, slow the
        # other process's next call on a 2-core machine.
        for _ in range(-(-iterations // BLOCK)):
            for key, call in calls.items():
                times[key] += [timed(call) for _ in range(BLOCK)]
    base = statistics.median(times["in_process"])
    return {
        "resolution": f"{width}x{height}",
        "iterations": iterations,
        **{
            f"{key}_{stat}": value for key, values in times.items() for stat, value in summary(values).items()
        },
        "bytes_ratio": statistics.median(times["bytes"]) / base,
        "shm_ratio": statistics.median(times["shm"]) / base,
    }


def throughput(agent: Agent, name: str, width: int, height: int, clients: int, calls_each: int) -> float:
    """DetectAnomalies per second over shared memory with `clients` concurrent callers."""
    image = np.random.default_rng(1).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    segments = [OwnedSegment.create(image.nbytes, prefix="lookout_edge_bench") for _ in range(clients)]
    try:
        requests = []
        for segment in segments:
            segment.array()[:] = image.reshape(-1)
            handle = pb2.SharedMemoryHandle(name=segment.name, size=image.nbytes)
            requests.append(
                pb2.DetectAnomaliesRequest(
                    model_component=name,
                    bitmap=pb2.Bitmap(width=width, height=height, shared_memory_handle=handle),
                )
            )

        def worker(request: pb2.DetectAnomaliesRequest) -> None:
            for _ in range(calls_each):
                agent.stub.DetectAnomalies(request)

        threads = [threading.Thread(target=worker, args=(request,)) for request in requests]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return clients * calls_each / (time.perf_counter() - began)
    finally:
        for segment in segments:
            segment.close()


def save_results(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {path}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    parser.add_argument(
        "--backend",
        choices=ACCELERATORS,
        default="cpu",
        help="the agent's accelerator setting (default cpu)",
    )
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "bench" / "agent.json")
    args = parser.parse_args()
    # The agent recycles large buffers (agent/malloc.py); the in-process baseline gets the same
    # allocator settings, so that the ratios compare like with like.
    tune_malloc()
    scale = 0.2 if args.quick else 1.0
    work = Path(tempfile.mkdtemp(prefix="le-bench-", dir="/tmp"))
    results: dict = {
        "machine": f"{os.cpu_count()} cores, {sys.platform}",
        "onnxruntime": ort.__version__,
        "backend": args.backend,
        "baseline_providers": baseline_providers(args.backend),
    }
    try:
        models_dir = work / "models"
        print("building bench models (the trainer's graph, 3,000-patch bank)...", flush=True)
        names = write_bench_packages(models_dir)
        agent = Agent(models_dir, work, args.backend)
        try:
            results["rss_idle_mb"] = rss_mb(agent.process.pid)
            starts = []
            for _ in range(5):
                starts.append(agent.start_model(names[(1920, 1080)]))
                agent.stop_model(names[(1920, 1080)])
            results["start_to_running_s"] = statistics.median(starts)
            results["latency"] = []
            for (width, height), name in names.items():
                agent.start_model(name)
                results.setdefault("status_messages", {})[name] = agent.status_message(name)
                iterations = max(5, int({640: 200, 1920: 100, 4096: 20}[width] * scale))
                row = latency_side_by_side(
                    agent, models_dir / name, name, width, height, iterations, args.backend
                )
                results["latency"].append(row)
                print(
                    f"{row['resolution']:>10}: in-process p50 {row['in_process_p50_ms']:.1f} ms; "
                    f"bytes p50 {row['bytes_p50_ms']:.1f} / p99 {row['bytes_p99_ms']:.1f} ms "
                    f"(x{row['bytes_ratio']:.3f}); "
                    f"shm p50 {row['shm_p50_ms']:.1f} / p99 {row['shm_p99_ms']:.1f} ms "
                    f"(x{row['shm_ratio']:.3f})",
                    flush=True,
                )
                if (width, height) == (1920, 1080):
                    results["rss_one_model_mb"] = rss_mb(agent.process.pid)
                    results["throughput_1080p_per_s"] = {
                        str(clients): throughput(agent, name, width, height, clients, max(5, int(60 * scale)))
                        for clients in (1, 2, 4)
                    }
                agent.stop_model(name)
        finally:
            agent.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    row_1080p = next(row for row in results["latency"] if row["resolution"] == "1920x1080")
    checks = {
        "shm_ratio_1080p": row_1080p["shm_ratio"],
        "bytes_ratio_1080p": row_1080p["bytes_ratio"],
        "rss_one_model_mb": results["rss_one_model_mb"],
        "start_to_running_s": results["start_to_running_s"],
    }
    results["targets"] = {
        key: {"measured": value, "target": TARGETS[key], "met": value <= TARGETS[key]}
        for key, value in checks.items()
    }
    print(
        f"agent RSS idle {results['rss_idle_mb']:.0f} MB, "
        f"one 1080p model running {results['rss_one_model_mb']:.0f} MB"
    )
    print(
        "throughput at 1920x1080 over shm:",
        {k: round(v, 1) for k, v in results["throughput_1080p_per_s"].items()},
    )
    print(f"StartModel -> RUNNING (1080p model): {results['start_to_running_s']:.2f} s (median of 5)")
    for key, check in results["targets"].items():
        print(
            f"target {key}: {check['measured']:.3f} <= {check['target']}: "
            + ("met" if check["met"] else "NOT MET")
        )
    save_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
