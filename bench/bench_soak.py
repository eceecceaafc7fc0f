"""Soak the Edge Agent: hours of service squeezed into minutes, watching what it holds on to.

An agent process serves a cookies-sized model (768x576, the trainer's graph) to 8 concurrent
clients over shared memory for the whole run, while a second model is started and stopped in
cycles and the package of a third, running, model is replaced on disk (and reloaded) now and
then. The agent's resident memory, threads, open descriptors and the /dev/shm entries are
sampled before, every few seconds during, and after the load, once the agent idles again.

    python bench/bench_soak.py [--minutes 10] [--quick] [--json OUT]

`--quick` soaks for one minute. Nothing should grow: after the load, threads, descriptors and
/dev/shm entries are back where they were, and resident memory stays within the target with
the model running.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_agent import Agent, bench_model_graph, rss_mb, save_results, summary  # noqa: E402
from lookout_edge.package import write_package  # noqa: E402
from lookout_edge.protocol import pb2, pb2_grpc  # noqa: E402
from lookout_edge.shm import OwnedSegment  # noqa: E402

MAIN = ("soak-cookies", 768, 576)  # the cookies dataset's image size
CYCLED = ("soak-cycled", 320, 240)
REPLACED = ("soak-replaced", 320, 240)
CLIENTS = 8
REPLACEMENTS = 3
IDLE_AFTER_S = 10.0
TARGET_RSS_MB = 300  # README: the agent's resident memory with a model running


def manifest(name: str, width: int, height: int, version: int = 0) -> dict[str, Any]:
    return {
        "component_name": name,
        "model_arn": f"soak:{name}:{version}",
        "model_type": "classification",
        "image": {"width": width, "height": height},
        "threshold": 0.5,
    }


def process_figures(pid: int) -> dict[str, float]:
    """The agent's resident memory, threads and descriptors, and the entries of /dev/shm."""
    with open(f"/proc/{pid}/status") as status:
        threads = next(int(line.split()[1]) for line in status if line.startswith("Threads:"))
    return {
        "rss_mb": rss_mb(pid),
        "threads": threads,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "dev_shm_entries": len(os.listdir("/dev/shm")),
    }


class Soak:
    """The load: clients, model cycles and package replacements, until `stop` is set."""

    def __init__(self, agent: Agent, models_dir: Path, replaced_graph: bytes) -> None:
        self.agent = agent
        self.models_dir = models_dir
        self.replaced_graph = replaced_graph
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.cycles = 0
        self.replacements = 0
        self._lock = threading.Lock()

    def client(self, segment: OwnedSegment) -> None:
        name, width, height = MAIN
        handle = pb2.SharedMemoryHandle(name=segment.name, size=width * height * 3)
        request = pb2.DetectAnomaliesRequest(
            model_component=name, bitmap=pb2.Bitmap(width=width, height=height, shared_memory_handle=handle)
        )
        latencies = []
        with grpc.insecure_channel(self.agent.address) as channel:  # one connection per client
            stub = pb2_grpc.EdgeAgentStub(channel)
            while not self.stop.is_set():
                began = time.perf_counter()
                try:
                    stub.DetectAnomalies(request, timeout=30)
                    latencies.append(time.perf_counter() - began)
                except grpc.RpcError as exc:
                    self._error(f"DetectAnomalies {exc.code().name}")
        with self._lock:
            self.latencies += latencies

    def cycle_models(self) -> None:
        """Start and stop the second model over and over."""
        name = CYCLED[0]
        while not self.stop.is_set():
            try:
                self.agent.start_model(name)
                self.agent.stop_model(name)
                self.cycles += 1
            except (grpc.RpcError, RuntimeError) as exc:
                self._error(f"cycle {exc}")
            self.stop.wait(1.0)

    def replace_packages(self, interval: float) -> None:
        """Replace the third model's package on disk, then restart it on the new one."""
        name, width, height = REPLACED
        while not self.stop.wait(interval) and self.replacements < REPLACEMENTS:
            version = self.replacements + 1
            write_package(
                self.models_dir / name,
                manifest(name, width, height, version),
                {"model.onnx": self.replaced_graph},
            )
            try:
                self.agent.stop_model(name)
                self.agent.start_model(name)
                request = pb2.DescribeModelRequest(model_component=name)
                arn = self.agent.stub.DescribeModel(request).model_description.lookout_vision_model_arn
                if arn != f"soak:{name}:{version}":
                    self._error(f"replaced package not served: {arn}")
            except (grpc.RpcError, RuntimeError) as exc:
                self._error(f"replacement {exc}")
            self.replacements += 1

    def _error(self, what: str) -> None:
        with self._lock:
            self.errors[what] += 1


def write_models(models_dir: Path) -> bytes:
    """The three packages; returns the small models' graph (the replacements reuse it)."""
    small_graph = bench_model_graph(CYCLED[1], CYCLED[2])
    for (name, width, height), graph in (
        (MAIN, bench_model_graph(MAIN[1], MAIN[2])),
        (CYCLED, small_graph),
        (REPLACED, small_graph),
    ):
        write_package(models_dir / name, manifest(name, width, height), {"model.onnx": graph})
    return small_graph


def run_soak(agent: Agent, soak: Soak, duration: float, sample_every: float) -> dict[str, Any]:
    """Sample the agent before, during and after `duration` seconds of load."""
    began = time.monotonic()
    samples: list[dict[str, Any]] = []

    def sample(phase: str) -> dict[str, Any]:
        figures: dict[str, Any] = {"t_s": round(time.monotonic() - began, 1), "phase": phase}
        figures.update(process_figures(agent.process.pid))
        samples.append(figures)
        return figures

    before = sample("before")  # the agent idle, no model running
    agent.start_model(MAIN[0])
    agent.start_model(REPLACED[0])
    running = sample("running")  # the models loaded, no calls yet
    image_bytes = MAIN[1] * MAIN[2] * 3
    segments = [OwnedSegment.create(image_bytes, prefix="lookout_edge_soak") for _ in range(CLIENTS)]
    image = np.random.default_rng(0).integers(0, 256, size=image_bytes, dtype=np.uint8)
    threads = [threading.Thread(target=soak.client, args=(segment,)) for segment in segments]
    threads.append(threading.Thread(target=soak.cycle_models))
    threads.append(threading.Thread(target=soak.replace_packages, args=(duration / (REPLACEMENTS + 1),)))
    print(f"soaking for {duration / 60:.1f} min: {CLIENTS} shm clients, model cycles, replacements")
    load_began = time.monotonic()
    try:
        for segment in segments:
            segment.array()[:] = image
        for thread in threads:
            thread.start()
        while time.monotonic() - load_began < duration:
            time.sleep(sample_every)
            now = sample("during")
            print(
                f"  {now['t_s']:6.0f} s: RSS {now['rss_mb']:.0f} MB (target {TARGET_RSS_MB}), "
                f"{now['threads']} threads, {now['fds']} fds, {now['dev_shm_entries']} /dev/shm entries",
                flush=True,
            )
    finally:
        soak.stop.set()
        for thread in threads:
            if thread.is_alive():
                thread.join()
        for segment in segments:
            segment.close()
    load_s = time.monotonic() - load_began
    time.sleep(IDLE_AFTER_S)
    after = sample("after")  # the clients gone, the main and third models still running
    during = [figures for figures in samples if figures["phase"] == "during"]
    peak = {key: max(figures[key] for figures in during) for key in process_figures(agent.process.pid)}
    return {
        "machine": f"{os.cpu_count()} cores, {sys.platform}",
        "minutes": round(load_s / 60, 2),
        "clients": CLIENTS,
        "model": f"{MAIN[0]} {MAIN[1]}x{MAIN[2]}",
        "calls": len(soak.latencies),
        "calls_per_s": len(soak.latencies) / load_s,
        "latency": summary(soak.latencies) if soak.latencies else {},
        "errors": dict(soak.errors),
        "start_stop_cycles": soak.cycles,
        "package_replacements": soak.replacements,
        "before": before,
        "running": running,
        "during_peak": peak,
        "after": after,
        "samples": samples,
        "targets": {
            "rss_running_mb": {
                "measured": peak["rss_mb"],
                "target": TARGET_RSS_MB,
                "met": peak["rss_mb"] <= TARGET_RSS_MB,
            }
        },
    }


def report(results: dict[str, Any]) -> None:
    latency = results["latency"]
    print(
        f"{results['calls']} calls ({results['calls_per_s']:.1f}/s), "
        f"p50 {latency.get('p50_ms', 0):.0f} ms / p99 {latency.get('p99_ms', 0):.0f} ms; "
        f"{results['start_stop_cycles']} start/stop cycles, "
        f"{results['package_replacements']} package replacements; errors: {results['errors'] or 'none'}"
    )
    for key, unit in (("rss_mb", " MB"), ("threads", ""), ("fds", ""), ("dev_shm_entries", "")):
        print(
            f"{key:>16}: before {results['before'][key]:.0f}{unit}, "
            f"models running {results['running'][key]:.0f}{unit}, "
            f"peak during {results['during_peak'][key]:.0f}{unit}, after {results['after'][key]:.0f}{unit}"
        )
    check = results["targets"]["rss_running_mb"]
    print(
        f"target rss_running_mb: peak {check['measured']:.0f} MB <= {check['target']} MB: "
        + ("met" if check["met"] else "NOT MET")
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load lasts (default 10)")
    parser.add_argument("--quick", action="store_true", help="a one-minute soak")
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "bench" / "soak.json")
    args = parser.parse_args()
    duration = 60.0 if args.quick else args.minutes * 60
    work = Path(tempfile.mkdtemp(prefix="le-soak-", dir="/tmp"))
    try:
        models_dir = work / "models"
        print("building the soak models (the trainer's graph, 3,000-patch bank)...", flush=True)
        small_graph = write_models(models_dir)
        agent = Agent(models_dir, work, "cpu")
        try:
            soak = Soak(agent, models_dir, small_graph)
            results = run_soak(agent, soak, duration, sample_every=2.0 if args.quick else 5.0)
        finally:
            agent.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results)
    save_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
